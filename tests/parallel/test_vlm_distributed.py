"""A VLM under torchrun (gloo, 2 processes): DDP and FSDP2 with the chunked loss, and FSDP2 with the plain loss,
equal one process with the plain loss over the same packs (losses, grad norms, final weights), also on steps where
one rank's pack holds no image (under FSDP that rank runs the vision tower on a zero-weight dummy image,
parallel.sharding.VisionCalls; with the chunked loss its backward must still meet the image rank's collectives in
order, train/loss.py) and on steps where no pack holds one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_distributed import _torchrun  # noqa: E402
from test_vlm_training import conversation, write_images_data  # noqa: E402
from tinyvlm import vlm_run  # noqa: E402
from tinyrun import chunked_weight_tolerance, step_records  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.train.loop import train  # noqa: E402

RECORDS = [conversation("<image>What colour?", "blue", ["a.png"]),
           conversation("Say hello.", "hello there", []),
           conversation("Count to three.", "one two three", []),
           conversation("<image>Size?", "wide", ["b.png"]),
           conversation("Name a fruit.", "apple", []),
           conversation("Name a colour.", "green", [])]


def _config(root: Path, family: str, name: str, grad_accum: int, chunked: bool = False, **parallel) -> dict:
    data = root / "data.json"
    if not data.is_file():
        write_images_data(root, RECORDS, {"a.png": (90, 40), "b.png": (30, 70)})
    # a budget below two documents: one document per pack, so some packs (and steps) hold no image
    return vlm_run(root, data, family=family, name=name, pack={"max_tokens": 64},
                   train={"steps": 3, "grad_accum": grad_accum},
                   memory={"chunked_loss": chunked, "loss_chunk_tokens": 8}, parallel=parallel)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process per family, grad_accum 2: the packs 2 ranks x 1 micro-step see per step."""
    roots: dict[str, Path] = {}

    def reference(family: str) -> Path:
        if family not in roots:
            roots[family] = root = tmp_path_factory.mktemp(f"vlm-dist-{family}")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
            try:
                train(build_config(_config(root, family, "one", grad_accum=2)))
            finally:
                torch.set_num_threads(threads)
        return roots[family]

    return reference


# qwen3_vl_moe keeps the plain loss: the VLM's plain-loss path under FSDP (the loss when chunking is off or
# unsupported) stays covered.
@pytest.mark.parametrize("family,strategy,chunked", [("qwen2_5_vl", "ddp", True), ("qwen2_5_vl", "fsdp", True),
                                                     ("qwen3_vl_moe", "fsdp", False)])
def test_two_ranks_equal_one_process(references, family, strategy, chunked):
    root = references(family)
    cfg_path = root / f"{strategy}.yaml"
    cfg = _config(root, family, strategy, grad_accum=1, chunked=chunked, strategy=strategy)
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "chunked_loss is off" not in done.stdout + done.stderr
    expected, got = step_records(root / "one"), step_records(root / strategy)
    assert len(got) == 3
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
    expected_w = load_file(str(root / "one" / "final" / "model.safetensors"))
    got_w = load_file(str(root / strategy / "final" / "model.safetensors"))
    assert expected_w.keys() == got_w.keys() and any("visual" in key for key in got_w)
    tolerance = chunked_weight_tolerance(cfg["train"]["lr"]) if chunked else 1e-5
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= tolerance, key
    assert json.loads((root / strategy / "summary.json").read_text())["world_size"] == 2
