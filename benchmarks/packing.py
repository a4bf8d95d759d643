"""Packing quality and speed: zeropad's best-fit-decreasing planner against naive packers.

Run from the repository root (takes well under two minutes on two CPU cores):

    python benchmarks/packing.py

For each length set and budget it prints the number of packs, the lower bound
ceil(total tokens / max_tokens), their ratio, the token utilization and the time, for:

  bfd          zeropad.pack.planner.plan_packs (best-fit-decreasing over the whole set)
  bfd-mixed    plan_packs(..., seed=0), what training uses: large samples by decreasing length,
               samples under 1/8 of the budget in seeded random order (so packs mix lengths)
  bfd-stream   zeropad.pack.planner.stream_packs with a 10k-sample window
  next-fit     greedy sequential: fill the current pack in arrival order, start a new one when
               the next sample does not fit (what naive packers do)
  first-fit    arrival order, each sample into the first open pack it fits (segment tree)

"time / bfd" is each method's time divided by the bfd time in the same run. Times are the best
of 5 runs for sets under 100k samples, one run otherwise.

Length sets: lognormal lengths with mean ~300 tokens (sigma 1, clipped to [1, max_tokens]),
10k and 1M samples; 100k lengths uniform in [1, max_tokens] (a harder case: many samples
longer than half a pack); and the real Alpaca samples in ../shared/data/alpaca_en_demo.json when
present, whose lengths are a *proxy* without a tokenizer: characters // 4 + 16 header tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from zeropad.pack.planner import pack_stats, plan_packs, stream_packs

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"
STREAM_BUFFER = 10_000


def lognormal_lengths(n: int, mean: float, max_tokens: int, seed: int = 0) -> np.ndarray:
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2  # so that the lognormal's mean is `mean`
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mu, sigma, n).astype(np.int64), 1, max_tokens)


def alpaca_proxy_lengths() -> np.ndarray | None:
    if not ALPACA.exists():
        return None
    records = json.loads(ALPACA.read_text())
    text = [r["instruction"] + r.get("input", "") + r["output"] for r in records]
    return np.array([len(t) // 4 + 16 for t in text], dtype=np.int64)


def next_fit(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def first_fit(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    # A max segment tree over pack slots: find the leftmost slot with enough room in O(log P).
    # First fit never uses more than 2 * lower_bound + 1 packs (no two packs are both at most
    # half full), so that many slots suffice; unopened slots have the full budget.
    num_slots = 1 << max(1, (2 * math.ceil(int(lengths.sum()) / max_tokens) + 2).bit_length())
    tree = [max_tokens] * (2 * num_slots)
    packs: list[list[int]] = []
    for i, n in enumerate(lengths.tolist()):
        node = 1
        while node < num_slots:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        slot = node - num_slots
        if slot == len(packs):
            packs.append([i])
        else:
            packs[slot].append(i)
        tree[node] -= n
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    return packs


def bfd_stream(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    return list(stream_packs(range(len(lengths)), lengths.__getitem__, max_tokens, STREAM_BUFFER))


METHODS: dict[str, Callable[[np.ndarray, int], list[list[int]]]] = {
    "bfd": plan_packs,
    "bfd-mixed": lambda lengths, max_tokens: plan_packs(lengths, max_tokens, seed=0),
    "bfd-stream": bfd_stream,
    "next-fit": next_fit,
    "first-fit": first_fit,
}


def main() -> None:
    length_sets: list[tuple[str, int, np.ndarray]] = []
    for max_tokens in (8192, 4096):
        for n in (10_000, 1_000_000):
            lognormal = lognormal_lengths(n, 300, max_tokens)
            length_sets.append((f"lognormal {n:,}", max_tokens, lognormal))
        uniform = np.random.default_rng(0).integers(1, max_tokens + 1, 100_000)
        length_sets.append(("uniform 100,000", max_tokens, uniform))
    alpaca = alpaca_proxy_lengths()
    if alpaca is not None:
        for max_tokens in (8192, 4096):
            length_sets.append(("alpaca proxy 999", max_tokens, alpaca))
    else:
        print(f"(Alpaca data not found at {ALPACA}; skipping it)\n")

    header = ("lengths", "max_tokens", "method", "packs", "lower bound", "packs/bound",
              "utilization", "time s", "time / bfd")
    rows: list[tuple[str, ...]] = []
    for name, max_tokens, lengths in length_sets:
        bfd_seconds = None
        for method, pack in METHODS.items():
            seconds = math.inf
            for _ in range(5 if len(lengths) < 100_000 else 1):
                start = time.perf_counter()
                packs = pack(lengths, max_tokens)
                seconds = min(seconds, time.perf_counter() - start)
            bfd_seconds = bfd_seconds or seconds
            stats = pack_stats(lengths, packs, max_tokens)
            assert stats.num_samples == len(lengths) and stats.num_tokens == int(lengths.sum())
            rows.append((name, f"{max_tokens}", method, f"{stats.num_packs:,}",
                         f"{stats.lower_bound:,}", f"{stats.num_packs / stats.lower_bound:.4f}",
                         f"{100 * stats.utilization:.2f}%", f"{seconds:.3f}",
                         f"{seconds / bfd_seconds:.2f}"))
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    left = {0, 2}  # text columns; numbers are right-aligned

    def fmt(row: tuple[str, ...]) -> str:
        cells = zip(row, widths)
        return "  ".join(s.ljust(w) if c in left else s.rjust(w) for c, (s, w) in enumerate(cells))

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    previous = None
    for row in rows:
        if previous is not None and row[:2] != previous[:2]:
            print()
        print(fmt(row))
        previous = row


if __name__ == "__main__":
    main()
