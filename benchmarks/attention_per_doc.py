"""Per-document SDPA on CPU, one attention layer's forward + backward: documents cut by one torch.split, runs of
equal-length documents batched (now), against one slice and one SDPA call per document (before), in the same run.

    python benchmarks/attention_per_doc.py             # ~1 minute on a busy two-core machine
    python benchmarks/attention_per_doc.py --reps 30   # steadier medians

Shapes are those of benchmarks/throughput.py's model (8 query heads, 4 KV heads, head_dim 64, fp32) on packs of
2048 tokens: Alpaca-like documents (lengths drawn around the real data's mean of 195), and many short ones
(where the per-document overhead shows). In backward, each slice scatters its gradient into a zero tensor of
the whole pack (n documents: O(n T) memory traffic), where a split's backward is one concatenation; the short
documents, all of one length, are one batched SDPA call. Both give the same gradients, bit for bit (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zeropad.model.attention import _Features, _sdpa_per_doc


def sdpa_sliced(q_BHTD, k_BHTD, v_BHTD, bounds: list[int], feats: _Features) -> torch.Tensor:
    """The code before: one slice per document (no window: the packs below have none)."""
    gqa = q_BHTD.shape[1] != k_BHTD.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[:, :, start:end] for x in (q_BHTD, k_BHTD, v_BHTD))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=feats.scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def lengths_for(kind: str, total: int, rng: torch.Generator) -> list[int]:
    if kind == "short":
        return [16] * (total // 16)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(40, 350, (1,), generator=rng)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def time_layers(fns, lengths: list[int], reps: int, heads=8, kv_heads=4, dim=64) -> list[tuple[float, torch.Tensor]]:
    """Per function: median seconds of one forward + backward, and its gradients (for the equality check). The
    functions take turns rep by rep, so load from other processes falls on all of them."""
    T = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    feats = _Features(scaling=dim ** -0.5, sliding_window=None, softcap=None, sinks=None, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    # [1, H, T, D] views of [1, T, H, D] projections, as transformers hands them to the attention
    q, k, v = (torch.randn(1, T, h, dim, generator=g).transpose(1, 2).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(1, heads, T, dim, generator=g)
    times: list[list[float]] = [[] for _ in fns]
    grads = []
    for rep in range(reps + 1):  # the first is warm-up
        for i, fn in enumerate(fns):
            for x in (q, k, v):
                x.grad = None
            t0 = time.perf_counter()
            fn(q, k, v, bounds, feats).backward(grad_out)
            times[i].append(time.perf_counter() - t0)
            if rep == 0:
                grads.append(torch.cat([x.grad.flatten() for x in (q, k, v)]))
    return [(statistics.median(t[1:]), grad) for t, grad in zip(times, grads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = torch.Generator().manual_seed(0)
    print(f"one attention layer, forward + backward, median of {args.reps}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("| pack | docs | sliced (before) ms | split (now) ms | speed-up |")
    print("|---|---|---|---|---|")
    for kind in ("alpaca-like", "short"):
        lengths = lengths_for(kind, args.tokens, rng)
        (before, ref), (now, grads) = time_layers([sdpa_sliced, _sdpa_per_doc], lengths, args.reps)
        assert torch.equal(grads, ref), "split and sliced gradients differ"
        print(f"| {kind} | {len(lengths)} | {before * 1e3:.1f} | {now * 1e3:.1f} | {before / now:.2f}x |")


if __name__ == "__main__":
    main()
