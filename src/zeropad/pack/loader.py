"""Endless streams of Packs, epoch after epoch, with a position (epoch, packs done) to resume from."""

from __future__ import annotations

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
        step_docs = [next(stream) for _ in range(groups * micro_steps)]
        # a preference pair (data/preference.py) is one planning unit but two documents: count each document
        lengths = [[len(d) for s in docs for d in getattr(s, "docs", (s,))] for docs in step_docs]
        assignment = assign_packs_to_ranks(lengths, groups)
        yield StepPacks(
            packs=[collate_fn(step_docs[p]) for p in assignment.packs_by_rank[rank // sp_size]],
            num_tokens=sum(map(sum, lengths)),
            doc_lengths=[n for doc in lengths for n in doc],
            assignment=assignment,
        )


def eval_packs(samples: list[Sample], max_tokens: int, collate_fn: Callable = collate) -> list[Pack]:
    return [collate_fn([samples[i] for i in idx]) for idx in plan_packs([len(s) for s in samples], max_tokens)]
