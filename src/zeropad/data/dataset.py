"""Sources -> tokenized samples: read, convert, tokenize (optionally in worker processes),
cache per source, then apply overlong handling, source weights and the bad-sample policy.

The cache (zeropad.data.cache) holds one source before weighting and overlong handling, so
changing weights, max_tokens, overlong or on_bad_sample reuses it without tokenizing again.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zeropad.config import DataConfig, SourceConfig
from zeropad.data.cache import TokenizedSource, cache_file_for, read_cache, write_cache
from zeropad.data.chat import Sample, SampleError, ensure_chat_template, tokenize_conversation, tokenize_text
from zeropad.data.formats import Text, to_conversation
from zeropad.data.sources import iter_records
from zeropad.errors import DataError, ZeropadError

CHUNK_RECORDS = 256  # records per worker task: large enough to amortise inter-process pickling
PARALLEL_MIN_RECORDS = 4096  # below this, starting worker processes costs more than it saves
MAX_LISTED_PROBLEMS = 10

# (record number, record or the reason it is unusable); reasons travel as str because
# DataError's constructor signature does not survive pickling to and from workers.
_Job = tuple[str, str, list[tuple[int, dict | str]]]  # (file, format, records)


class BadSamplesError(DataError):
    """All unusable records at once (on_bad_sample: error), so they can be fixed in one pass."""

    def __init__(self, problems: list[DataError]):
        first = problems[0]
        self.file, self.record, self.reason, self.problems = first.file, first.record, first.reason, problems
        listed = "\n".join(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        # Bypass DataError's one-record message: this one lists many.
        ZeropadError.__init__(
            self,
            f"{len(problems)} unusable record(s):\n{listed}{more}\n"
            "Fix them, or set data.on_bad_sample: skip to skip and count them.",
        )


@dataclass
class SampleReport:
    num_records: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (on_bad_sample: skip)
    truncated: int = 0
    dropped_overlong: int = 0

    def counts(self) -> dict:
        """The same numbers as `summary`, for metrics.jsonl and summary.json; skips by reason."""
        return {"records": self.num_records, "samples": self.num_samples, "tokens": self.num_tokens,
                "skipped": self.skipped.total(), "skipped_by_reason": dict(self.skipped),
                "truncated": self.truncated, "dropped_overlong": self.dropped_overlong}

    def summary(self) -> str:
        parts = [f"{self.num_records:,} records -> {self.num_samples:,} samples, {self.num_tokens:,} tokens"]
        if self.skipped:
            top = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common(3))
            etc = ", ..." if len(self.skipped) > 3 else ""
            parts.append(f"skipped {self.skipped.total():,} bad ({top}{etc})")
        if self.truncated:
            parts.append(f"truncated {self.truncated:,} overlong")
        if self.dropped_overlong:
            parts.append(f"dropped {self.dropped_overlong:,} overlong")
        return "; ".join(parts)


def load_samples(
    sources: list[SourceConfig], cfg: DataConfig, tokenizer, *, max_tokens: int, overlong: str, seed: int
) -> tuple[list[Sample], SampleReport]:
    """Every source tokenized (or read from the cache), weighted and fitted to max_tokens."""
    ensure_chat_template(tokenizer, cfg.chat_template)
    report = SampleReport()
    policy = SamplePolicy(cfg.on_bad_sample, report, max_tokens, overlong, collect=True)
    samples: list[Sample] = []
    with _TokenizerPool(tokenizer, cfg, cfg.num_workers) as pool:
        for index, source in enumerate(sources):
            tokenized = _cached_tokenize(source, cfg, tokenizer, pool)
            report.num_records += tokenized.num_records
            skipped_before = report.skipped.copy()
            for record_no, reason in tokenized.problems:
                policy.bad(source.path, record_no, reason)
            fitted = [policy.fit(source.path, r, s) for r, s in zip(tokenized.record_nos, tokenized.samples)]
            kept = [sample for sample in fitted if sample is not None]
            if not kept and not policy.problems:
                reasons = (report.skipped - skipped_before).most_common(3)
                detail = "".join(f"; {reason}: {count}" for reason, count in reasons)
                raise DataError(source.path, None, f"no usable samples in {tokenized.num_records} records{detail}")
            samples += weighted_copies(kept, source.weight, np.random.default_rng([seed, index]))
    if policy.problems:
        raise BadSamplesError(sorted(policy.problems, key=lambda p: (p.file, p.record or 0)))
    report.num_samples = len(samples)
    report.num_tokens = sum(len(sample) for sample in samples)
    return samples, report


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded `fraction` of the distinct samples held out, each once.

    Copies made by a source weight are the same object; they all stay on one side, so eval
    never holds a sample the model trains on.
    """
    positions: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        positions.setdefault(id(sample), []).append(i)
    groups = list(positions.values())
    num_eval = min(max(round(fraction * len(groups)), 1), len(groups) - 1) if fraction > 0 else 0
    chosen = sorted(np.random.default_rng(seed).permutation(len(groups))[:num_eval])
    held_out = {i for g in chosen for i in groups[g]}
    train = [sample for i, sample in enumerate(samples) if i not in held_out]
    return train, [samples[groups[g][0]] for g in chosen]


def stream_samples(
    sources: list[SourceConfig],
    cfg: DataConfig,
    tokenizer,
    *,
    max_tokens: int,
    overlong: str,
    seed: int,
    report: SampleReport,
) -> Iterator[Sample]:
    """Samples read and tokenized lazily (no cache), for data larger than memory.

    Sources are interleaved at random in proportion to their weights. A weight w reads the
    source ceil(w) times; the last pass keeps each record with probability w - floor(w), so a
    source yields about w x its size samples. With on_bad_sample: error the first unusable
    record raises at once. `report` counts as samples flow; records, skips and overlong
    samples are counted on the first pass over each source only.
    """
    ensure_chat_template(tokenizer, cfg.chat_template)
    policy = SamplePolicy(cfg.on_bad_sample, report, max_tokens, overlong, collect=False)
    rng = np.random.default_rng(seed)
    with _TokenizerPool(tokenizer, cfg, cfg.num_workers) as pool:
        streams = [_source_stream(source, index, pool, policy, seed) for index, source in enumerate(sources)]
        weights = [source.weight for source in sources]
        while streams:
            k = rng.choice(len(streams), p=np.asarray(weights) / sum(weights))
            sample = next(streams[k], None)
            if sample is None:
                del streams[k], weights[k]
                continue
            report.num_samples += 1
            report.num_tokens += len(sample)
            yield sample


def _source_stream(
    source: SourceConfig, index: int, pool: _TokenizerPool, policy: SamplePolicy, seed: int
) -> Iterator[Sample]:
    rng = np.random.default_rng([seed, index])
    for pass_no in range(math.ceil(source.weight)):
        keep_probability = min(1.0, source.weight - pass_no)
        first_pass = pass_no == 0

        def kept_records() -> Iterator[tuple[int, dict | DataError]]:
            for record_no, record in iter_records(source.path):
                policy.report.num_records += int(first_pass)
                if keep_probability == 1.0 or rng.random() < keep_probability:
                    yield record_no, record

        for record_no, result in pool.run(_jobs(source, kept_records()), parallel=True):
            if isinstance(result, str):
                policy.bad(source.path, record_no, result, count=first_pass)
                continue
            sample = policy.fit(source.path, record_no, result, count=first_pass)
            if sample is not None:
                yield sample


class SamplePolicy:
    """Overlong handling and the bad-sample policy, counted in the report."""

    def __init__(self, on_bad_sample: str, report: SampleReport, max_tokens: int, overlong: str, collect: bool):
        assert on_bad_sample in ("error", "skip") and overlong in ("truncate", "drop")
        self.on_bad_sample, self.report, self.max_tokens, self.overlong = on_bad_sample, report, max_tokens, overlong
        self.collect = collect  # error mode: gather every problem (True) or raise at the first (False)
        self.problems: list[DataError] = []

    def bad(self, file: str, record_no: int, reason: str, count: bool = True) -> None:
        if self.on_bad_sample == "skip":
            if count:
                self.report.skipped[reason] += 1
        elif self.collect:
            self.problems.append(DataError(file, record_no, reason))
        else:
            raise BadSamplesError([DataError(file, record_no, reason)])

    def fit(self, file: str, record_no: int, sample: Sample, count: bool = True) -> Sample | None:
        """The sample within max_tokens, or None when it is dropped."""
        if len(sample) <= self.max_tokens:
            return sample
        if self.overlong == "drop":
            self.report.dropped_overlong += int(count)
            return None
        cut = Sample(sample.input_ids[: self.max_tokens], sample.loss_mask[: self.max_tokens])
        if not _has_targets(cut):
            self.bad(file, record_no, f"no target tokens within the first {self.max_tokens} (pack.max_tokens)", count)
            return None
        self.report.truncated += int(count)
        return cut


def _has_targets(sample: Sample) -> bool:
    # Position 0 never trains: nothing in its document precedes it.
    return bool(sample.loss_mask[1:].any())


def weighted_copies(samples: list[Sample], weight: float, rng: np.random.Generator) -> list[Sample]:
    """round(weight x n) samples: whole copies plus a seeded subset without repeats."""
    if not samples:
        return []
    whole, remainder = divmod(round(weight * len(samples)), len(samples))
    picks = np.sort(rng.choice(len(samples), size=remainder, replace=False))
    return samples * whole + [samples[i] for i in picks]


def _jobs(source: SourceConfig, records: Iterable[tuple[int, dict | DataError]]) -> Iterator[_Job]:
    chunk: list[tuple[int, dict | str]] = []
    for record_no, record in records:
        chunk.append((record_no, record.reason if isinstance(record, DataError) else record))
        if len(chunk) == CHUNK_RECORDS:
            yield source.path, source.format, chunk
            chunk = []
    if chunk:
        yield source.path, source.format, chunk


def _tokenize_chunk(job: _Job, tokenizer, cfg: DataConfig) -> list[tuple[int, Sample | str]]:
    """(record number, sample or the reason the record is unusable) for each record of the job."""
    file, fmt, records = job
    results: list[tuple[int, Sample | str]] = []
    for record_no, record in records:
        if isinstance(record, str):
            results.append((record_no, record))
            continue
        try:
            item = to_conversation(record, fmt, file, record_no)
            if isinstance(item, Text):
                sample = tokenize_text(item.text, tokenizer)
            else:
                sample = tokenize_conversation(item, tokenizer, cfg.train_on_prompt, cfg.chat_template_kwargs)
        except DataError as err:
            results.append((record_no, err.reason))
            continue
        except SampleError as err:
            results.append((record_no, str(err)))
            continue
        results.append((record_no, sample if _has_targets(sample) else "no target tokens"))
    return results


_worker_args: dict = {}


def _init_worker(tokenizer, cfg: DataConfig) -> None:
    _worker_args.update(tokenizer=tokenizer, cfg=cfg)


def _tokenize_chunk_in_worker(job: _Job) -> list[tuple[int, Sample | str]]:
    return _tokenize_chunk(job, _worker_args["tokenizer"], _worker_args["cfg"])


class _TokenizerPool:
    """Tokenizes jobs in order, in-process or in worker processes started on first need.

    At most 2 jobs per worker are in flight, so memory stays flat on data larger than memory.
    Workers are spawned, not forked: forking a process whose tokenizer threads already ran can
    deadlock.
    """

    def __init__(self, tokenizer, cfg: DataConfig, num_workers: int):
        self.tokenizer, self.cfg, self.num_workers = tokenizer, cfg, num_workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> _TokenizerPool:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def run(self, jobs: Iterable[_Job], parallel: bool) -> Iterator[tuple[int, Sample | str]]:
        if not (parallel and self.num_workers > 0):
            for job in jobs:
                yield from _tokenize_chunk(job, self.tokenizer, self.cfg)
            return
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.tokenizer, self.cfg),
            )
        in_flight: deque = deque()
        for job in jobs:
            in_flight.append(self._executor.submit(_tokenize_chunk_in_worker, job))
            if len(in_flight) >= 2 * self.num_workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def _cached_tokenize(source: SourceConfig, cfg: DataConfig, tokenizer, pool: _TokenizerPool) -> TokenizedSource:
    if not Path(source.path).exists():
        raise DataError(source.path, None, "no such file or directory")
    cache_file = cache_file_for(source, cfg, tokenizer)
    cached = read_cache(cache_file)
    if cached is not None:
        return cached
    records = list(iter_records(source.path))
    tokenized = TokenizedSource([], [], [], len(records))
    for record_no, result in pool.run(_jobs(source, records), parallel=len(records) >= PARALLEL_MIN_RECORDS):
        if isinstance(result, str):
            tokenized.problems.append((record_no, result))
        else:
            tokenized.samples.append(result)
            tokenized.record_nos.append(record_no)
    write_cache(cache_file, tokenized)
    return tokenized
