"""`zeropad plan` with sequence parallelism (parallel.sp_size = K): a device's activations are those of its
ceil(T/K) tokens, attention's in the head-scattered layout, and the planner's figures per rank against the bytes
autograd saves on 2 gloo ranks (benchmarks/sp_memory.py at a small size, one torchrun launch)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from zeropad.config import build_config
from zeropad.errors import ConfigError
from zeropad.plan.arch import Arch
from zeropad.plan.memory import PRECISIONS, Setup, activations, layer_bytes_per_token
from zeropad.plan.report import run

QWEN3 = dict(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
# Qwen3-8B's decoder shape (parameter counts do not enter activations)
ARCH = Arch(num_layers=36, hidden=4096, intermediate=12288, num_heads=32, num_kv_heads=8, head_dim=128,
            vocab=151936, qk_norm=True, num_moe_layers=0, num_experts=0, experts_per_token=0, moe_intermediate=0,
            shared_intermediate=0, num_params=0, num_trainable_params=0, num_active_params=0, num_expert_params=0,
            num_matmul_params=0, num_active_matmul_params=0, num_head_params=0, max_layer_params=0)
TOKENS = 131072


def _rows(a: Arch, **setup) -> dict[str, float]:
    return {r.name: r.device for r in activations(a, Setup(**setup), TOKENS)}


def test_sp_on_the_cuda_path_adds_o_proj_inputs_and_repeated_kv_heads():
    """The kernel's output is o_proj's input without SP; with SP o_proj saves the returning all-to-all's output
    (one more [T/K, H*D] per layer). With fewer KV heads than K, each rank attends a repeated copy of one."""
    per_layer_token = lambda rows, tokens: rows["activations (none)"] / tokens / ARCH.num_layers  # noqa: E731
    setup = dict(precision="bf16", chunked_loss=True)
    one, two = _rows(ARCH, **setup), _rows(ARCH, **setup, sp_size=2)
    half = {r.name: r.device for r in activations(ARCH, Setup(**setup), TOKENS // 2)}
    q_bytes = ARCH.num_heads * ARCH.head_dim * 2  # bf16
    assert per_layer_token(two, TOKENS // 2) - per_layer_token(half, TOKENS // 2) == pytest.approx(q_bytes)
    assert 0.5 < two["activations (none)"] / one["activations (none)"] < 0.55  # "about half"
    assert two["backward working set"] == pytest.approx(one["backward working set"] / 2 + TOKENS / 2 * q_bytes)
    assert two["loss buffers (chunked)"] == one["loss buffers (chunked)"]  # one chunk of 4096 tokens either way
    # per local token, attention's saved bytes are those of 2 x 32 query heads and 2 x max(KV heads, K) KV heads
    def attn(kv: int, k: int) -> int:
        arch = replace(ARCH, num_kv_heads=kv)
        return layer_bytes_per_token(arch, PRECISIONS["bf16"], False, k)[0]["attention q, k, v, out, lse"]

    expected = lambda kv_heads: (2 * 32 + 2 * kv_heads) * ARCH.head_dim * 2 + 4 * 32  # noqa: E731
    assert [attn(8, 1), attn(8, 8), attn(8, 16), attn(1, 1), attn(1, 2)] == [
        expected(8), expected(8), expected(16), expected(1), expected(2)]


def _plan(devices: int, sp_size: int) -> str:
    cfg = build_config({"model": {"config": QWEN3}, "pack": {"max_tokens": 1001},
                        "train": {"device": "cpu"}, "parallel": {"strategy": "fsdp", "sp_size": sp_size}})
    return run(cfg, num_devices=devices, device_memory="4GB", strategy=None, precision="fp32", optimizer="adamw",
               as_json=False)


def test_plan_command_reads_sp_size_and_refuses_what_cannot_split():
    text = _plan(4, 2)
    assert "sequence parallel x 2: 501 tokens per device" in text.splitlines()[1], text
    assert "501 tokens per device (sequence parallel x 2)" in text
    assert "sequence parallel" not in _plan(4, 1)
    with pytest.raises(ConfigError, match=r"parallel.sp_size \(4\) must divide --devices \(6\)"):
        _plan(6, 4)
    with pytest.raises(ConfigError, match="sp_size=3 must divide the model's 4 attention heads"):
        _plan(3, 3)


def test_predicted_bytes_per_rank_match_two_gloo_ranks(tmp_path):
    """benchmarks/sp_memory.py's ranks at 384 tokens (documents crossing the split), one torchrun launch: saved
    bytes measured at sp_size 1 and per rank at sp_size 2 within 10% of the plan, and sp_size 2 about half of 1."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "sp_memory.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--worker", "--tokens", "384", "--runs", "none:chunked"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    decoder = json.JSONDecoder()  # two ranks share the pipe: a record need not start or end its line
    rows = [decoder.raw_decode(part)[0] for part in done.stdout.split("RESULT ")[1:]]
    assert sorted((r["sp_size"], r["rank"], r["rank_tokens"]) for r in rows) == [(1, 0, 384), (2, 0, 192), (2, 1, 192)]
    assert all(r["split_inside_document"] for r in rows)
    for r in rows:
        assert abs(r["measured"] - r["predicted"]) <= 0.10 * r["measured"], r
    one = next(r["measured"] for r in rows if r["sp_size"] == 1)
    assert all(0.45 <= r["measured"] / one <= 0.55 for r in rows if r["sp_size"] == 2)
