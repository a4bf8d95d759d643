"""Bin packing of samples into packs of at most `max_tokens` tokens.

A pack is a list of sample indices whose lengths sum to at most `max_tokens`; collate turns it
into one flat sequence with no padding. The fewer packs, the fewer wasted token slots, so the
planner uses best-fit-decreasing (BFD): place the longest samples first, each into the open
pack whose remaining capacity is the smallest that still fits it. Like first-fit-decreasing,
BFD uses at most 11/9 OPT + O(1) packs (Johnson 1973); on training-length distributions it
lands within a fraction of a percent of the lower bound ceil(total / max_tokens).

Speed: remaining capacities are integers in [0, max_tokens], so the open packs are grouped by
remaining capacity: a sorted list of the *distinct* capacities (searched with bisect) and a
dict capacity -> min-heap of pack ids (so ties go to the earliest pack). Each placement is one
bisect, a heap pop/push and, when a capacity value appears or disappears, one insertion into or
deletion from a list of at most max_tokens + 1 ints. 1M samples pack in about a second.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# plan_packs with a seed: samples up to this fraction of the budget are placed in random order.
SMALL_FRACTION = 1 / 8
# stream_packs: a window's packs filled below this fraction are candidates for carrying into
# the next window, where new samples can top them up.
CARRY_BELOW_FILL = 0.98
# stream_packs: at most this fraction of buffer_size samples is carried, bounding memory.
CARRY_MAX_FRACTION = 0.25


def _check_lengths(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> np.ndarray:
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lengths_N = np.asarray(lengths)
    if lengths_N.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths_N.shape}")
    if lengths_N.size == 0:
        return lengths_N.astype(np.int64)
    if not np.issubdtype(lengths_N.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths_N.dtype}")
    lengths_N = lengths_N.astype(np.int64)
    too_long = np.flatnonzero(lengths_N > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"sample {i} has {int(lengths_N[i])} tokens, more than max_tokens={max_tokens} "
            f"({too_long.size} sample(s) too long): raise max_tokens or truncate/drop them"
        )
    negative = np.flatnonzero(lengths_N < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"sample {i} has negative length {int(lengths_N[i])}")
    return lengths_N


def plan_packs(lengths: Sequence[int] | np.ndarray, max_tokens: int, seed: int | None = None) -> list[list[int]]:
    """Best-fit-decreasing: indices of samples per pack.

    Every length must be <= max_tokens (ValueError otherwise). Deterministic: samples are
    placed in order of decreasing length, ties broken by index (stable sort); among open packs
    with the same remaining capacity the earliest opened one is used. Within a pack,
    indices are in placement order. Packs are in the order they were opened.

    With a `seed`, samples of at most SMALL_FRACTION * max_tokens are placed after the large
    ones in a seeded random order instead of by decreasing length. Pure BFD fills each pack
    with samples of nearly the same length, so on data where length tracks content (short
    answers, one task type) every micro-step sees one kind of sample; best fit over small
    items in random order fills the gaps left by the large ones just as well (within ~0.05%
    of the packs, see benchmarks/packing.py) and mixes them.
    """
    lengths_N = _check_lengths(lengths, max_tokens)
    if lengths_N.size == 0:
        return []
    order = np.argsort(-lengths_N, kind="stable")
    if seed is not None:
        num_large = int(np.count_nonzero(lengths_N > SMALL_FRACTION * max_tokens))
        small = np.random.default_rng(seed).permutation(order[num_large:])
        order = np.concatenate([order[:num_large], small])
    sorted_lengths = lengths_N[order].tolist()
    order_list = order.tolist()
    # A pack whose remaining capacity is below the shortest sample can never take another one:
    # stop tracking it.
    min_len = int(lengths_N.min())

    packs: list[list[int]] = []
    caps: list[int] = []  # distinct remaining capacities of open packs, ascending
    open_by_cap: dict[int, list[int]] = {}  # remaining capacity -> min-heap of pack ids
    bisect_left, insort = bisect.bisect_left, bisect.insort
    heappop, heappush = heapq.heappop, heapq.heappush

    for idx, length in zip(order_list, sorted_lengths):
        pos = bisect_left(caps, length)
        if pos == len(caps):
            pack_id = len(packs)
            packs.append([idx])
            remaining = max_tokens - length
        else:
            cap = caps[pos]
            heap = open_by_cap[cap]
            pack_id = heappop(heap)
            if not heap:
                del open_by_cap[cap]
                del caps[pos]
            packs[pack_id].append(idx)
            remaining = cap - length
        if remaining >= min_len:
            heap = open_by_cap.get(remaining)
            if heap is None:
                open_by_cap[remaining] = [pack_id]
                insort(caps, remaining)
            else:
                heappush(heap, pack_id)
    return packs


def shuffle_packs(packs: list[list[int]], seed: int, epoch: int = 0) -> list[list[int]]:
    """A seeded permutation of the pack order (the packs themselves are not changed).

    Uses np.random.default_rng((seed, epoch)), so each (seed, epoch) gives one fixed order and
    epochs differ from each other.
    """
    rng = np.random.default_rng((seed, epoch))
    return [packs[i] for i in rng.permutation(len(packs)).tolist()]


def stream_packs(
    items: Iterable[T], length: Callable[[T], int], max_tokens: int, buffer_size: int, seed: int | None = None
) -> Iterator[list[T]]:
    """Streaming BFD for data that does not fit in memory.

    Reads a window of `buffer_size` items, packs it with plan_packs and yields its packs. The
    least-full packs of a window (filled below CARRY_BELOW_FILL) are not yielded but carried
    into the next window, so the next window's samples can top them up; at most
    CARRY_MAX_FRACTION * buffer_size items are carried, and an item is carried at most once,
    so every item is yielded no later than one window after it was read. The last window
    yields everything. Items within a window are yielded in BFD order, not reading order.
    """
    if buffer_size <= 0:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    max_carried = int(CARRY_MAX_FRACTION * buffer_size)
    carried: list[tuple[T, int]] = []  # (item, length) held over from the previous window
    window: list[tuple[T, int]] = []
    for position, item in enumerate(items):
        n = int(length(item))
        if n > max_tokens or n < 0:
            raise ValueError(
                f"item {position} of the stream has length {n}, outside [0, {max_tokens}]: "
                "raise max_tokens or truncate/drop it"
            )
        window.append((item, n))
        if len(window) == buffer_size:
            packs, carried = _pack_window(carried, window, max_tokens, max_carried, seed)
            yield from packs
            window = []
    packs, _ = _pack_window(carried, window, max_tokens, 0, seed)
    yield from packs


def _pack_window(
    carried: list[tuple[T, int]],
    window: list[tuple[T, int]],
    max_tokens: int,
    max_carried: int,
    seed: int | None = None,
) -> tuple[list[list[T]], list[tuple[T, int]]]:
    """Packs carried + window items; returns (packs to yield, items to carry onwards)."""
    entries = carried + window
    lengths = [n for _, n in entries]
    packs = plan_packs(lengths, max_tokens, seed)
    num_carried_in = len(carried)  # entries[:num_carried_in] were carried once already
    fills = [sum(lengths[i] for i in pack) for pack in packs]
    carry_ids: set[int] = set()
    num_to_carry = 0
    # Least full first; a pack holding an already-carried item is never carried again.
    for pack_id in sorted(range(len(packs)), key=lambda p: (fills[p], p)):
        pack = packs[pack_id]
        if fills[pack_id] >= CARRY_BELOW_FILL * max_tokens:
            break
        if num_to_carry + len(pack) > max_carried:
            break
        if any(i < num_carried_in for i in pack):
            continue
        carry_ids.add(pack_id)
        num_to_carry += len(pack)
    out = [[entries[i][0] for i in pack] for p, pack in enumerate(packs) if p not in carry_ids]
    carry = [entries[i] for p in sorted(carry_ids) for i in packs[p]]
    return out, carry


@dataclass
class PackStats:
    """How well a packing uses its token budget."""

    num_samples: int
    num_tokens: int
    num_packs: int
    lower_bound: int  # ceil(num_tokens / max_tokens): no packing can use fewer packs
    utilization: float  # num_tokens / (num_packs * max_tokens)
    max_tokens: int

    @property
    def packs_over_bound(self) -> float:
        return self.num_packs / self.lower_bound if self.lower_bound else 1.0

    def table(self) -> str:
        rows = [
            ("samples", f"{self.num_samples:,}"),
            ("tokens", f"{self.num_tokens:,}"),
            ("max tokens / pack", f"{self.max_tokens:,}"),
            ("packs", f"{self.num_packs:,}"),
            ("lower bound", f"{self.lower_bound:,}"),
            ("packs / lower bound", f"{self.packs_over_bound:.4f}"),
            ("utilization", f"{100 * self.utilization:.2f}%"),
        ]
        width_name = max(len(name) for name, _ in rows)
        width_value = max(len(value) for _, value in rows)
        return "\n".join(f"{name:<{width_name}}  {value:>{width_value}}" for name, value in rows)


def pack_stats(
    lengths: Sequence[int] | np.ndarray, packs: list[list[int]], max_tokens: int
) -> PackStats:
    """Statistics of `packs` (indices into `lengths`) against the budget `max_tokens`."""
    lengths_N = np.asarray(lengths, dtype=np.int64)
    num_samples = sum(len(pack) for pack in packs)
    if num_samples:
        flat = np.fromiter((i for pack in packs for i in pack), dtype=np.int64, count=num_samples)
        num_tokens = int(lengths_N[flat].sum())
    else:
        num_tokens = 0
    num_packs = len(packs)
    return PackStats(
        num_samples=num_samples,
        num_tokens=num_tokens,
        num_packs=num_packs,
        lower_bound=math.ceil(num_tokens / max_tokens),
        utilization=num_tokens / (num_packs * max_tokens) if num_packs else 0.0,
        max_tokens=max_tokens,
    )


@dataclass
class RankAssignment:
    """One optimizer step's packs split over data-parallel ranks."""

    packs_by_rank: list[list[int]]  # pack positions (into the step's packs) per rank, in input order
    token_imbalance: float  # max / mean real tokens per rank (1.0 = perfectly even)
    attention_imbalance: float  # max / mean of Σ document_length² per rank


def _imbalance(loads: list[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def assign_packs_to_ranks(pack_doc_lengths: Sequence[Sequence[int]], world_size: int) -> RankAssignment:
    """Split one optimizer step's packs over ranks: each rank gets the same number of packs
    (micro-steps), with real tokens and attention cost (Σ len²) balanced.

    Longest-processing-time-first greedy (Graham 1969) under a cardinality constraint: packs in
    order of decreasing (tokens, Σ len²), ties by position, each to the rank with the smallest
    load among those that still have a free micro-step; the load is tokens and attention cost,
    each normalised by its step total, summed. Deterministic: it depends only on the lengths.
    """
    num_packs = len(pack_doc_lengths)
    if world_size <= 0 or num_packs % world_size:
        raise ValueError(f"{num_packs} packs cannot be split evenly over {world_size} ranks")
    slots = num_packs // world_size
    tokens = [sum(doc) for doc in pack_doc_lengths]
    cost = [sum(n * n for n in doc) for doc in pack_doc_lengths]
    total_tokens, total_cost = max(1, sum(tokens)), max(1, sum(cost))
    order = sorted(range(num_packs), key=lambda p: (-tokens[p], -cost[p], p))
    rank_tokens, rank_cost = [0] * world_size, [0] * world_size
    packs_by_rank: list[list[int]] = [[] for _ in range(world_size)]
    for p in order:
        free = [r for r in range(world_size) if len(packs_by_rank[r]) < slots]
        r = min(free, key=lambda r: (rank_tokens[r] / total_tokens + rank_cost[r] / total_cost, r))
        packs_by_rank[r].append(p)
        rank_tokens[r] += tokens[p]
        rank_cost[r] += cost[p]
    return RankAssignment(
        packs_by_rank=[sorted(ps) for ps in packs_by_rank],
        token_imbalance=_imbalance(rank_tokens),
        attention_imbalance=_imbalance(rank_cost),
    )
