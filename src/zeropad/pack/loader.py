"""Endless streams of Packs, epoch after epoch, with a position (epoch, packs done) to resume from."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from zeropad.data.chat import Sample
from zeropad.pack.collate import Pack, collate
from zeropad.pack.planner import plan_packs, shuffle_packs, stream_packs


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
        while True:
            order = shuffle_packs(self.plan, self.seed, self.epoch)
            while self.index < len(order):
                pack = collate([self.samples[i] for i in order[self.index]])
                self.index += 1
                yield pack
            self.epoch, self.index = self.epoch + 1, 0


class StreamingPackLoader:
    """For data larger than memory: samples are read lazily and packed a window at a time."""

    def __init__(self, samples_for_epoch: Callable[[int], Iterator[Sample]], max_tokens: int, buffer_samples: int,
                 seed: int):
        self.samples_for_epoch, self.max_tokens, self.buffer = samples_for_epoch, max_tokens, buffer_samples
        self.seed = seed
        self.epoch, self.index = 0, 0

    def __iter__(self) -> Iterator[Pack]:
        while True:
            produced = 0
            for i, docs in enumerate(stream_packs(self.samples_for_epoch(self.epoch), len, self.max_tokens, self.buffer,
                                                       self.seed + self.epoch)):
                produced += 1
                if i < self.index:  # resuming inside an epoch: skip the packs already trained on
                    continue
                self.index = i + 1
                yield collate(docs)
            if produced == 0:
                raise ValueError("the data stream produced no samples")
            self.epoch, self.index = self.epoch + 1, 0


def eval_packs(samples: list[Sample], max_tokens: int) -> list[Pack]:
    return [collate([samples[i] for i in idx]) for idx in plan_packs([len(s) for s in samples], max_tokens)]
