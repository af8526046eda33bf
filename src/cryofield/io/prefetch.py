"""A background thread that prepares the next items while the current one is used.

``Prefetcher(items, produce)`` iterates over ``produce(item)`` for every item of
``items``, in order, computed by one worker thread at most ``depth`` results ahead (a
bounded queue: memory stays fixed however long ``items`` is). Training uses it to read,
crop and normalise the next batches of a lazy particle stack while the current batch
trains (:meth:`cryofield.inference.data.BatchMaker.iter_batches`).

- An exception raised by ``items`` or ``produce`` in the worker is raised again, with its
  traceback, in the consuming thread at the point of the sequence where it happened (the
  results before it are delivered first).
- :meth:`Prefetcher.close` (also on leaving a ``with`` block, or at the end of the
  sequence) stops the worker: it finishes the item it is preparing, drops it and exits;
  ``close`` waits for it. A consumer that stops early must close it (or use ``with``).
- Reading files releases the GIL (``os.preadv``), and so do torch's kernels, so the worker
  runs alongside the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
R = TypeVar("R")

_RESULT, _ERROR, _END = 0, 1, 2
_POLL_S = 0.05  # how often a blocked worker looks whether it was stopped


class Prefetcher(Generic[R]):
    """Iterate over ``produce(item)`` for ``item in items``, prepared by a worker thread.

    Parameters
    ----------
    items
        The inputs (consumed by the worker thread).
    produce
        Called in the worker thread on each item.
    depth
        Results prepared ahead at most (the queue's size, >= 1).
    name
        Name of the worker thread.
    """

    def __init__(
        self,
        items: Iterable[T],
        produce: Callable[[T], R],
        depth: int = 2,
        name: str = "cryofield-prefetch",
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self.thread = threading.Thread(
            target=self._work, args=(items, produce), name=name, daemon=True
        )
        self.thread.start()

    # ------------------------------------------------------------ worker
    def _put(self, entry: tuple[int, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items: Iterable[T], produce: Callable[[T], R]) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                if not self._put((_RESULT, produce(item))):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._put((_ERROR, err))
            return
        self._put((_END, None))

    # ------------------------------------------------------------ consumer
    def __iter__(self) -> Iterator[R]:
        return self

    def __next__(self) -> R:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _RESULT:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the worker and wait for it (idempotent)."""
        self._done = True
        self._stop.set()
        while self.thread.is_alive():
            try:  # unblock a worker waiting on a full queue
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=_POLL_S)
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> Prefetcher[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
