"""Prefetch: the next step's packs are built on a background thread, ahead of the consumer; errors reach the
consumer at the item that raised; the data position a checkpoint saves is the consumed step's, not the loader's."""

import threading
import time

import pytest

from zeropad.pack.loader import PackLoader, Prefetch, step_packs
from zeropad.verify import random_documents


def test_items_are_built_ahead_on_another_thread():
    built = []
    ready = threading.Event()

    def items():
        for i in range(4):
            built.append((i, threading.current_thread().name))
            if i == 1:
                ready.set()
            yield i

    prefetch = Prefetch(items())
    assert next(prefetch) == 0
    assert ready.wait(5)  # item 1 was built while the consumer held item 0
    assert [next(prefetch) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(StopIteration):
        next(prefetch)
    assert {name for _, name in built} == {"zeropad-prefetch"}
    prefetch.close()


def test_an_error_reaches_the_consumer_at_its_item():
    def items():
        yield "a"
        yield "b"
        raise ValueError("record 7 of data.jsonl: no messages")

    prefetch = Prefetch(items(), prepare=str.upper)
    assert [next(prefetch), next(prefetch)] == ["A", "B"]
    with pytest.raises(ValueError, match="record 7 of data.jsonl"):
        next(prefetch)
    prefetch.close()


def test_close_stops_a_worker_waiting_to_hand_over():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    prefetch = Prefetch(endless(), depth=1)
    assert next(prefetch) == 0
    prefetch.close()  # returns: the worker, blocked on the full queue, sees the stop
    assert not prefetch._worker.is_alive()


def test_steps_carry_their_data_position():
    samples = random_documents(64, [5, 7, 3, 9, 4, 6, 8, 2], seed=0)
    loader = PackLoader(samples, max_tokens=12, seed=0)
    prefetch = Prefetch(step_packs(loader, micro_steps=2))
    first, second = next(prefetch), next(prefetch)
    assert (first.start, first.end) == ((0, 0), (0, 2)) and second.start == first.end
    for _ in range(200):  # the worker builds the third step while the second is "training"
        if prefetch._ready.full():
            break
        time.sleep(0.01)
    ahead = (loader.epoch, loader.index)
    third = next(prefetch)
    # the loader ran ahead (one step waiting, the next one built behind it); each step still names its own range
    assert third.start == second.end and ahead not in (second.end, third.start) and third.end != third.start
    prefetch.close()
