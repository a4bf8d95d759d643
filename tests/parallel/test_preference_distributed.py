"""DPO under FSDP on 2 ranks (gloo, torchrun) equals one process over the same pairs: the reference pass runs
every pack on every rank, a pair's documents stay on one rank, and the loss is a mean over all ranks' pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the tiny run shared with the train tests
from test_distributed import _final_weights, _torchrun  # noqa: E402
from tinyrun import run_config, step_records, train_as_one_rank  # noqa: E402

STEPS = 3


def _dpo_config(root: Path, out: Path, grad_accum: int, cache: str, **parallel) -> dict:
    data = root / "dpo.json"
    if not data.is_file():
        data.write_text(json.dumps([
            {"conversations": [{"from": "human", "value": f"Name {i}"}], "chosen": {"from": "gpt", "value": f"{i}"},
             "rejected": {"from": "gpt", "value": f"not {i * 3}"}} for i in range(32)]))
    return run_config(root, out, data={"sources": [{"path": str(data)}], "cache_dir": str(root / cache)},
                      pack={"max_tokens": 160}, memory={"chunked_loss": False}, parallel=parallel,
                      train={"objective": "dpo", "beta": 0.5, "steps": STEPS, "grad_accum": grad_accum})


def test_fsdp_dpo_on_two_ranks_equals_one_process(tmp_path):
    one = tmp_path / "one"
    train_as_one_rank(_dpo_config(tmp_path, one, grad_accum=2, cache="cache-one"))
    out = tmp_path / "fsdp"
    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(_dpo_config(tmp_path, out, grad_accum=1, cache="cache-fsdp", strategy="fsdp")))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    expected, got = step_records(one), step_records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert abs(got[0]["loss"] - 0.6931471805599453) <= 1e-6  # step 1: the policy is the reference
    for e, g in zip(expected, got, strict=True):
        assert e["pairs"] == g["pairs"] and e["tokens"] == g["tokens"]
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert abs(e[key] - g[key]) <= 1e-5, (e["step"], key, e[key], g[key])
    assert got[-1]["rewards/margin"] > 0
    expected_w, got_w = _final_weights(one), _final_weights(out)
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key
    assert len(list((tmp_path / "cache-fsdp" / "reference").glob("*.npy"))) == 1  # rank 0 wrote the first pass
