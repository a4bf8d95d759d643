"""The chunked loss under torchrun (gloo, 2 processes): FSDP2 (ZeRO-3) with memory.chunked_loss=true equals one
process with the plain loss over the same packs (losses, gradient norms, eval losses, final weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_distributed import _final_weights, _torchrun  # noqa: E402
from tinyrun import chunked_weight_tolerance, run_config, step_records, train_as_one_rank  # noqa: E402

STEPS = 3


def _config(root: Path, output_dir: Path, grad_accum: int, chunked: bool, **parallel) -> dict:
    # 5-token chunks: every pack's loss spans several chunks. The eval after step 2 runs the chunked loss
    # without a backward (FSDP: the gathered root is resharded) between two training steps.
    return run_config(root, output_dir, train={"steps": STEPS, "grad_accum": grad_accum},
                      memory={"chunked_loss": chunked, "loss_chunk_tokens": 5}, eval={"split": 0.1, "every_steps": 2},
                      parallel=parallel)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One process, the plain loss, grad_accum 4: the packs 2 ranks x 2 micro-steps see per step."""
    root = tmp_path_factory.mktemp("chunked-dist")
    out = root / "one"
    train_as_one_rank(_config(root, out, grad_accum=4, chunked=False))
    return root, out


# FSDP with reshard_after_forward (ZeRO-3) only: it is the case where the chunked loss must unshard the root
# itself. DDP with the chunked loss runs in tests/parallel/test_vlm_distributed.py (and SP's tests run the chunked
# loss under FSDP); ZeRO-2 keeps the root whole, where the unshard is a no-op.
@pytest.mark.parametrize("parallel", [{"strategy": "fsdp", "reshard_after_forward": True}], ids=["fsdp-zero3"])
def test_chunked_loss_on_two_ranks_equals_plain_loss_on_one(reference, parallel):
    root, one = reference
    name = "chunked-" + "-".join(f"{v}" for v in parallel.values())
    out = root / name
    cfg_path = root / f"{name}.yaml"
    cfg = _config(root, out, grad_accum=2, chunked=True, **parallel)
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    log = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "chunked_loss is off" not in log

    expected, got = step_records(one), step_records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [("eval_loss" in r) for r in got] == [False, True, False]
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e["step"], e["grad_norm"], g["grad_norm"])
        assert abs(e.get("eval_loss", 0.0) - g.get("eval_loss", 0.0)) <= 1e-5, e["step"]
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
    expected_w, got_w = _final_weights(one), _final_weights(out)
    assert expected_w.keys() == got_w.keys()
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= chunked_weight_tolerance(cfg["train"]["lr"]), key
