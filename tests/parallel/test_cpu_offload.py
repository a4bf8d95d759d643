"""parallel.cpu_offload on a GPU: FSDP2 keeping shards, gradients and AdamW state in host memory trains as the
model held on the GPU does (fp32: losses, grad norms, final weights within 1e-5), in one process, with the model
read from safetensors into its host shards. Needs CUDA (benchmarks/gpu_check.sh runs it on the GPU machine);
without a GPU the option is refused with its reason (tests/parallel/test_distributed.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_distributed import _final_weights  # noqa: E402
from tinyrun import run_config, saved_initial_model, step_records  # noqa: E402
from zeropad.config import build_config  # noqa: E402
from zeropad.train.loop import train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="parallel.cpu_offload needs a CUDA GPU")


def test_cpu_offload_trains_as_on_the_gpu(tmp_path):
    def config(name: str, **parallel) -> dict:
        return run_config(tmp_path, tmp_path / name, train={"steps": 3, "device": "cuda"},
                          memory={"chunked_loss": False}, parallel=parallel)

    train(build_config(config("gpu")))
    train(build_config(saved_initial_model(config("offload", strategy="fsdp", cpu_offload=True), tmp_path / "initial")))

    expected, got = step_records(tmp_path / "gpu"), step_records(tmp_path / "offload")
    assert len(got) == 3
    for e, g in zip(expected, got, strict=True):
        assert abs(e["loss"] - g["loss"]) <= 1e-5 and abs(e["grad_norm"] - g["grad_norm"]) <= 1e-5, (e, g)
    expected_w, got_w = _final_weights(tmp_path / "gpu"), _final_weights(tmp_path / "offload")
    for key in expected_w:
        assert (expected_w[key] - got_w[key]).abs().max().item() <= 1e-5, key
