"""A VLM under torchrun (gloo, 2 processes): DDP with the chunked loss equals one process with the plain loss over
the same packs, also on steps where a rank's pack holds no image (its vision tower gets no gradient there); FSDP is
refused with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_distributed import _torchrun  # noqa: E402
from test_vlm_training import conversation, write_images_data  # noqa: E402
from tinyvlm import vlm_run  # noqa: E402
from tinyrun import step_records  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.train.loop import train  # noqa: E402

RECORDS = [conversation("<image>What colour?", "blue", ["a.png"]),
           conversation("Say hello.", "hello there", []),
           conversation("Count to three.", "one two three", []),
           conversation("<image>Size?", "wide", ["b.png"]),
           conversation("Name a fruit.", "apple", []),
           conversation("Name a colour.", "green", [])]


def _config(root: Path, name: str, grad_accum: int, chunked: bool = False, **parallel) -> dict:
    data = root / "data.json"
    if not data.is_file():
        write_images_data(root, RECORDS, {"a.png": (90, 40), "b.png": (30, 70)})
    # a budget below two documents: one document per pack, so some packs (and steps) hold no image
    return vlm_run(root, data, name=name, pack={"max_tokens": 64}, train={"steps": 3, "grad_accum": grad_accum},
                   memory={"chunked_loss": chunked, "loss_chunk_tokens": 8}, parallel=parallel)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm-dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(build_config(_config(root, "one", grad_accum=2)))
    finally:
        torch.set_num_threads(threads)
    return root


def test_two_ranks_equal_one_process(reference):
    root, strategy = reference, "ddp"
    cfg_path = root / f"{strategy}.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, strategy, grad_accum=1, chunked=True, strategy=strategy)))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "chunked_loss is off" not in done.stdout + done.stderr
    expected, got = step_records(root / "one"), step_records(root / strategy)
    assert len(got) == 3
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5, (e["step"], e["loss"], g["loss"])
        assert abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5
        assert (e["tokens"], e["target_tokens"]) == (g["tokens"], g["target_tokens"])
    assert json.loads((root / strategy / "summary.json").read_text())["world_size"] == 2


def test_fsdp_is_refused_with_a_message(reference):
    cfg_path = reference / "fsdp.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(reference, "fsdp", grad_accum=1, strategy="fsdp")))
    done = _torchrun(["-m", "zeropad", "train", str(cfg_path)], cwd=reference)
    assert done.returncode != 0 and "use parallel.strategy=ddp" in done.stdout + done.stderr
