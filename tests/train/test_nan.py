"""Numerical faults: a step with a non-finite loss is skipped and counted; max_bad_steps in a row
checkpoint and stop. NaN is injected from outside through torch's public global forward hook on
the embedding output, so the loop has no test-only path."""

import contextlib
import json
import math

import pytest
import torch

from tinyrun import step_records
from zeropad.config import build_config
from zeropad.errors import TooManyBadSteps
from zeropad.train.export import load_trained_model
from zeropad.train.loop import train
from zeropad.train.state import checkpoint_root


@contextlib.contextmanager
def nan_embeddings(bad_calls):
    """NaN embedding outputs on the forward passes numbered in `bad_calls` (1-based; one per step)."""
    calls = 0

    def hook(module, args, output):
        nonlocal calls
        if isinstance(module, torch.nn.Embedding):
            calls += 1
            if calls in bad_calls:
                return output * math.nan

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_a_bad_step_is_skipped_and_counted(tiny_run):
    cfg = build_config(tiny_run())
    with nan_embeddings({3}):
        result = train(cfg)
    records = step_records(cfg.output_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    bad = records[2]
    assert bad["skipped_bad_step"] and bad["bad_steps"] == 1 and math.isnan(bad["loss"])
    assert records[3]["lr"] == bad["lr"]  # neither the optimizer nor the schedule stepped
    assert all(math.isfinite(r["loss"]) for r in records[3:]) and "skipped_bad_step" not in records[3]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert json.loads(open(f"{cfg.output_dir}/summary.json").read())["bad_steps"] == 1


def test_too_many_in_a_row_checkpoint_and_stop(tiny_run):
    cfg = build_config(tiny_run(train={"max_bad_steps": 3}))
    with nan_embeddings(set(range(3, 100))), pytest.raises(TooManyBadSteps) as info:
        train(cfg)
    err = info.value
    assert err.exit_code == 4 and "3 consecutive steps" in str(err) and "step_000005" in err.checkpoint
    records = step_records(cfg.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["bad_steps"] == 3
    saved = load_trained_model(checkpoint_root(cfg.output_dir) / "step_000005")
    assert all(torch.isfinite(p).all() for p in saved.parameters())  # the last good weights
    state = json.loads((checkpoint_root(cfg.output_dir) / "step_000005" / "state.json").read_text())
    assert state["bad_steps"] == 3
