"""Resume across groupings and ranks: the data position (packs done) is the same under any world_size x
grad_accum, so a run resumed with another grouping continues at the same pack; and under torchrun every
rank falls back past an unusable checkpoint together, to the same previous one."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the tiny run shared with the train tests
from test_distributed import _torchrun  # noqa: E402
from tinyrun import run_config, step_records  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.data.chat import Sample  # noqa: E402
from zeropad.errors import ConfigError  # noqa: E402
from zeropad.pack.loader import PackLoader, StreamingPackLoader, step_packs  # noqa: E402
from zeropad.train.loop import train  # noqa: E402
from zeropad.train.state import checkpoint_root  # noqa: E402

STEPS = 6
CHECKPOINTS = {"every_steps": 2, "keep": 5}


def _samples(n: int = 30) -> list[Sample]:
    """Documents named by their tokens (each one's index)."""
    lengths = np.random.default_rng(0).integers(3, 40, size=n)
    return [Sample(np.full(int(length), i, dtype=np.int32), np.ones(int(length), dtype=bool))
            for i, length in enumerate(lengths)]


def _loader(kind: str):
    samples = _samples()
    if kind == "planned":
        return PackLoader(samples, max_tokens=64, seed=3)
    return StreamingPackLoader(lambda epoch: iter(samples[epoch % 2:] + samples[:epoch % 2]), 64, 10, seed=3)


def _at(kind: str, position: tuple[int, int]):
    loader = _loader(kind)
    loader.epoch, loader.index = position
    return loader


def _take(kind: str, loader, micro_steps: int, world_size: int, steps: int) -> list[list[list[int]]]:
    """The documents of each optimizer step, every rank's packs together (one loader per rank, as under
    torchrun), in a canonical order: a step's packs sorted, each pack as its sorted document indices."""
    loaders = [loader] + [_at(kind, (loader.epoch, loader.index)) for _ in range(world_size - 1)]
    streams = [step_packs(ld, micro_steps, world_size, rank, collate_fn=lambda docs: docs)
               for rank, ld in enumerate(loaders)]
    taken = []
    for _ in range(steps):
        packs = [pack for stream in streams for pack in next(stream).packs]
        taken.append(sorted(sorted(int(doc.input_ids[0]) for doc in pack) for pack in packs))
    assert len({(ld.epoch, ld.index) for ld in loaders}) == 1  # every rank at the same data position
    return taken


@pytest.mark.parametrize("kind", ["planned", "streaming"])
def test_packs_done_is_the_same_position_under_any_grouping(kind):
    """1 rank x grad_accum 2 for 5 steps, then resumed at its position as 2 ranks x 3, then as 1 x 1: the
    same packs, step for step, as 1 x 1 all along, across an epoch boundary."""
    along = [step[0] for step in _take(kind, _loader(kind), 1, 1, 28)]
    first = _loader(kind)
    before = _take(kind, first, 2, 1, 5)
    resumed = _at(kind, (first.epoch, first.index))
    middle = _take(kind, resumed, 3, 2, 2)
    after = _take(kind, resumed, 1, 1, 6)
    assert resumed.epoch >= 1  # an epoch boundary lies inside the packs taken
    chunks = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 16), (16, 22)] + [(i, i + 1) for i in range(22, 28)]
    assert before + middle + after == [sorted(along[a:b]) for a, b in chunks]


def _config(root: Path, output_dir: Path, grad_accum: int, steps: int = STEPS, **sections) -> dict:
    cfg = run_config(root, output_dir, train={"steps": steps, "grad_accum": grad_accum},
                     memory={"chunked_loss": False}, checkpoint=CHECKPOINTS, **sections)
    return cfg


def _train_here(cfg: dict):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        return train(build_config(cfg))
    finally:
        torch.set_num_threads(threads)


def _state(output_dir: Path, step: int) -> dict:
    return json.loads((checkpoint_root(output_dir) / f"step_{step:06d}" / "state.json").read_text())


def test_regrouped_resume_takes_the_packs_the_uninterrupted_run_would(tmp_path, capsys):
    """1 process x grad_accum 2, checkpointed at step 2 and resumed with grad_accum 1: its steps 3-4 hold the
    packs of the uninterrupted step 3, its steps 5-6 those of step 4; the run ends at the same data position
    with the same tokens seen."""
    whole = tmp_path / "accum2"
    _train_here(_config(tmp_path, whole, grad_accum=2, steps=4))
    saved = _state(whole, 2)
    assert (saved["world_size"], saved["grad_accum"]) == (1, 2)

    regrouped = tmp_path / "accum1"
    capsys.readouterr()
    _train_here(_config(tmp_path, regrouped, grad_accum=1, steps=6,
                        resume=str(checkpoint_root(whole) / "step_000002")))
    out = capsys.readouterr().out
    assert "saved with 1 rank(s) x grad_accum 2, now 1 rank(s) x 1: regrouped from 2 to 1 packs per optimizer step" in out

    expected, got = step_records(whole), step_records(regrouped)
    assert [r["step"] for r in got] == [3, 4, 5, 6]  # another output_dir: its metrics start at the resume
    for whole_step, (a, b) in zip(expected[2:], [got[0:2], got[2:4]], strict=True):
        for key in ("tokens", "target_tokens"):
            assert a[key] + b[key] == whole_step[key], (whole_step["step"], key)
    end_whole, end_regrouped = _state(whole, 4), _state(regrouped, 6)
    for key in ("epoch", "index", "tokens_seen"):
        assert end_regrouped[key] == end_whole[key], key
    assert (end_regrouped["world_size"], end_regrouped["grad_accum"]) == (1, 1)

    # bigger packs: an epoch of fewer packs than the checkpoint's 8 done, a position this data lacks
    with pytest.raises(ConfigError, match=r"8 packs into epoch 0, but this run's data makes \d packs an epoch"):
        _train_here(_config(tmp_path, tmp_path / "bigger", grad_accum=1, pack={"max_tokens": 512},
                            resume=str(checkpoint_root(whole) / "step_000004")))


_DAMAGED_ON_RANK_1 = """
import os, sys
import zeropad.train.state as state
from zeropad.config import load_config
from zeropad.train.loop import train

real_verify = state.verify

def verify(path):  # test-only: rank 1 alone finds step 4 damaged (its node's copy lost a shard)
    if os.environ["RANK"] == "1" and path.name == "step_000004":
        raise state.CorruptCheckpoint(f"{path}: dcp/__1_0.distcp is missing (injected on rank 1)")
    return real_verify(path)

state.verify = verify
train(load_config(sys.argv[1], sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path]:
    """2 DDP ranks x grad_accum 1, uninterrupted, checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("resume-dist")
    out = root / "two"
    cfg_path = root / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, out, grad_accum=1, parallel={"strategy": "ddp"})))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root, out


def _assert_same_run(reference: Path, resumed: Path, from_step: int) -> None:
    expected, got = step_records(reference), step_records(resumed)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for e, g in zip(expected[from_step:], got[from_step:], strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e["step"], e["grad_norm"], g["grad_norm"])
        assert e["lr"] == pytest.approx(g["lr"], rel=1e-9)
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
    expected_w, got_w = (load_file(str(d / "final" / "model.safetensors")) for d in (reference, resumed))
    assert expected_w.keys() == got_w.keys()
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key


def test_two_ranks_resumed_in_one_process_with_the_same_packs_per_step(two_ranks, capsys):
    """2 ranks x grad_accum 1 == 1 x 2 packs per step: the resumed run is the uninterrupted 2-rank run."""
    root, two = two_ranks
    resumed = root / "one-accum2"
    capsys.readouterr()
    _train_here(_config(root, resumed, grad_accum=2, resume=str(checkpoint_root(two) / "step_000002")))
    out = capsys.readouterr().out
    assert "saved with 2 rank(s) x grad_accum 1, now 1 rank(s) x 2: the same 2 packs per optimizer step" in out
    records = step_records(resumed)
    assert [r["step"] for r in records] == [3, 4, 5, 6]  # another output_dir: its metrics start at the resume
    expected = step_records(two)[2:]
    for e, g in zip(expected, records, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
    expected_w, got_w = (load_file(str(d / "final" / "model.safetensors")) for d in (two, resumed))
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key


def test_every_rank_falls_back_to_the_same_checkpoint(two_ranks):
    """Step 6's shard truncated (every rank sees it) and step 4 damaged on rank 1 alone: both ranks fall back
    to step 2, and the resumed run is the uninterrupted one."""
    root, two = two_ranks
    out = root / "fallback"
    shutil.copytree(two, out)
    shard = checkpoint_root(out) / "step_000006" / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    shutil.rmtree(out / "final")
    cfg_path = root / "fallback.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, out, grad_accum=1, parallel={"strategy": "ddp"})))
    script = root / "damaged_on_rank_1.py"
    script.write_text(_DAMAGED_ON_RANK_1)
    done = _torchrun(["--tee", "3", str(script), str(cfg_path), "resume=auto"], cwd=root)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    for rank in (0, 1):
        lines = [line for line in log.splitlines() if re.match(rf"\[default{rank}\]:\s*resume", line)]
        assert any("step_000006 is unusable" in line and "truncated" in line for line in lines), (rank, lines)
        reason = "injected on rank 1" if rank == 1 else "unusable on 1 other rank(s)"
        assert any("step_000004 is unusable" in line and reason in line for line in lines), (rank, lines)
        resumed = [line for line in log.splitlines() if re.match(rf"\[default{rank}\]:\s*resumed from", line)]
        assert len(resumed) == 1 and "step_000002 at step 2 " in resumed[0], (rank, resumed)
    _assert_same_run(two, out, from_step=2)
