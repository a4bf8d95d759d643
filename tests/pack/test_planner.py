"""Tests for the bin-packing planner: exact cover, budget, determinism, utilization."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from zeropad.pack.planner import PackStats, pack_stats, plan_packs, shuffle_packs, stream_packs

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_en_demo.json"
# Proxy for the tokenized length of an Alpaca record when no tokenizer is at hand: about four
# characters per token, plus a constant for the chat-template header tokens. A proxy only.
CHARS_PER_TOKEN = 4
HEADER_TOKENS = 16


def lognormal_lengths(n: int, mean: float, max_tokens: int, seed: int = 0) -> np.ndarray:
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2  # so that the lognormal's mean is `mean`
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mu, sigma, n).astype(np.int64), 1, max_tokens)


def uniform_lengths(n: int, low: int, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, n)


def alpaca_proxy_lengths() -> list[int]:
    if not ALPACA.exists():
        pytest.skip(f"real Alpaca samples not found at {ALPACA}")
    records = json.loads(ALPACA.read_text())
    texts = [r["instruction"] + r.get("input", "") + r["output"] for r in records]
    return [len(text) // CHARS_PER_TOKEN + HEADER_TOKENS for text in texts]


def assert_valid(lengths, packs: list[list[int]], max_tokens: int) -> None:
    """Every sample exactly once, no pack over budget, no empty pack."""
    flat = [i for pack in packs for i in pack]
    assert sorted(flat) == list(range(len(lengths)))
    for pack in packs:
        assert pack, "empty pack"
        assert sum(int(lengths[i]) for i in pack) <= max_tokens


def test_known_small_case_is_best_fit():
    # Sorted: 7 (i2), 5 (i3), 4 (i0), 1 (i1). 7 opens pack 0 (3 left), 5 opens pack 1 (5 left),
    # 4 goes to pack 1 (1 left), 1 goes to the tightest fit, pack 1, not the first fit, pack 0.
    assert plan_packs([4, 1, 7, 5], max_tokens=10) == [[2], [3, 0, 1]]


def test_ties_broken_by_index():
    assert plan_packs([3, 3, 3, 3], max_tokens=6) == [[0, 1], [2, 3]]
    assert plan_packs([2, 5, 2, 5, 1], max_tokens=7) == [[1, 0], [3, 2], [4]]


def test_exact_fit_and_edge_cases():
    assert plan_packs([], max_tokens=8) == []
    assert plan_packs([8], max_tokens=8) == [[0]]
    assert plan_packs(np.array([8, 8, 8]), max_tokens=8) == [[0], [1], [2]]
    assert plan_packs([0, 3, 0], max_tokens=3) == [[1, 0, 2]]


def test_over_budget_length_raises():
    with pytest.raises(ValueError, match="sample 2 has 9 tokens"):
        plan_packs([1, 2, 9, 3], max_tokens=8)
    with pytest.raises(ValueError, match="negative"):
        plan_packs([1, -2], max_tokens=8)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_packs([1, 2], max_tokens=0)


@pytest.mark.parametrize("seed", range(5))
def test_random_packs_are_valid_and_deterministic(seed):
    rng = np.random.default_rng(seed)
    max_tokens = int(rng.integers(16, 512))
    lengths = rng.integers(1, max_tokens + 1, int(rng.integers(1, 3000)))
    packs = plan_packs(lengths, max_tokens)
    assert_valid(lengths, packs, max_tokens)
    assert plan_packs(lengths.tolist(), max_tokens) == packs


@pytest.mark.parametrize(
    "name,lengths,max_tokens",
    [
        ("uniform small", uniform_lengths(50_000, 1, 512), 8192),
        ("uniform mixed", uniform_lengths(50_000, 1, 4096), 8192),
        ("lognormal 8k", lognormal_lengths(100_000, 300, 8192), 8192),
        ("lognormal 4k", lognormal_lengths(100_000, 300, 4096), 4096),
    ],
)
def test_utilization_close_to_lower_bound(name, lengths, max_tokens):
    packs = plan_packs(lengths, max_tokens)
    assert_valid(lengths, packs, max_tokens)
    stats = pack_stats(lengths, packs, max_tokens)
    assert stats.num_samples == len(lengths)
    assert stats.num_tokens == int(lengths.sum())
    assert stats.lower_bound == math.ceil(lengths.sum() / max_tokens)
    assert stats.num_packs <= stats.lower_bound * 1.02 + 1, name
    assert stats.utilization > 0.97, name


def test_large_items_pair_optimally():
    # Items of 60% and 40% of the budget: BFD pairs each big item with one small one.
    lengths = [60] * 100 + [40] * 100
    packs = plan_packs(lengths, 100)
    assert len(packs) == 100
    assert_valid(lengths, packs, 100)


def test_shuffle_packs_deterministic_and_epoch_dependent():
    packs = plan_packs(lognormal_lengths(5_000, 300, 2048), 2048)
    a = shuffle_packs(packs, seed=1, epoch=0)
    assert a == shuffle_packs(packs, seed=1, epoch=0)
    assert a != shuffle_packs(packs, seed=1, epoch=1)
    assert a != shuffle_packs(packs, seed=2, epoch=0)
    assert sorted(a) == sorted(packs)
    assert shuffle_packs(packs, seed=1) == a


@pytest.mark.parametrize("buffer_size", [1, 7, 1000, 100_000])
def test_stream_packs_loses_nothing(buffer_size):
    lengths = lognormal_lengths(20_000, 300, 4096, seed=3)
    items = [(i, int(n)) for i, n in enumerate(lengths)]  # each item carries its own id
    packs = list(stream_packs(iter(items), lambda item: item[1], 4096, buffer_size))
    ids = sorted(item[0] for pack in packs for item in pack)
    assert ids == list(range(len(items)))
    assert all(sum(item[1] for item in pack) <= 4096 for pack in packs)


def test_stream_packs_utilization_and_bounded_delay():
    max_tokens, buffer_size = 8192, 2_000
    lengths = lognormal_lengths(100_000, 300, max_tokens, seed=4)
    num_read = 0

    def reading():
        nonlocal num_read
        for i in range(len(lengths)):
            num_read += 1
            yield i

    index_packs = []
    for pack in stream_packs(reading(), lengths.__getitem__, max_tokens, buffer_size):
        # Each item is yielded no later than one window after the window it was read in.
        assert num_read <= (min(pack) // buffer_size + 2) * buffer_size
        index_packs.append(pack)
    assert_valid(lengths, index_packs, max_tokens)
    stats = pack_stats(lengths, index_packs, max_tokens)
    assert stats.num_packs <= stats.lower_bound * 1.02 + 1


def test_stream_packs_rejects_over_budget():
    with pytest.raises(ValueError, match="item 1 of the stream"):
        list(stream_packs([3, 99, 2], int, max_tokens=10, buffer_size=2))


def test_pack_stats_table():
    stats = pack_stats([4, 1, 7, 5], [[2], [3, 0, 1]], max_tokens=10)
    assert stats == PackStats(
        num_samples=4, num_tokens=17, num_packs=2, lower_bound=2, utilization=0.85, max_tokens=10
    )
    lines = stats.table().splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned
    assert any("85.00%" in line for line in lines)


def test_alpaca_proxy_lengths():
    lengths = alpaca_proxy_lengths()
    assert len(lengths) == 999
    for max_tokens in (1024, 2048, 8192):
        packs = plan_packs(lengths, max_tokens)
        assert_valid(lengths, packs, max_tokens)
        stats = pack_stats(lengths, packs, max_tokens)
        assert stats.num_packs <= stats.lower_bound * 1.02 + 1
        streamed = list(stream_packs(range(len(lengths)), lengths.__getitem__, max_tokens, 200))
        assert_valid(lengths, streamed, max_tokens)


def test_seeded_plan_mixes_small_samples_and_keeps_utilization():
    # Two length classes of small samples: pure BFD puts each class in its own packs.
    lengths = [30] * 400 + [40] * 400
    bfd = plan_packs(lengths, 1024)
    mixed = plan_packs(lengths, 1024, seed=0)
    assert sorted(i for p in mixed for i in p) == list(range(800))
    assert all(sum(lengths[i] for i in p) <= 1024 for p in mixed)
    assert len(mixed) <= len(bfd) + 1
    homogeneous = lambda packs: sum(len({lengths[i] for i in p}) == 1 for p in packs)  # noqa: E731
    assert homogeneous(bfd) >= len(bfd) - 2
    assert homogeneous(mixed) <= 2
    assert plan_packs(lengths, 1024, seed=0) == mixed
    assert plan_packs(lengths, 1024, seed=1) != mixed


def test_seeded_plan_places_large_samples_by_decreasing_length():
    lengths = [900, 300, 700, 10, 20, 5]  # budget 1000: 900, 700, 300 are large (> 1000/8)
    packs = plan_packs(lengths, 1000, seed=3)
    assert packs[0][0] == 0 and packs[1][:2] == [2, 1]  # 300 fills the 700-pack exactly
