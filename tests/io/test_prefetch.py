"""Prefetcher: order, bounded look-ahead, errors raised in the consumer, clean stop."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from cryofield.io.prefetch import Prefetcher


def test_results_come_in_order_and_the_worker_ends():
    with Prefetcher(range(50), lambda i: i * i, depth=3) as pf:
        assert list(pf) == [i * i for i in range(50)]
    assert not pf.thread.is_alive()
    assert list(pf) == []  # exhausted


def test_the_worker_stays_at_most_depth_ahead():
    produced = []

    def produce(i):
        produced.append(i)
        return i

    with Prefetcher(itertools.count(), produce, depth=2) as pf:
        assert next(pf) == 0
        time.sleep(0.3)
        # one item handed out, two waiting in the queue, one done and waiting to be queued
        assert len(produced) <= 1 + 2 + 1
    assert not pf.thread.is_alive()


def test_an_error_in_the_worker_is_raised_in_the_consumer_after_the_earlier_results():
    def produce(i):
        if i == 3:
            raise OSError(f"bad item {i} in {threading.current_thread().name}")
        return i

    got = []
    with pytest.raises(OSError, match="bad item 3 in cryofield-prefetch"):
        with Prefetcher(range(10), produce) as pf:
            for x in pf:
                got.append(x)
    assert got == [0, 1, 2]
    assert not pf.thread.is_alive()


def test_an_error_of_the_input_iterator_is_raised_too():
    def items():
        yield 1
        raise ValueError("input broke")

    pf = Prefetcher(items(), lambda i: i)
    assert next(pf) == 1
    with pytest.raises(ValueError, match="input broke"):
        next(pf)
    assert not pf.thread.is_alive()


def test_stopping_early_stops_the_worker():
    started = threading.Event()

    def produce(i):
        started.set()
        return i

    # an endless input: only close() can stop the worker, which is blocked on a full queue
    with Prefetcher(itertools.count(), produce, depth=1, name="early-stop") as pf:
        for x in pf:
            if x == 2:
                break
        assert started.is_set() and pf.thread.is_alive()
    assert not pf.thread.is_alive()
    assert not any(t.name == "early-stop" for t in threading.enumerate())
    pf.close()  # idempotent


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], lambda i: i, depth=0)
