"""Bounded, merging batching on one device: :class:`MergingBatcher` runs blocking batch functions in
worker threads, at most ``max_concurrent`` passes at once, and merges the batches of a kind that wait
for the model (oldest first) into passes of up to ``max_batch_size``. Plain asyncio, no Ray. Why:
docs/ARCHITECTURE.md, "index.model.batching and the Encoder".
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

BatchFunction = Callable[[list[Any]], Any]
"""A blocking function from a list of items to as many results, in the same order (a list, an array...)."""


class BatchObserver(Protocol):
    """Told about every forward pass (for metrics); called on the event loop, so it must be quick."""

    def batch_started(self, kind: str, size: int) -> None: ...

    def batch_finished(self, kind: str, size: int, seconds: float) -> None: ...


@dataclass
class _Waiting:
    seq: int
    items: list[Any]
    future: asyncio.Future[list[Any]]


@dataclass
class _KindState:
    """What waits, what runs, and counters since the batcher was created, for one kind of work."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0
    waiting: deque[_Waiting] = field(default_factory=deque, repr=False)
    running_items: int = 0


class MergingBatcher:
    """Runs blocking batch functions in worker threads, at most ``max_concurrent`` at a time.

    Each ``kind`` (e.g. ``"image"``, ``"text"``) has its own batch function; batches of different kinds
    are never merged, but they share the concurrency limit because they share the device.
    """

    def __init__(
        self,
        functions: Mapping[str, BatchFunction],
        *,
        max_batch_size: int,
        max_concurrent: int,
        observer: BatchObserver | None = None,
    ) -> None:
        """Create the batcher; nothing runs until :meth:`run` is awaited.

        Args:
            functions: the batch function of each kind.
            max_batch_size: the most items merged into one forward pass. A single submitted batch larger
                than this still runs, alone.
            max_concurrent: how many forward passes may run at once (1 keeps a CPU's cores on one pass;
                2 lets a GPU compute one batch while the host prepares or unpacks the other).
            observer: receives a call when each forward pass starts and ends.

        Raises:
            ValueError: on an empty ``functions`` or a limit below 1.
        """
        if not functions:
            raise ValueError("functions must name at least one kind of batch")
        self._functions = dict(functions)
        self._stats = {kind: _KindState() for kind in self._functions}
        self._observer = observer
        self._seq = itertools.count()
        self._active_workers = 0
        self._workers: set[asyncio.Task[None]] = set()
        self.max_batch_size = 1
        self.max_concurrent = 1
        self.configure(max_batch_size=max_batch_size, max_concurrent=max_concurrent)

    def configure(self, *, max_batch_size: int, max_concurrent: int) -> None:
        """Change the limits; batches already running finish under the old ones.

        Raises:
            ValueError: when a limit is not an int >= 1.
        """
        for name, value in (("max_batch_size", max_batch_size), ("max_concurrent", max_concurrent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        # A raised limit can start more workers at once; a lowered one takes effect as workers finish.
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start_workers()

    async def run(self, kind: str, items: Sequence[Any]) -> list[Any]:
        """Run ``items`` through the batch function of ``kind``, possibly merged with other batches.

        Args:
            kind: one of the kinds given to the constructor.
            items: the batch; may be empty.

        Returns:
            The results of exactly these items, in their order.

        Raises:
            ValueError: for an unknown ``kind``.
            Exception: whatever the batch function raised, for every batch merged into that pass, or a
                ``RuntimeError`` when it returned a different number of results than it got items.
        """
        if kind not in self._functions:
            raise ValueError(f"unknown batch kind {kind!r}; known: {', '.join(sorted(self._functions))}")
        if not items:
            return []
        waiting = _Waiting(next(self._seq), list(items), asyncio.get_running_loop().create_future())
        self._stats[kind].waiting.append(waiting)
        self._start_workers()
        # A cancelled caller cancels its future (awaiting a future cancels it); a worker skips it.
        return await waiting.future

    def queued_items(self, kind: str) -> int:
        """Items of ``kind`` handed to the batcher and not yet in a forward pass."""
        return sum(len(w.items) for w in self._stats[kind].waiting if not w.future.done())

    def running_items(self, kind: str) -> int:
        """Items of ``kind`` in forward passes right now."""
        return self._stats[kind].running_items

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Per kind: forward passes run, items encoded, mean and largest pass, seconds spent in passes."""
        out: dict[str, dict[str, float | int]] = {}
        for kind, s in self._stats.items():
            out[kind] = {
                "batches": s.batches,
                "items": s.items,
                "mean_batch_size": round(s.items / s.batches, 2) if s.batches else 0.0,
                "largest_batch": s.largest_batch,
                "busy_s": round(s.busy_s, 3),
            }
        return out

    # -- internals -------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        while self._active_workers < self.max_concurrent and self._has_waiting():
            self._active_workers += 1
            task = asyncio.get_running_loop().create_task(self._worker())
            # Keep a reference: the event loop only holds tasks weakly.
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    def _has_waiting(self) -> bool:
        return any(w for s in self._stats.values() for w in s.waiting if not w.future.done())

    async def _worker(self) -> None:
        # A worker leaves when nothing waits (nothing can arrive between _take and the decrement: no await
        # in between), or as a surplus worker after max_concurrent was lowered. Either way no replacement
        # is due; new arrivals start workers themselves.
        try:
            while self._active_workers <= self.max_concurrent:
                taken = self._take()
                if taken is None:
                    return
                await self._execute(*taken)
        finally:
            self._active_workers -= 1

    def _take(self) -> tuple[str, list[_Waiting]] | None:
        """The oldest waiting batch and the later ones of its kind that fit beside it (FIFO)."""
        oldest: tuple[int, str] | None = None
        for kind, s in self._stats.items():
            while s.waiting and s.waiting[0].future.done():
                s.waiting.popleft()  # its caller went away
            if s.waiting and (oldest is None or s.waiting[0].seq < oldest[0]):
                oldest = (s.waiting[0].seq, kind)
        if oldest is None:
            return None
        kind = oldest[1]
        queue = self._stats[kind].waiting
        taken = [queue.popleft()]
        size = len(taken[0].items)
        while queue:
            if queue[0].future.done():
                queue.popleft()
                continue
            if size + len(queue[0].items) > self.max_batch_size:
                break
            size += len(queue[0].items)
            taken.append(queue.popleft())
        return kind, taken

    async def _execute(self, kind: str, taken: list[_Waiting]) -> None:
        items = [item for w in taken for item in w.items]
        stats = self._stats[kind]
        stats.running_items += len(items)
        if self._observer is not None:
            self._observer.batch_started(kind, len(items))
        start = time.perf_counter()
        try:
            # In a worker thread: the event loop keeps accepting requests and forming batches meanwhile.
            results = await asyncio.to_thread(self._functions[kind], items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"the {kind} batch function returned {len(results)} results for {len(items)} items"
                )
        except BaseException as exc:  # every caller must hear of it, cancellation included
            for w in taken:
                if not w.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        w.future.cancel()
                    else:
                        w.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            offset = 0
            for w in taken:
                if not w.future.done():
                    w.future.set_result(list(results[offset : offset + len(w.items)]))
                offset += len(w.items)
        finally:
            seconds = time.perf_counter() - start
            stats.running_items -= len(items)
            stats.batches += 1
            stats.items += len(items)
            stats.largest_batch = max(stats.largest_batch, len(items))
            stats.busy_s += seconds
            if self._observer is not None:
                self._observer.batch_finished(kind, len(items), seconds)
