"""Packed varlen vs padded batches on one CUDA GPU (bf16 autocast): real tokens/s, MFU, peak memory.

    python benchmarks/gpu_throughput.py                     # Qwen3-1.7B shape, 8k-token packs
    python benchmarks/gpu_throughput.py --max-tokens 16384 --methods padded,zeropad,zeropad-step,zeropad-compiled
    python benchmarks/gpu_throughput.py --layers 4 --steps 3  # a quick smoke run
    python benchmarks/gpu_throughput.py --device cpu --tiny --steps 2 --warmup 1   # the script's logic, on a CPU

A random Qwen3-1.7B-shape model (fp32 master weights, bf16 autocast, AdamW) trains on documents
whose lengths follow a long-tailed (lognormal) chat-data distribution. zeropad: documents packed
best-fit into packs of --max-tokens real tokens, attn_implementation="zeropad_varlen" (torch
varlen_attn or flash-attn). Baseline, in the same run: batches of --batch-size documents padded
to the longest with an attention mask and sdpa, as the Hugging Face Trainer does by default.
MFU counts model FLOPs of real tokens only (6·N·tokens + causal attention), against the dense
bf16 peak of the device.

Methods, each optimisation switched on one at a time (--methods): `padded`; `zeropad`, packs through the model's
own logits and a plain cross-entropy; `zeropad-step`, what `zeropad train` runs: train/step.train_step (the
chunked loss with the LM head on target rows only, each weight cast to bf16 once per step, one host read,
gradient clipping, fused AdamW); `zeropad-compiled`, the same with train.compile (each decoder layer compiled;
its compile falls in the warm-up steps, so give it --warmup 3 or more). Its graphs and graph breaks are reported:
one graph for every pack, whatever its length and longest document, is what train.compile promises.

Last, a sync check: a few of zeropad's own training steps (train/step.train_step, after one to warm up) run
under torch.cuda.set_sync_debug_mode("warn"), which warns at every operation that makes the host wait for
the device; the step is meant to have exactly one, the read of its statistics.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import zeropad.model.attention  # noqa: F401  (registers zeropad_varlen)
from zeropad.data.chat import Sample
from zeropad.pack.collate import IGNORE_INDEX, collate
from zeropad.pack.planner import plan_packs, shuffle_packs
from zeropad.config import MemoryConfig, TrainConfig
from zeropad.model.compile import compile_layers, compile_stats
from zeropad.train.step import StepSetup, train_step
from zeropad.train.metrics import FlopCounter, peak_tflops
from zeropad.train.optim import build_optimizer, build_scheduler

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True)


def documents(n: int, vocab: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.6, 0.8, n).astype(int), 16, 2048)  # median ~270, long tail
    return [Sample(rng.integers(0, vocab, n_tok, dtype=np.int32), np.ones(n_tok, dtype=bool)) for n_tok in lengths]


METHODS = ("padded", "zeropad", "zeropad-step", "zeropad-compiled")
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=40960, tie_word_embeddings=True)  # --tiny: a smoke run's shape


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_setup(model, device: torch.device, compiled: bool = False) -> StepSetup:
    """zeropad's own step, as `zeropad train` builds it for bf16 with the default chunked loss."""
    if compiled:
        compile_layers(model)
    cfg = TrainConfig(lr=1e-5, grad_clip=1.0)
    optimizer = build_optimizer(model, cfg)
    return StepSetup(model, optimizer, build_scheduler(optimizer, cfg), torch.autocast(device.type, dtype=torch.bfloat16),
                     cfg.grad_clip, loss_chunk_tokens=MemoryConfig().loss_chunk_tokens)


def _padded_batch(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(d) for d in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, d in enumerate(batch):
        ids[row, : len(d)] = torch.from_numpy(d.input_ids.astype(np.int64))
        mask[row, : len(d)] = 1
    return ids.to(device), mask.to(device)


def _plain_step(method: str, model, optimizer, batch, device) -> tuple[int, int]:
    """One step of `padded` or `zeropad` (the model's logits, plain cross-entropy); (real, computed) tokens."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if method == "zeropad":
            pack = collate(batch).to(device)
            logits = model(**pack.model_inputs()).logits[0]
            loss = F.cross_entropy(logits.float(), pack.target_ids[0], ignore_index=IGNORE_INDEX)
            counts = pack.num_tokens, pack.num_tokens
        else:
            ids, mask = _padded_batch(batch, device)
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            counts = int(mask.sum()), ids.numel()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counts


def run(method: str, model, docs, args, flops: FlopCounter, peak: float) -> dict:
    device = torch.device(args.device)
    if method.startswith("zeropad"):
        plan = shuffle_packs(plan_packs([len(d) for d in docs], args.max_tokens, seed=0), 0)
        batches = [[docs[i] for i in idx] for idx in plan]
    else:
        order = np.random.default_rng(0).permutation(len(docs)).tolist()
        batches = [[docs[i] for i in order[j:j + args.batch_size]] for j in range(0, len(order), args.batch_size)]
    model.set_attn_implementation("zeropad_varlen" if method.startswith("zeropad") else "sdpa")
    if method.startswith("zeropad-"):
        setup = _step_setup(model, device, compiled=method == "zeropad-compiled")
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, real, computed, model_flops = [], 0, 0, 0.0
    for step, batch in enumerate(batches[: args.warmup + args.steps]):
        _sync(device)
        t0 = time.perf_counter()
        if method.startswith("zeropad-"):
            pack = collate(batch).to(device)
            train_step(setup, [pack])
            n_real = n_computed = pack.num_tokens
        else:
            n_real, n_computed = _plain_step(method, model, optimizer, batch, device)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            real, computed = real + n_real, computed + n_computed
            model_flops += flops([len(d) for d in batch])
    seconds = sum(times)
    return dict(method=method, steps=len(times), real=real, computed=computed, seconds=seconds,
                tok_s=real / seconds, median_step=statistics.median(times), mfu=model_flops / seconds / (peak * 1e12),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan)


def sync_check(model, docs, args, steps: int = 3) -> list[int]:
    """Host syncs in each of `steps` zeropad training steps (bf16 autocast, grad clipping, fused AdamW), counted
    as torch's sync debug warnings; the packs are on the device before counting starts."""
    device = torch.device("cuda")
    model.set_attn_implementation("zeropad_varlen")
    setup = _step_setup(model, device)
    plan = plan_packs([len(d) for d in docs], args.max_tokens, seed=1)[: steps + 1]
    packs = [collate([docs[i] for i in idx]).to(device) for idx in plan]
    train_step(setup, [packs[0]])  # warm-up: first-call allocations and kernel selection
    torch.cuda.synchronize()
    counts = []
    for pack in packs[1:]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(setup, [pack])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)  # 8 padded to 2048 runs out of memory
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="zeropad,padded", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself (no MFU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (hidden 128, vocab 4k): a smoke run")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    # compiling changes the model in place: the compiled method runs last
    methods.sort(key=lambda m: m == "zeropad-compiled")
    device = torch.device(args.device)
    assert device.type != "cuda" or torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --device cpu)"
    # cuDNN attention builds an execution plan per new shape, and padded batches change shape every
    # step: give the baseline the memory-efficient SDPA kernel instead, its fastest stock path here.
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", num_hidden_layers=args.layers, **(TINY if args.tiny else QWEN3_1_7B))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="zeropad_varlen").to(device)
    model.config.use_cache = False
    model.activation_checkpointing_disable()
    peak = peak_tflops(device, None) or (989.0 if device.type == "cuda" else math.nan)  # a CPU smoke run: no MFU
    docs = documents(4000, config.vocab_size)
    flops = FlopCounter(model)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    print(f"{name} | torch {torch.__version__} | {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"params | {args.layers} layers | packs of {args.max_tokens} vs padded batches of {args.batch_size} | "
          f"peak {peak} TFLOP/s bf16")
    results = []
    for method in methods:
        if method == "zeropad-compiled" and device.type == "cuda":
            report_syncs(model, docs, args)  # before the layers are compiled
        results.append(run(method, model, docs, args, flops, peak))
    base = next((r for r in results if r["method"] == "padded"), results[0])
    print(f"| method | steps | real tokens | computed | fill | real tok/s | vs {base['method']} | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['steps']} | {r['real']:,} | {r['computed']:,} | {r['real'] / r['computed']:.1%} | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['mfu']:.1%} | {r['peak_gib']:.1f} |")
    if "zeropad-compiled" in methods:
        # Every pack has its own length, document count and longest document: one graph for the decoder layers
        # (they share a class) and no break is what train.compile promises; more graphs are recompiles.
        stats = compile_stats()
        verdict = "as designed" if stats == {"graphs": 1, "graph_breaks": 0} else "RECOMPILES OR BREAKS"
        print(f"train.compile over {args.warmup + args.steps} packs of different shapes: {stats['graphs']} graph(s), "
              f"{stats['graph_breaks']} graph break(s) (expected 1 and 0: {verdict})")
    if device.type == "cuda" and "zeropad-compiled" not in methods:
        report_syncs(model, docs, args)


def report_syncs(model, docs, args) -> None:
    counts = sync_check(model, docs, args)
    verdict = "as designed" if all(c == 1 for c in counts) else "MORE THAN THE ONE READ OF THE STEP'S STATISTICS"
    print(f"sync check: host syncs per zeropad training step {counts} (expected 1 each: {verdict})")


if __name__ == "__main__":
    main()
