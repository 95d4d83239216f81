"""MergingBatcher: each caller gets its own results, waiting batches merge, concurrency is bounded."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from index.model.batching import MergingBatcher

WAIT_S = 10.0  # generous bound on thread handshakes, so a bug fails the test instead of hanging it


class Recorder:
    """A batch function that records its calls and can be held at the start of a pass."""

    def __init__(self, transform: Any = lambda x: x * 10) -> None:
        self.calls: list[list[Any]] = []
        self.transform = transform
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def __call__(self, items: list[Any]) -> list[Any]:
        with self.lock:
            self.calls.append(list(items))
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.entered.release()
        try:
            assert self.gate.wait(WAIT_S), "test never opened the gate"
            return [self.transform(x) for x in items]
        finally:
            with self.lock:
                self.running -= 1


class Observer:
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []

    def batch_started(self, kind: str, size: int) -> None:
        self.started.append((kind, size))

    def batch_finished(self, kind: str, size: int, seconds: float) -> None:
        assert seconds >= 0
        self.finished.append((kind, size))


async def until_entered(fn: Recorder, n: int = 1) -> None:
    """Wait (without blocking the loop) until ``n`` more passes have entered ``fn``."""
    for _ in range(n):
        assert await asyncio.to_thread(fn.entered.acquire, True, WAIT_S), "no forward pass started"


def test_every_caller_gets_its_own_results_in_order() -> None:
    fn = Recorder()

    async def main() -> list[list[int]]:
        batcher = MergingBatcher({"n": fn}, max_batch_size=8, max_concurrent=1)
        batches = [list(range(i, i + size)) for i, size in enumerate([1, 3, 2, 5, 1, 4, 2])]
        return await asyncio.gather(*(batcher.run("n", b) for b in batches))

    results = asyncio.run(main())
    assert results == [[x * 10 for x in range(i, i + size)] for i, size in enumerate([1, 3, 2, 5, 1, 4, 2])]
    assert sum(len(c) for c in fn.calls) == 18


def test_batches_that_wait_for_a_busy_model_are_merged_up_to_the_limit() -> None:
    fn = Recorder()
    observer = Observer()

    async def main() -> list[list[int]]:
        batcher = MergingBatcher({"n": fn}, max_batch_size=5, max_concurrent=1, observer=observer)
        fn.gate.clear()
        first = asyncio.create_task(batcher.run("n", [0]))
        await until_entered(fn)  # the model is now busy with [0]
        later = [asyncio.create_task(batcher.run("n", b)) for b in ([1, 2], [3], [4, 5], [6])]
        await asyncio.sleep(0.01)  # let them all reach the batcher
        assert batcher.queued_items("n") == 6 and batcher.running_items("n") == 1
        fn.gate.set()
        return [await first, *[await t for t in later]]

    assert asyncio.run(main()) == [[0], [10, 20], [30], [40, 50], [60]]
    # [1, 2] + [3] + [4, 5] = 5 items fill one pass; [6] no longer fits and runs next. Order is FIFO.
    assert fn.calls == [[0], [1, 2, 3, 4, 5], [6]]
    assert observer.started == observer.finished == [("n", 1), ("n", 5), ("n", 1)]


def test_a_single_batch_larger_than_the_limit_still_runs_alone() -> None:
    fn = Recorder()

    async def main() -> list[int]:
        batcher = MergingBatcher({"n": fn}, max_batch_size=2, max_concurrent=1)
        return await batcher.run("n", [1, 2, 3])

    assert asyncio.run(main()) == [10, 20, 30]
    assert fn.calls == [[1, 2, 3]]


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_max_concurrent_passes_run_at_once(limit: int) -> None:
    fn = Recorder()

    async def main() -> None:
        # max_batch_size 1: nothing merges, so every call is its own pass and could overlap.
        batcher = MergingBatcher({"n": fn}, max_batch_size=1, max_concurrent=limit)
        fn.gate.clear()
        tasks = [asyncio.create_task(batcher.run("n", [i])) for i in range(6)]
        await until_entered(fn, limit)  # `limit` passes are in, all held at the gate
        await asyncio.sleep(0.05)
        assert fn.running == limit  # and no more got in
        fn.gate.set()
        assert [await t for t in tasks] == [[i * 10] for i in range(6)]

    asyncio.run(main())
    assert fn.peak == limit


def test_kinds_never_merge_but_share_the_concurrency_limit() -> None:
    images, texts = Recorder(), Recorder(transform=str.upper)

    async def main() -> tuple[list[Any], ...]:
        batcher = MergingBatcher({"image": images, "text": texts}, max_batch_size=8, max_concurrent=1)
        images.gate.clear()
        first = asyncio.create_task(batcher.run("image", [1]))
        await until_entered(images)
        rest = [
            asyncio.create_task(batcher.run("text", ["a", "b"])),
            asyncio.create_task(batcher.run("image", [2])),
            asyncio.create_task(batcher.run("text", ["c"])),
            asyncio.create_task(batcher.run("image", [3, 4])),
        ]
        await asyncio.sleep(0.05)
        assert texts.calls == []  # the device slot is taken by the image pass
        images.gate.set()
        return await first, *[await t for t in rest]

    assert asyncio.run(main()) == ([10], ["A", "B"], [20], ["C"], [30, 40])
    assert images.calls == [[1], [2, 3, 4]]
    assert texts.calls == [["a", "b", "c"]]


def test_a_failing_pass_fails_only_its_callers_and_the_batcher_goes_on() -> None:
    def fn(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("bad item -1")
        return [x + 1 for x in items]

    async def main() -> None:
        batcher = MergingBatcher({"n": fn}, max_batch_size=1, max_concurrent=1)
        results = await asyncio.gather(
            batcher.run("n", [1]), batcher.run("n", [-1]), batcher.run("n", [3]), return_exceptions=True
        )
        assert results[0] == [2] and results[2] == [4]
        assert isinstance(results[1], ValueError) and "bad item -1" in str(results[1])
        assert await batcher.run("n", [5]) == [6]

    asyncio.run(main())


def test_a_merged_pass_that_fails_fails_every_caller_in_it() -> None:
    fn = Recorder(transform=lambda x: 1 // x)  # 0 raises ZeroDivisionError

    async def main() -> list[Any]:
        batcher = MergingBatcher({"n": fn}, max_batch_size=8, max_concurrent=1)
        fn.gate.clear()
        first = asyncio.create_task(batcher.run("n", [1]))
        await until_entered(fn)
        merged = [asyncio.create_task(batcher.run("n", b)) for b in ([1], [0], [1])]
        await asyncio.sleep(0)
        fn.gate.set()
        return [await first, *await asyncio.gather(*merged, return_exceptions=True)]

    first, *merged = asyncio.run(main())
    assert first == [1]
    assert all(isinstance(r, ZeroDivisionError) for r in merged)


def test_a_wrong_number_of_results_is_an_error_for_the_callers() -> None:
    async def main() -> None:
        batcher = MergingBatcher({"n": lambda items: items[:-1]}, max_batch_size=4, max_concurrent=1)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await batcher.run("n", [1, 2])

    asyncio.run(main())


def test_a_caller_that_goes_away_is_skipped() -> None:
    fn = Recorder()

    async def main() -> None:
        batcher = MergingBatcher({"n": fn}, max_batch_size=8, max_concurrent=1)
        fn.gate.clear()
        first = asyncio.create_task(batcher.run("n", [1]))
        await until_entered(fn)
        gone = asyncio.create_task(batcher.run("n", [2]))
        kept = asyncio.create_task(batcher.run("n", [3]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.queued_items("n") == 1
        fn.gate.set()
        assert await first == [10] and await kept == [30]
        assert gone.cancelled()

    asyncio.run(main())
    assert fn.calls == [[1], [3]]


def test_configure_changes_the_limits_and_validates_them() -> None:
    fn = Recorder()

    async def main() -> None:
        batcher = MergingBatcher({"n": fn}, max_batch_size=1, max_concurrent=1)
        batcher.configure(max_batch_size=3, max_concurrent=2)
        assert (batcher.max_batch_size, batcher.max_concurrent) == (3, 2)
        fn.gate.clear()
        tasks = [asyncio.create_task(batcher.run("n", [i])) for i in range(8)]
        await until_entered(fn, 2)
        fn.gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert fn.peak == 2
    assert max(len(c) for c in fn.calls) <= 3
    batcher = MergingBatcher({"n": fn}, max_batch_size=1, max_concurrent=1)
    for bad in ({"max_batch_size": 0, "max_concurrent": 1}, {"max_batch_size": 2, "max_concurrent": True}):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            batcher.configure(**bad)


def test_stats_and_unknown_kinds() -> None:
    async def main() -> MergingBatcher:
        batcher = MergingBatcher({"n": lambda items: items}, max_batch_size=4, max_concurrent=1)
        assert await batcher.run("n", []) == []
        with pytest.raises(ValueError, match="unknown batch kind 'x'; known: n"):
            await batcher.run("x", [1])
        await batcher.run("n", [1, 2, 3])
        await batcher.run("n", [4])
        return batcher

    stats = asyncio.run(main()).stats()["n"]
    summary = (stats["batches"], stats["items"], stats["largest_batch"], stats["mean_batch_size"])
    assert summary == (2, 4, 3, 2.0)
    with pytest.raises(ValueError, match="at least one kind"):
        MergingBatcher({}, max_batch_size=1, max_concurrent=1)
