"""Memory levers: activation checkpointing policies, and the chunked loss against the plain one.

Run from the repository root (about 3 minutes on a busy two-core CPU machine):

    python benchmarks/memory.py
    python benchmarks/memory.py --tokens 512                  # a quick smoke run
    python benchmarks/memory.py --device cuda                 # on a GPU: adds torch.cuda peaks

(a) Checkpointing policies. A random Qwen3-architecture model (~20M parameters, fp32) on one pack
    of --tokens real tokens (random documents of 64-1024 tokens). For each policy: the bytes autograd
    saves for backward during the forward (zeropad.model.checkpointing.saved_activation_bytes:
    saved-tensor hooks, deduplicated by storage, weights excluded), and the forward + backward time
    (zeropad.train.step.accumulate_gradients, chunked loss on; best of --repeats after a warm-up).

(b) Loss buffers. The peak of tensor memory allocated while the loss's forward and backward run
    (inputs excluded: the hidden states [T, H] and LM-head weight [V, H] exist before), for the
    plain loss (logits [T, V], then cross-entropy) and the chunked loss, at vocabulary 151,936,
    hidden 2048 (Qwen3-1.7B's LM head) and 16,384 tokens, in fp32 and under bf16 autocast.
    Measured with torch's MemTracker (a TorchDispatchMode that counts every storage created and
    freed) on fake tensors (FakeTensorMode: shapes and dtypes only), because the plain loss at
    that size needs more memory than this machine has. The same measurement on real tensors at a
    size that fits (the "real (check)" rows) shows the fake and real peaks agree.

With --device cuda, (a) also reports each step's peak of torch.cuda.max_memory_allocated above the
memory held before it (weights), and (b) measures the full size on real tensors the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, Qwen3Config

import zeropad.model.attention  # noqa: F401  (registers attn_implementation="zeropad_varlen")
from zeropad.config import MemoryConfig
from zeropad.model.checkpointing import activation_context, apply_checkpointing, saved_activation_bytes
from zeropad.pack.collate import IGNORE_INDEX, collate
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.train.loss import chunked_cross_entropy_sum, lm_loss_sum, token_loss_sum
from zeropad.verify import random_documents

MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False)
# (policy, offload_activations)
POLICIES = [("none", False), ("every:2", False), ("selective", False), ("full", False), ("none", True)]
CHUNK_TOKENS = 4096
VOCAB = 151_936
METHODS = {"fake": "MemTracker, fake tensors", "cpu": "MemTracker, real (check)", "cuda": "cuda max_memory_allocated"}
MiB, GiB = 2**20, 2**30


def _doc_lengths(total: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(64, 1025, (1,), generator=gen)), total - sum(lengths)))
    return lengths


def _cuda_peak(fn, device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU while fn runs, above what was allocated before it."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_policies(tokens: int, repeats: int, device: torch.device, attn: str) -> list[dict]:
    rows = []
    for policy, offload in POLICIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3Config(**MODEL), attn_implementation=attn,
                                                 dtype=torch.float32).to(device).train()
        apply_checkpointing(model, policy)
        activations = activation_context(MemoryConfig(offload_activations=offload), device)
        pack = collate(random_documents(MODEL["vocab_size"], _doc_lengths(tokens))).to(device)

        def forward():
            with activations:
                return lm_loss_sum(model, pack.model_inputs(), pack.target_ids[0], CHUNK_TOKENS)

        saved = saved_activation_bytes(forward, params=model.parameters())

        def step():
            accumulate_gradients(StepSetup(model, loss_chunk_tokens=CHUNK_TOKENS, activations=activations), [pack])
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        times, peak = [], None
        for _ in range(1 + repeats):  # the first step warms up
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            peak = _cuda_peak(step, device)
            times.append(time.perf_counter() - t0)
        name = policy + (" + offload" if offload else "")
        rows.append(dict(policy=name, saved=saved, seconds=min(times[1:]), peak=peak,
                         params=sum(p.numel() for p in model.parameters())))
    return rows


def _peak_loss_bytes(chunked: bool, tokens: int, hidden: int, bf16: bool, method: str) -> int:
    """Peak bytes of the tensors the loss's forward + backward allocate (inputs made beforehand)."""
    device = torch.device("cuda" if method == "cuda" else "cpu")
    with FakeTensorMode() if method == "fake" else contextlib.nullcontext():
        hidden_TH = torch.randn(tokens, hidden, device=device, requires_grad=True)
        weight_VH = torch.randn(VOCAB, hidden, device=device, requires_grad=True)
        targets_T = torch.randint(0, VOCAB, (tokens,), device=device)
        targets_T[::10] = IGNORE_INDEX

        def loss_fwd_bwd():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if chunked:
                    loss = chunked_cross_entropy_sum(hidden_TH, weight_VH, None, targets_T, CHUNK_TOKENS)
                else:
                    loss = token_loss_sum(F.linear(hidden_TH, weight_VH), targets_T)
            loss.backward()

        if method == "cuda":
            return _cuda_peak(loss_fwd_bwd, device)
        tracker = MemTracker()
        with tracker:
            loss_fwd_bwd()
        return max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def bench_loss(device: torch.device) -> list[dict]:
    full, check = (16_384, 2048), (1024, 256)
    cases = [(*full, False, "fake"), (*full, True, "fake"), (*check, False, "fake"), (*check, False, "cpu")]
    if device.type == "cuda":
        cases += [(*full, False, "cuda"), (*full, True, "cuda")]
    rows = []
    for tokens, hidden, bf16, method in cases:
        for chunked in (False, True):
            rows.append(dict(loss="chunked" if chunked else "plain", dtype="bf16 autocast" if bf16 else "fp32",
                             tokens=tokens, hidden=hidden, peak=_peak_loss_bytes(chunked, tokens, hidden, bf16, method),
                             method=METHODS[method]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the pack of part (a)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per policy, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--attn", default="zeropad_varlen", help="attn_implementation of part (a)'s model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads{gpu}")

    rows = bench_policies(args.tokens, args.repeats, device, args.attn)
    base = rows[0]
    print(f"\n(a) checkpointing: Qwen3 {base['params'] / 1e6:.1f}M parameters, fp32, one pack of {args.tokens} "
          f"tokens, on {device.type}, {args.attn} attention\n")
    cuda_head, cuda_rule = (" step peak (cuda) |", "------------------|") if device.type == "cuda" else ("", "")
    print(f"| policy           | saved activations | vs none | fwd+bwd s | vs none |{cuda_head}")
    print(f"|------------------|-------------------|---------|-----------|---------|{cuda_rule}")
    for r in rows:
        peak = f" {r['peak'] / MiB:>12.1f} MiB |" if r["peak"] is not None else ""
        print(f"| {r['policy']:<16} | {r['saved'] / MiB:>13.1f} MiB | {r['saved'] / base['saved']:>6.2f}x "
              f"| {r['seconds']:>9.2f} | {r['seconds'] / base['seconds']:>6.2f}x |{peak}")

    loss_rows = bench_loss(device)
    print(f"\n(b) loss buffers at vocabulary {VOCAB:,}: peak of tensors allocated by the loss forward + backward "
          f"(chunks of {CHUNK_TOKENS} tokens)\n")
    print("| loss    | dtype         | tokens | hidden | peak       | plain / chunked | method                    |")
    print("|---------|---------------|--------|--------|------------|-----------------|---------------------------|")
    for plain, chunked in zip(loss_rows[::2], loss_rows[1::2]):
        for r in (plain, chunked):
            ratio = f"{plain['peak'] / chunked['peak']:.1f}x" if r is chunked else ""
            print(f"| {r['loss']:<7} | {r['dtype']:<13} | {r['tokens']:>6} | {r['hidden']:>6} "
                  f"| {r['peak'] / GiB:>6.2f} GiB | {ratio:>15} | {r['method']:<25} |")


if __name__ == "__main__":
    main()
