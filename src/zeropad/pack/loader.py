"""Endless streams of Packs, epoch after epoch, with a position (epoch, packs done) to resume from."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zeropad.data.chat import Sample
from zeropad.pack.collate import Pack, collate
from zeropad.pack.planner import RankAssignment, assign_packs_to_ranks, plan_packs, shuffle_packs, stream_packs


class PackLoader:
    """Packs planned once (best-fit-decreasing over exact lengths); their order reshuffled each epoch."""

    def __init__(self, samples: list[Sample], max_tokens: int, seed: int):
        if not samples:
            raise ValueError("no training samples to pack")
        self.samples, self.seed = samples, seed
        self.plan = plan_packs([len(s) for s in samples], max_tokens, seed=seed)
        self.epoch, self.index = 0, 0

    @property
    def packs_per_epoch(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[Pack]:
        return (collate(docs) for docs in self.pack_samples())

    def pack_samples(self) -> Iterator[list[Sample]]:
        """The samples of each pack, not yet collated (a rank collates only its own packs)."""
        while True:
            order = shuffle_packs(self.plan, self.seed, self.epoch)
            while self.index < len(order):
                docs = [self.samples[i] for i in order[self.index]]
                self.index += 1
                yield docs
            self.epoch, self.index = self.epoch + 1, 0


class StreamingPackLoader:
    """For data larger than memory: samples are read lazily and packed a window at a time."""

    def __init__(self, samples_for_epoch: Callable[[int], Iterator[Sample]], max_tokens: int, buffer_samples: int,
                 seed: int):
        self.samples_for_epoch, self.max_tokens, self.buffer = samples_for_epoch, max_tokens, buffer_samples
        self.seed = seed
        self.epoch, self.index = 0, 0

    def __iter__(self) -> Iterator[Pack]:
        return (collate(docs) for docs in self.pack_samples())

    def pack_samples(self) -> Iterator[list[Sample]]:
        """The samples of each pack, not yet collated (a rank collates only its own packs)."""
        while True:
            produced = 0
            for i, docs in enumerate(stream_packs(self.samples_for_epoch(self.epoch), len, self.max_tokens, self.buffer,
                                                       self.seed + self.epoch)):
                produced += 1
                if i < self.index:  # resuming inside an epoch: skip the packs already trained on
                    continue
                self.index = i + 1
                yield docs
            if produced == 0:
                raise ValueError("the data stream produced no samples")
            self.epoch, self.index = self.epoch + 1, 0


@dataclass
class StepPacks:
    """One optimizer step as one rank sees it."""

    packs: list[Pack]  # this rank's micro-steps
    num_tokens: int  # real tokens of the whole step, all ranks
    doc_lengths: list[int]  # document lengths of the whole step, all ranks (for FLOPs)
    assignment: RankAssignment
    # the loader's position (epoch, packs done) before and after this step's packs: what a checkpoint saves, read
    # here rather than from the loader, which a prefetching worker has moved on
    start: tuple[int, int]
    end: tuple[int, int]


def step_packs(loader: PackLoader | StreamingPackLoader, micro_steps: int, world_size: int = 1,
               rank: int = 0, collate_fn: Callable = collate, sp_size: int = 1) -> Iterator[StepPacks]:
    """Each optimizer step takes D x micro_steps packs from the loader (D = world_size / sp_size
    data-parallel groups), the packs a single process would take with grad_accum = D x micro_steps,
    and gives this rank's group its balanced share (planner.assign_packs_to_ranks over the D groups):
    the sp_size consecutive ranks of a group take the same packs (`collate_fn` then keeps this rank's
    token range: parallel/ulysses.py). Every rank reads the same stream, so the loader position (epoch,
    index) is the same on all ranks. `collate_fn` builds a pack from its samples (model.vlm's packs for
    image conversations)."""
    stream = loader.pack_samples()
    groups = world_size // sp_size
    while True:
        start = (loader.epoch, loader.index)
        step_docs = [next(stream) for _ in range(groups * micro_steps)]
        # a preference pair (data/preference.py) is one planning unit but two documents: count each document
        lengths = [[len(d) for s in docs for d in getattr(s, "docs", (s,))] for docs in step_docs]
        assignment = assign_packs_to_ranks(lengths, groups)
        yield StepPacks(
            packs=[collate_fn(step_docs[p]) for p in assignment.packs_by_rank[rank // sp_size]],
            num_tokens=sum(map(sum, lengths)),
            doc_lengths=[n for doc in lengths for n in doc],
            assignment=assignment,
            start=start,
            end=(loader.epoch, loader.index),
        )


class Prefetch:
    """The next item of `items` built on a background thread while the caller works on the current one: the next
    step's packs are planned, collated (a VLM's images processed) and pinned while the device runs this step.

    At most `depth` items wait ready, and one more is built behind them, so the loader runs up to two steps ahead
    of training (each step carries its own data position). An error the items raise reaches the caller when it
    takes that item, as it would without the thread; `close` stops the worker."""

    def __init__(self, items: Iterator, prepare: Callable | None = None, depth: int = 1):
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(items, prepare), name="zeropad-prefetch", daemon=True)
        self._worker.start()

    def _work(self, items: Iterator, prepare: Callable | None) -> None:
        try:
            for item in items:
                if not self._put(prepare(item) if prepare else item):  # False once stopped
                    return
            self._put(_Failed(StopIteration()))
        except BaseException as err:  # noqa: BLE001  (handed to the consumer, raised there)
            self._put(_Failed(err))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        item = self._ready.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._worker.join()


@dataclass
class _Failed:
    error: BaseException


def eval_packs(samples: list[Sample], max_tokens: int, collate_fn: Callable = collate) -> list[Pack]:
    return [collate_fn([samples[i] for i in idx]) for idx in plan_packs([len(s) for s in samples], max_tokens)]
