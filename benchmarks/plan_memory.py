"""The memory planner against measurement.

CPU (always): predicted saved-activation bytes vs the bytes autograd saves for backward
(`saved_activation_bytes`, deduplicated by storage), per checkpointing policy and token budget.
GPU (--gpu): a Qwen3-1.7B-shape model, zeropad's bf16 (fp32 weights, autocast), one training step
per policy: predicted peak vs torch.cuda.max_memory_allocated.

    python benchmarks/plan_memory.py [--gpu] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import tiny_model  # noqa: E402

from zeropad.config import build_config  # noqa: E402
from zeropad.data.chat import Sample  # noqa: E402
from zeropad.model.checkpointing import activation_context, apply_checkpointing, saved_activation_bytes  # noqa: E402
from zeropad.pack.collate import collate  # noqa: E402
from zeropad.plan.arch import arch_of  # noqa: E402
from zeropad.plan.memory import FRAMEWORK_OVERHEAD, GB, Setup, activations, device_total, plan  # noqa: E402
from zeropad.train.step import StepSetup, accumulate_gradients, forward_loss_sum  # noqa: E402
from zeropad.train.optim import build_optimizer, build_scheduler  # noqa: E402

POLICIES = ["none", "selective", "every:2", "full"]
MEDIUM = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32)
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=40960)


def make_pack(num_tokens: int, vocab: int, doc_tokens: int = 1024):
    """Documents of up to `doc_tokens` tokens filling `num_tokens` exactly."""
    rng = np.random.default_rng(0)
    lengths = [doc_tokens] * (num_tokens // doc_tokens) + ([num_tokens % doc_tokens] if num_tokens % doc_tokens else [])
    return collate([Sample(rng.integers(0, vocab, n).astype(np.int32), np.ones(n, dtype=bool)) for n in lengths])


def _cpu_row(name: str, model_type: str, overrides: dict, precision: str, policy: str, tokens: int,
             chunk: int | None) -> str:
    model = tiny_model(model_type, **overrides)
    apply_checkpointing(model, policy)
    pack = make_pack(tokens, model.config.vocab_size, doc_tokens=tokens // 3 + 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    measured = saved_activation_bytes(lambda: forward_loss_sum(model, pack, autocast, chunk), model.parameters())
    setup = Setup(precision=precision, checkpointing=policy, chunked_loss=chunk is not None,
                  loss_chunk_tokens=chunk or 1)
    rows = {r.name: r.device for r in activations(arch_of(model), setup, tokens)}
    # saved for backward as the activations are: autocast's weight copies, the chunked loss's head gradient
    predicted = (rows[f"activations ({policy})"] + rows.get("autocast bf16 weight copies", 0)
                 + rows.get("LM-head gradient (chunked loss)", 0))
    loss = f"chunked {chunk}" if chunk else "plain"
    return (f"| {name} | {precision} | {policy} | {loss} | {tokens} | {predicted / 1e6:.3f} MB "
            f"| {measured / 1e6:.3f} MB | {(predicted - measured) / measured:+.1%} |")


def cpu_table() -> None:
    print("| model | dtype | policy | loss | tokens | predicted | measured | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in (("qwen3 tiny (h64, 2 layers)", {}), ("qwen3 medium (h256, 4 layers)", MEDIUM)):
        for policy in POLICIES:
            for tokens, chunk in ((256, None), (1024, None), (1024, 256)):
                print(_cpu_row(name, "qwen3", overrides, "fp32", policy, tokens, chunk), flush=True)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
               mlp_only_layers=[])
    for name, model_type, overrides in (("llama medium", "llama", MEDIUM), ("qwen3 medium", "qwen3", MEDIUM),
                                        ("qwen3_moe medium, 2 of 4 experts", "qwen3_moe", {**MEDIUM, **moe})):
        for precision in ("fp32", "bf16"):
            for chunk in (None, 256):
                if model_type != "qwen3" or precision == "bf16":
                    print(_cpu_row(name, model_type, overrides, precision, "none", 1024, chunk), flush=True)


def gpu_table(tokens: int, kv_heads: int, runs: list[str]) -> None:
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}. Qwen3-1.7B shape, zeropad bf16 (fp32 weights, "
          f"autocast), {kv_heads} KV heads, AdamW, chunked loss (4096 tokens), {tokens} tokens per pack in documents "
          "of 1024")
    print("| policy | predicted peak | max_memory_allocated | error | of which optimizer step | step s |")
    print("|---|---|---|---|---|---|")
    cfg = build_config({"train": {"dtype": "bf16", "lr": 1e-5}})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for run in runs:
        policy, offload = run.removesuffix("+offload"), run.endswith("+offload")
        torch.manual_seed(0)
        with device:
            model = tiny_model("qwen3", **{**QWEN3_1_7B, "num_key_value_heads": kv_heads})
        apply_checkpointing(model, policy)
        a = arch_of(model)
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        pack = make_pack(tokens, a.vocab).to(device)
        memory = build_config({"memory": {"offload_activations": offload}}).memory
        context = activation_context(memory, device)
        name = policy + (" + offload" if offload else "")
        try:
            measured, optimizer_step, seconds = _measure_step(model, optimizer, scheduler, pack, autocast, context)
        except torch.utils.checkpoint.CheckpointError as err:
            print(f"| {name} | failed: {str(err).splitlines()[1]} |||||", flush=True)
            continue
        finally:
            del model, optimizer, scheduler, pack
            torch.cuda.empty_cache()
        setup = Setup(precision="bf16", checkpointing=policy, offload_activations=offload, chunked_loss=True,
                      loss_chunk_tokens=4096)
        predicted = device_total(plan(a, setup, tokens)) - FRAMEWORK_OVERHEAD  # the allocator does not see it
        print(f"| {name} | {predicted / GB:.2f} GB | {measured / GB:.2f} GB | {(predicted - measured) / measured:+.1%} "
              f"| {optimizer_step / GB:.2f} GB | {seconds:.2f} |", flush=True)
    free, total = torch.cuda.mem_get_info()
    print(f"outside the allocator (CUDA context, cuBLAS workspaces; driver view): "
          f"{(total - free - torch.cuda.memory_reserved()) / GB:.2f} GB")


def _measure_step(model, optimizer, scheduler, pack, autocast, context) -> tuple[int, int, float]:
    """Peak bytes of a training step (the second: the first allocates the optimizer state), the optimizer
    step's own peak, and the step's seconds."""
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        accumulate_gradients(StepSetup(model, autocast=autocast, loss_chunk_tokens=4096, activations=context), [pack])
        torch.cuda.synchronize()
        forward_backward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        optimizer_step = torch.cuda.max_memory_allocated()
    return max(forward_backward, optimizer_step), optimizer_step, seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    # torch < 2.13's varlen_attn has no enable_gqa: there, run the shape with as many KV heads as heads
    parser.add_argument("--kv-heads", type=int, default=QWEN3_1_7B["num_key_value_heads"])
    parser.add_argument("--runs", default=",".join([*POLICIES, "none+offload"]), help="policies, comma-separated")
    args = parser.parse_args()
    if args.gpu:
        gpu_table(args.tokens, args.kv_heads, args.runs.split(","))
    else:
        cpu_table()
