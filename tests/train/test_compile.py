"""train.compile: the compiled decoder layers train exactly as eager ones, with no recompile per pack."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrun import step_records
from zeropad.config import build_config
from zeropad.model.attention import cpu_flash_per_doc
from zeropad.train.loop import train


@pytest.mark.parametrize("window", [None, 5])
def test_the_attention_op_is_registered_consistently(window):
    """Fake (shapes and strides dynamo traces with), autograd and schema agree with the real op."""
    torch.manual_seed(0)
    # [1, H, T, D] views of [1, T, H, D] tensors, as the attention receives them; GQA (4 query, 2 KV heads)
    q = torch.randn(1, 12, 4, 8).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 12, 2, 8).transpose(1, 2).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    torch.library.opcheck(cpu_flash_per_doc, (q, k, v, cu, 0.3, window))


def test_compiled_training_equals_eager(tiny_run, monkeypatch):
    """A few steps with full activation checkpointing and LoRA adapters: losses, grad norms and final weights equal
    eager's (fp32), every pack (its own length and document count) runs in the graph compiled first, no break.
    The eager backend runs dynamo's graphs as they are traced: inductor's C++ build and even aot_eager's traced
    backward take tens of seconds on the shared test machine (the op's traced backward is the opcheck's job)."""
    monkeypatch.setenv("ZEROPAD_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sections = dict(memory={"checkpointing": "full"},
                    model={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    runs = {}
    for compiled in (False, True):
        cfg = tiny_run(f"compile_{compiled}", train={"steps": 3, "compile": compiled}, **sections)
        train(build_config(cfg))
        runs[compiled] = Path(cfg["output_dir"])
    eager, compiled = (step_records(runs[c]) for c in (False, True))
    assert len({r["tokens"] for r in eager}) > 1, "the packs should differ in length"
    assert all(r["data_s"] > 0 for r in eager + compiled)  # the wait for each step's packs, logged
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    weights, ref = (load_file(f"{runs[c]}/final/model.safetensors") for c in (True, False))
    assert weights.keys() == ref.keys()
    assert max((weights[n] - ref[n]).abs().max().item() for n in ref) <= 1e-5
    stats = json.loads((runs[True] / "summary.json").read_text())["compile"]
    # Two graphs, whatever the packs: layer 0's input needs no gradient (LoRA freezes the embeddings), the others' do.
    assert stats == {"graphs": 2, "graph_breaks": 0}, stats
    assert "compile" not in json.loads((runs[False] / "summary.json").read_text())
