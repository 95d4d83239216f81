"""Bulk import: :class:`ImportRunner` streams JSONL sources into libraries in the background, durably
and resumably, at most ``max_running_tasks`` tasks at once. It is given two coroutines, ``encode``
(uint8 ``(B, H, W, 3)`` -> unit vectors ``(B, dim)``) and ``write`` (``LibraryWriter.add_images``), so it
runs without Ray. Pipeline, commit order, resume and ownership: docs/ARCHITECTURE.md, "Bulk import".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from filters import TagLimits
from index.errors import InvalidParameter, LibraryNotFound, Overloaded
from index.ingest.fetch import (
    ConnectionPools,
    FetchError,
    FetchPolicy,
    check_source,
    is_local_source,
)
from index.ingest.lines import ByteBudget, LineReader, ParsedLine, TooManyBlankLines, parse_line
from index.ingest.sources import SourceLimitExceeded, SourceLimits, SourceStopped, open_source
from index.model.imaging import (
    ImageDecodeError,
    ImageLimits,
    ImageTooLarge,
    decode_image,
    prepare_for_model,
)
from index.model.spec import PreprocessSpec
from index.storage.embedded.store import NewRecord
from index.storage.interfaces import LibraryCatalog, TaskStorage
from index.storage.tasks import (
    FAILED,
    PARTIALLY_SUCCEEDED,
    SUCCEEDED,
    LineError,
    LostOwnership,
    Task,
)

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
#: How often the runner deletes finished tasks past their retention.
PRUNE_INTERVAL_S = 3600.0
T = TypeVar("T")

EncodeFn = Callable[[np.ndarray], Awaitable[np.ndarray]]
WriteFn = Callable[[str, str, list[NewRecord]], Awaitable[list[bool]]]


class ImportSettings(BaseModel):
    """Limits and tuning of bulk imports (builder arg ``imports``)."""

    model_config = ConfigDict(extra="forbid")

    max_line_bytes: int = Field(
        32 * MiB, gt=0, description="longest accepted JSONL line (a longer one is a line error)"
    )
    max_task_lines: int = Field(
        1_000_000, gt=0, description="most records in one source (more: the task fails)"
    )
    max_blank_lines: int = Field(
        1_000_000, ge=0, description="most blank lines in one source (more: the task fails)"
    )
    max_source_bytes: int = Field(
        64 * GiB,
        gt=0,
        description="most bytes read from one source, after decompression (more: the task fails)",
    )
    max_gzip_ratio: float = Field(
        100.0,
        ge=1,
        le=100_000,
        description="most inflated bytes per compressed byte of a .gz source, checked after the first 16 MiB "
        "(more: the task fails)",
    )
    # 768 MiB: room for fetch_threads (32) images of the default limits.max_image_bytes (20 MiB) beside the
    # line being read, so the budget, not the pool, only binds when images are large (at 256 MiB a task
    # fetched 11 at once, 2.6x slower from a server with 100 ms latency: bench/README.md).
    max_task_bytes_in_flight: int = Field(
        768 * MiB,
        gt=0,
        le=64 * GiB,
        description="bytes of lines and fetched images one task holds between reading and committing: "
        "each line is read with room for itself and for an image of limits.max_image_bytes, so it must be "
        "more than max_line_bytes + limits.max_image_bytes; the reader waits while they are taken",
    )
    max_bytes_in_flight: int = Field(
        1536 * MiB,
        gt=0,
        le=256 * GiB,
        description="the same bytes over all running tasks together (at least max_task_bytes_in_flight)",
    )
    max_running_tasks: int = Field(2, gt=0, description="tasks importing at once; others wait PENDING")
    max_unfinished_tasks: int = Field(
        100, gt=0, description="PENDING + RUNNING tasks; beyond: 503 OVERLOADED"
    )
    max_task_errors: int = Field(
        10_000, gt=0, description="line errors kept per task (further ones are only counted)"
    )
    chunk_lines: int = Field(256, gt=0, description="lines per commit (resume granularity)")
    chunks_in_flight: int = Field(
        3, gt=0, description="chunks being prepared/encoded while earlier ones commit"
    )
    prepare_concurrency: int = Field(64, gt=0, description="lines being parsed/fetched/decoded at once")
    encode_batch_size: int = Field(32, gt=0, description="images per encoder call")
    encode_concurrency: int = Field(
        2, gt=0, description="encoder calls in flight (2: one computing while the next one travels)"
    )
    fetch_threads: int = Field(32, gt=0, description="threads fetching image URIs")
    decode_threads: int = Field(4, gt=0, description="threads parsing lines and decoding/resizing images")
    fetch_retries: int = Field(2, ge=0, description="retries of an image fetch (connection errors, 429, 5xx)")
    step_retries: int = Field(
        5, ge=0, description="retries of an encoder or writer call before the task fails"
    )
    source_timeout_s: float = Field(
        FetchPolicy.model_fields["source_timeout_s"].default,
        gt=0,
        description="connect/read timeout of an http(s) source",
    )
    source_deadline_s: float = Field(
        24 * 3600.0, gt=0, description="longest a remote source (http(s), object store) may take to read"
    )
    min_source_bytes_per_s: float = Field(
        1024.0,
        ge=0,
        description="slowest transfer rate accepted from a remote source, measured over source_rate_window_s "
        "of waiting for it (0: no minimum)",
    )
    source_rate_window_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="seconds of waiting in reads over which the source's rate is measured",
    )
    heartbeat_s: float = Field(
        10.0, gt=0, description="runner heartbeat; tasks of a runner silent for 6x are taken over"
    )
    finished_task_retention_days: float = Field(
        30.0,
        gt=0,
        le=36_500,
        description="finished tasks are deleted this long after they finished (then TASK_NOT_FOUND)",
    )

    @model_validator(mode="after")
    def _budgets_fit(self) -> ImportSettings:
        if self.max_task_bytes_in_flight <= self.max_line_bytes + 2:
            raise ValueError("max_task_bytes_in_flight must be more than max_line_bytes")
        if self.max_bytes_in_flight < self.max_task_bytes_in_flight:
            raise ValueError("max_bytes_in_flight must be at least max_task_bytes_in_flight")
        return self

    def source_limits(self) -> SourceLimits:
        return SourceLimits(
            max_bytes=self.max_source_bytes,
            max_gzip_ratio=self.max_gzip_ratio,
            deadline_s=self.source_deadline_s,
            min_bytes_per_s=self.min_source_bytes_per_s or None,
            rate_window_s=self.source_rate_window_s,
        )


def budget_too_small(task_bytes: int, max_line_bytes: int) -> str:
    return (
        f"imports.max_task_bytes_in_flight ({task_bytes}) must be more than imports.max_line_bytes "
        f"({max_line_bytes}) plus limits.max_image_bytes: a task reads a line only when it has room for "
        "the line and for the image the line may fetch"
    )


class TaskFailed(Exception):
    """The task cannot go on; the message is the task's ``error``."""


@dataclass
class Prepared:
    line: int
    image_id: str
    image_uri: str
    tags: dict[str, Any]
    data: bytes
    pixels: np.ndarray | None
    vector: np.ndarray | None = field(default=None)


@dataclass
class Chunk:
    """Lines read (and parsed) together and committed together; ``held``: bytes they hold in the
    budgets (each line's length, plus for a line that fetches its image the reservation, then the
    image's real size while it is kept). ``prepares``: one task per line, started as the reader hands
    the line on, while the chunk still fills; ``open`` is cleared when the task's pipeline ends, so
    that a line the reader's thread hands on afterwards starts nothing."""

    end_line: int = 0
    lines: list[ParsedLine | LineError] = field(default_factory=list)
    held: int = 0
    prepares: list[asyncio.Task[Prepared | LineError]] = field(default_factory=list)
    open: bool = True

    def release(self, run: Run, n: int) -> None:
        """Give ``n`` of the chunk's bytes back before its commit (the unused part of a reservation)."""
        run.budget.give(n)
        self.held -= n
        run.released.set()


@dataclass
class Run:
    """One task this runner is running: its byte budget, cancel switch and tally of line errors."""

    task_id: str
    budget: ByteBudget
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no chunk is being committed
    save_image: bool = True  # the task's: else an image is dropped once decoded
    # Lines handed to the fetchers whose image reservation is not settled yet (fetching, or decoding a
    # fetched image that is not kept); ``released`` is set whenever a chunk gives bytes back early.
    pending_fetches: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)
    line_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    internal_errors: int = 0

    def tally(self, errors: list[LineError]) -> None:
        for e in errors:
            self.line_errors[e.reason.split(":", 1)[0][:60]] += 1

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in self.line_errors.most_common(5))
        more = len(self.line_errors) - 5
        return f"{sum(self.line_errors.values())} line errors" + (
            f" ({kinds}{f', {more} more kinds' if more > 0 else ''})" if kinds else ""
        )


class ImportRunner:
    """Runs import tasks: at most ``max_running_tasks`` at once, the rest PENDING in creation order.

    Args:
        tasks: the durable task store (this runner is its only writer).
        catalog: to check that a task's library still exists (read only).
        encode: uint8 ``(B, H, W, 3)`` -> float32 unit vectors ``(B, dim)``.
        write: ``(library_name, library_uid, records)`` -> created flags; raises LibraryNotFound when the
            library was deleted or re-created.
        preprocess: the model's preprocessing (image size and crop).
        settings: limits and tuning.
        image_limits, tag_limits: the same limits as ``/image/add``.
        policy: where images and sources may be read from.
    """

    def __init__(
        self,
        *,
        tasks: TaskStorage,
        catalog: LibraryCatalog,
        encode: EncodeFn,
        write: WriteFn,
        preprocess: PreprocessSpec,
        settings: ImportSettings,
        image_limits: ImageLimits,
        tag_limits: TagLimits,
        policy: FetchPolicy,
    ) -> None:
        self.tasks = tasks
        self.catalog = catalog
        self.encode = encode
        self.write = write
        self.preprocess = preprocess
        self.settings = settings
        self.image_limits = image_limits
        self.tag_limits = tag_limits
        self.policy = policy
        # Taken with every line the reader reads, kept by a line that fetches its image until the fetch
        # says how much of it the image needs (see _pipeline).
        self.image_reservation = image_limits.max_bytes
        if settings.max_task_bytes_in_flight <= settings.max_line_bytes + 2 + self.image_reservation:
            raise ValueError(budget_too_small(settings.max_task_bytes_in_flight, settings.max_line_bytes))
        self.owner = uuid.uuid4().hex[:16]
        self._fetch_pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="import-fetch")
        # Keep-alive connections shared by the imports' image fetches (one per fetch thread and host).
        self._connections = ConnectionPools(per_host=settings.fetch_threads)
        self._cpu_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="import-cpu")
        self._queue: collections.deque[str] = collections.deque()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, Run] = {}
        self._cancelling: set[str] = set()  # not to be queued again by a heartbeat meanwhile
        # Bytes of lines (and fetched images) of every running task, between reading and committing.
        self._budget = ByteBudget(settings.max_bytes_in_flight)
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._next_prune = 0.0  # time.monotonic() of the next deletion of expired finished tasks
        self._prepare_slots = asyncio.Semaphore(settings.prepare_concurrency)
        self._encode_slots = asyncio.Semaphore(settings.encode_concurrency)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Claim every unfinished task (resume after a restart) and start the scheduler."""
        claimed = await asyncio.to_thread(self.tasks.claim, self.owner, all_unfinished=True)
        for t in claimed:  # a task created before start() is queued already
            if t.task_id not in self._queue:
                self._queue.append(t.task_id)
        if claimed:
            logger.info("resuming %d unfinished import task(s)", len(claimed))
        await self._prune_expired()
        self._scheduler = asyncio.create_task(self._schedule(), name="import-scheduler")

    @property
    def healthy(self) -> bool:
        return self._scheduler is not None and not self._scheduler.done()

    async def close(self) -> None:
        """Stop every task where it is (their progress up to the last commit is kept) and the pools."""
        self._closing = True
        pending = [t for t in (self._scheduler, *self._running.values()) if t is not None]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._connections.close()

    # -- API -------------------------------------------------------------------------------------

    async def create(self, library_name: str, library_uid: str, source: str, save_image: bool) -> Task:
        """Queue a new task. Raises InvalidParameter (bad source) or Overloaded (too many tasks)."""
        try:
            canonical = check_source(source, policy=self.policy)
        except FetchError as exc:
            raise InvalidParameter(f"source: {exc}") from None
        unfinished = await asyncio.to_thread(self.tasks.count_unfinished)
        if unfinished >= self.settings.max_unfinished_tasks:
            raise Overloaded(
                f"{unfinished} import tasks are already pending or running (imports.max_unfinished_tasks); "
                "retry when some have finished"
            )
        task = await asyncio.to_thread(
            self.tasks.create,
            library_name=library_name,
            library_uid=library_uid,
            source=canonical,
            save_image=save_image,
            owner=self.owner,
        )
        self._queue.append(task.task_id)
        self._wake.set()
        return task

    async def describe(self, task_id: str) -> dict[str, Any]:
        """The task object of the API. Raises TaskNotFound."""
        return await asyncio.to_thread(self.tasks.describe, task_id)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a PENDING or RUNNING task (it ends CANCELLED with what it committed); a finished task
        is left as it is. Returns the task object. Raises TaskNotFound.

        Here, the task starts no new commit and its source read stops at the next read; a commit in
        progress finishes first (so every record it wrote is counted), then the state changes in the
        task store and the task's slot is free. A runner that holds the task elsewhere stops at its
        next commit (LostOwnership).
        """
        run = self._runs.get(task_id)
        work = self._running.get(task_id)
        if run is not None and work is not None:
            run.cancelled = True
            run.stop.set()
            await run.idle.wait()
        self._cancelling.add(task_id)
        try:
            await asyncio.to_thread(self.tasks.cancel, task_id)
            with contextlib.suppress(ValueError):
                self._queue.remove(task_id)
            if work is not None:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        finally:
            self._cancelling.discard(task_id)
        return await self.describe(task_id)

    # -- scheduling ------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        stale_after = 6 * self.settings.heartbeat_s
        while not self._closing:
            while self._queue and len(self._running) < self.settings.max_running_tasks:
                task_id = self._queue.popleft()
                if task_id not in self._running:
                    budget = ByteBudget(self.settings.max_task_bytes_in_flight, parent=self._budget)
                    run = self._runs[task_id] = Run(task_id, budget)
                    run.idle.set()
                    self._running[task_id] = asyncio.create_task(self._run(run), name=f"import-{task_id}")
            # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancel that races with the wake-up
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            try:
                held = await asyncio.to_thread(
                    self.tasks.claim, self.owner, all_unfinished=False, stale_after_s=stale_after
                )
            except Exception:  # a full disk must not kill the scheduler; the next beat retries
                logger.exception("import runner heartbeat failed")
                continue
            for t in held:  # tasks of a runner that died without a restart of this one
                if t.task_id not in (*self._running, *self._queue, *self._cancelling):
                    self._queue.append(t.task_id)
            await self._prune_expired()

    async def _prune_expired(self) -> None:
        """Delete finished tasks past ``finished_task_retention_days``; at most once an hour.

        Without it ``tasks.sqlite`` grows with every task ever run (each keeps up to
        ``max_task_errors`` error rows). A failure is logged and retried at the next heartbeat.
        """
        if time.monotonic() < self._next_prune:
            return
        cutoff = time.time() - self.settings.finished_task_retention_days * 86_400
        try:
            deleted = await asyncio.to_thread(self.tasks.prune_finished, finished_before=cutoff)
        except Exception:
            logger.exception("deleting expired import tasks failed")
            return
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        if deleted:
            logger.info(
                "deleted %d import task(s) finished more than %g days ago",
                deleted,
                self.settings.finished_task_retention_days,
            )

    async def _run(self, run: Run) -> None:
        task_id = run.task_id
        try:
            await self._import(run)
        except (LostOwnership, SourceStopped):
            logger.info("import task %s was cancelled or taken over by another runner", task_id)
        except asyncio.CancelledError:
            if not run.cancelled:
                raise
            logger.info("import task %s cancelled", task_id)
        except TaskFailed as exc:
            logger.warning("import task %s failed: %s", task_id, exc)
            await self._finish(task_id, FAILED, str(exc))
        except Exception as exc:
            incident = uuid.uuid4().hex[:12]
            logger.exception("import task %s: internal error %s", task_id, incident, exc_info=exc)
            await self._finish(task_id, FAILED, f"internal error (incident {incident})")
        finally:
            run.budget.close()
            if run.line_errors:
                logger.info("import task %s: %s", task_id, run.summary())
            self._running.pop(task_id, None)
            self._runs.pop(task_id, None)
            self._wake.set()

    async def _finish(self, task_id: str, state: str, error: str | None) -> None:
        with contextlib.suppress(LostOwnership):
            await asyncio.to_thread(self.tasks.finish, task_id, self.owner, state, error=error)

    # -- one task --------------------------------------------------------------------------------

    async def _import(self, run: Run) -> None:
        task_id = run.task_id
        task = await asyncio.to_thread(self.tasks.get, task_id)
        run.save_image = task.save_image
        self._check_library(task)
        task = await asyncio.to_thread(self.tasks.start, task_id, self.owner)
        if task.total is None and is_local_source(task.source):
            total = await asyncio.to_thread(self._count, task.source, run.stop)
            if total > self.settings.max_task_lines:
                raise TaskFailed(self._too_many_lines())
            await asyncio.to_thread(self.tasks.set_total, task_id, self.owner, total)
        stream = await asyncio.to_thread(self._open, task.source, run.stop)
        try:
            reader = self._reader(stream, run.budget)
            await asyncio.to_thread(self._guarded_read, reader.skip, task.lines_done)
            await self._pipeline(task, reader, run)
        finally:
            if run.stop.is_set():  # cancelled: a read may still be blocked in its thread; do not wait
                asyncio.get_running_loop().run_in_executor(None, stream.close)
            else:
                await asyncio.to_thread(stream.close)
        await asyncio.to_thread(self.tasks.set_total, task_id, self.owner, reader.records)
        done = await asyncio.to_thread(self.tasks.get, task_id)
        if done.succeeded == 0 and done.failed == 0:
            await self._finish(
                task_id, FAILED, "the source holds no records (it is empty or only blank lines)"
            )
        elif done.failed == 0:
            await self._finish(task_id, SUCCEEDED, None)
        elif done.succeeded == 0:
            await self._finish(task_id, FAILED, "no line could be imported; see errors")
        else:
            await self._finish(task_id, PARTIALLY_SUCCEEDED, None)

    def _open(self, source: str, stop: threading.Event | None = None) -> IO[bytes]:
        try:
            return open_source(source, policy=self.policy, limits=self.settings.source_limits(), stop=stop)
        except FetchError as exc:
            raise TaskFailed(f"source: {exc}") from None

    def _reader(self, stream: IO[bytes], budget: ByteBudget | None) -> LineReader:
        return LineReader(
            stream,
            max_line_bytes=self.settings.max_line_bytes,
            max_blank_lines=self.settings.max_blank_lines,
            budget=budget,
            extra_bytes=self.image_reservation if budget is not None else 0,
        )

    def _read_lines(
        self,
        reader: LineReader,
        n: int,
        run: Run,
        hand_on: Callable[[ParsedLine | LineError], None] | None = None,
    ) -> tuple[list[ParsedLine | LineError], int]:
        """Up to ``n`` lines, parsed here (in the reader's thread) so that the image reservation the
        reader took with each line is given back at once by every line that will not fetch (an error,
        ``image_base64``); each line is given to ``hand_on`` as soon as it is parsed, before the next
        one is read. Returns the lines and the bytes they hold."""
        out: list[ParsedLine | LineError] = []
        held = 0
        for line, raw in reader.iter_chunk(n):
            if raw is None:  # over-long: the reader kept nothing for it
                out.append(LineError(line, self._too_long()))
                if hand_on is not None:
                    hand_on(out[-1])
                continue
            try:
                item = parse_line(
                    raw, line, tag_limits=self.tag_limits, max_image_bytes=self.image_limits.max_bytes
                )
            except Exception as exc:  # a bug must cost one line, not the task
                item = self._internal_error(run, line, exc)
            fetches = isinstance(item, ParsedLine) and item.data is None
            if not fetches:
                run.budget.give(self.image_reservation)
            held += len(raw) + (self.image_reservation if fetches else 0)
            out.append(item)
            if hand_on is not None:
                hand_on(item)
        return out, held

    def _hand_on(
        self, loop: asyncio.AbstractEventLoop, chunk: Chunk, run: Run, item: ParsedLine | LineError
    ) -> None:
        """From the reader's thread: start preparing (fetching) ``item`` on the event loop at once.
        The loop runs these in the order they were called, and all of them before the read's result."""
        if chunk.open:
            loop.call_soon_threadsafe(self._start_prepare, chunk, run, item)

    def _start_prepare(self, chunk: Chunk, run: Run, item: ParsedLine | LineError) -> None:
        if not chunk.open:  # the pipeline ended while the line was on its way
            return
        if isinstance(item, ParsedLine) and item.data is None:
            run.pending_fetches += 1
        chunk.prepares.append(asyncio.create_task(self._prepare_slot(item, chunk, run)))

    def _too_long(self) -> str:
        return f"line is longer than {self.settings.max_line_bytes} bytes (imports.max_line_bytes)"

    def _count(self, source: str, stop: threading.Event) -> int:
        stream = self._open(source, stop)
        try:
            return self._guarded_read(self._reader(stream, None).count_rest)
        finally:
            stream.close()

    @staticmethod
    def _guarded_read(read: Callable[..., T], *args: Any) -> T:
        try:
            return read(*args)
        except SourceStopped:
            raise
        except (SourceLimitExceeded, TooManyBlankLines) as exc:
            raise TaskFailed(str(exc)) from None
        except Exception as exc:  # a dropped connection, a corrupt gzip stream, an fsspec backend error
            raise TaskFailed(f"reading the source failed: {type(exc).__name__}: {exc}") from exc

    def _too_many_lines(self) -> str:
        return (
            f"the source holds more than {self.settings.max_task_lines} records (imports.max_task_lines); "
            "split it into several tasks"
        )

    def _check_library(self, task: Task) -> None:
        try:
            info = self.catalog.get(task.library_name)
        except LibraryNotFound:
            info = None
        if info is None or info.uid != task.library_uid:
            raise TaskFailed(f"library {task.library_name!r} was deleted while the import ran")

    async def _pipeline(self, task: Task, reader: LineReader, run: Run) -> None:
        """Read chunks, process up to ``chunks_in_flight`` of them at once, commit them in order.

        Every byte a task holds between reading and committing is in the task's budget (and the
        runner's), so fetched images stay inside it too. The reader takes each line's bytes, and with
        them ``image_reservation`` (``limits.max_image_bytes``, the most a fetched image may have)
        before reading it: the line is parsed at once, in the reader's thread, and a line that will
        not fetch gives the reservation back there. Each line is then handed to the fetch/decode
        pipeline at once (``_hand_on``), while its chunk still fills, so fetches do not wait for
        the chunk to be handed on (they ran in waves when they did); encoding and the commit still
        go chunk by chunk, in order. A line that fetches keeps it until its fetch
        ends, then gives back what the image does not need (all of it after a failed fetch, or once
        decoded when ``save_image`` is false); a kept image holds its real size until the commit,
        which gives the rest of its chunk's bytes back. The reservation is taken before the line
        joins a chunk, not when the fetch starts: a fetch that waited for room could wait for bytes
        that only a later chunk's commit frees, and later chunks commit after its own (a deadlock).

        When the budget has no room: while lines are still fetching (their unused
        reservations come back without a commit) the chunk waits for them and goes on filling;
        otherwise it ends early and the oldest chunk in flight is committed; with nothing in flight
        the task waits for other tasks' commits. A line always fits an empty task budget
        (``max_task_bytes_in_flight`` is more than ``max_line_bytes`` plus the image reservation).
        """
        inflight: collections.deque[tuple[Chunk, asyncio.Task[tuple[list[Prepared], list[LineError]]]]]
        inflight = collections.deque()
        loop = asyncio.get_running_loop()
        chunk = Chunk()  # the chunk being filled: its lines are fetched as they are read
        try:
            while True:
                run.released.clear()
                more, more_held = await asyncio.to_thread(
                    self._guarded_read,
                    self._read_lines,
                    reader,
                    self.settings.chunk_lines - len(chunk.lines),
                    run,
                    functools.partial(self._hand_on, loop, chunk, run),
                )
                chunk.lines += more
                chunk.held += more_held
                if reader.records > self.settings.max_task_lines:
                    raise TaskFailed(self._too_many_lines())
                if (
                    reader.starved
                    and not reader.eof
                    and run.pending_fetches > 0
                    and not (inflight and inflight[0][1].done())  # else commit the oldest chunk first
                ):
                    await run.released.wait()  # a fetch gave back part of its reservation: read on
                    continue
                if chunk.lines:
                    if len(chunk.prepares) != len(chunk.lines):  # _hand_on's ordering guarantee
                        raise RuntimeError(
                            f"{len(chunk.prepares)} lines handed on for {len(chunk.lines)} read"
                        )
                    chunk.end_line = reader.line_no
                    inflight.append((chunk, asyncio.create_task(self._process(task, chunk, run))))
                    chunk = Chunk()
                while inflight and (
                    reader.eof or reader.starved or len(inflight) >= self.settings.chunks_in_flight
                ):
                    done, work = inflight.popleft()
                    await self._commit(task, done.end_line, *(await work), run)
                    run.budget.give(done.held)
                    if reader.starved:
                        break  # room again: read on
                if reader.eof:
                    return
                if reader.starved and not inflight:  # other tasks hold the runner's budget
                    while not run.budget.has_room(reader.reservation):
                        await asyncio.sleep(0.05)
        finally:
            chunks = [chunk, *(c for c, _ in inflight)]
            for c in chunks:
                c.open = False
            works = [t for c in chunks for t in c.prepares] + [w for _, w in inflight]
            for t in works:
                t.cancel()
            await asyncio.gather(*works, return_exceptions=True)

    async def _commit(
        self, task: Task, end_line: int, ready: list[Prepared], errors: list[LineError], run: Run
    ) -> None:
        if run.stop.is_set():
            raise SourceStopped("the task was cancelled")
        run.idle.clear()
        try:
            await self._write_and_record(task, end_line, ready, errors, run)
        finally:
            run.idle.set()

    async def _write_and_record(
        self, task: Task, end_line: int, ready: list[Prepared], errors: list[LineError], run: Run
    ) -> None:
        self._check_library(task)
        run.tally(errors)
        if ready:
            records = [
                NewRecord(
                    image_id=p.image_id,
                    image_uri=p.image_uri,
                    vector=p.vector,  # type: ignore[arg-type]
                    tags=p.tags,
                    vector_kind="whole",
                    frame=p.data if task.save_image else None,
                )
                for p in ready
            ]
            try:
                await self._retry(
                    "writing to the library", lambda: self.write(task.library_name, task.library_uid, records)
                )
            except LibraryNotFound:
                raise TaskFailed(f"library {task.library_name!r} was deleted while the import ran") from None
        await asyncio.to_thread(
            self.tasks.commit_chunk,
            task.task_id,
            self.owner,
            lines_done=end_line,
            succeeded=len(ready),
            errors=errors,
        )

    async def _process(self, task: Task, chunk: Chunk, run: Run) -> tuple[list[Prepared], list[LineError]]:
        """Prepare every line of a chunk; encode the good ones in batches as they become ready."""
        loop = asyncio.get_running_loop()
        prepares = chunk.prepares  # started while the chunk filled (_start_prepare)
        encodes: list[asyncio.Task[list[Prepared]]] = []
        errors: list[LineError] = []
        batch: list[Prepared] = []
        try:
            for next_done in asyncio.as_completed(prepares):
                outcome = await next_done
                if isinstance(outcome, LineError):
                    errors.append(outcome)
                    continue
                batch.append(outcome)
                if len(batch) == self.settings.encode_batch_size:
                    encodes.append(loop.create_task(self._encode_batch(batch)))
                    batch = []
            if batch:
                encodes.append(loop.create_task(self._encode_batch(batch)))
            ready = [p for work in encodes for p in await work]
        finally:
            for t in (*prepares, *encodes):
                t.cancel()
        ready.sort(key=lambda p: p.line)  # in file order: a later duplicate key wins in the upsert
        errors.sort(key=lambda e: e.line)
        return ready, errors

    async def _prepare_slot(
        self, item: ParsedLine | LineError, chunk: Chunk, run: Run
    ) -> Prepared | LineError:
        if isinstance(item, LineError):
            return item
        fetches = item.data is None
        try:
            async with self._prepare_slots:
                return await self._prepare(item, chunk, run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must cost one line, not the task
            return self._internal_error(run, item.line, exc)
        finally:
            if fetches:  # its reservation is settled (given back, or the kept image's size)
                run.pending_fetches -= 1
                run.released.set()

    def _internal_error(self, run: Run, line: int, exc: Exception) -> LineError:
        incident = uuid.uuid4().hex[:12]
        run.internal_errors += 1
        if run.internal_errors == 1:  # in full once per task; the rest are in the task's tally
            logger.error(
                "import task %s line %d: internal error %s (further ones are only counted)",
                run.task_id,
                line,
                incident,
                exc_info=exc,
            )
        return LineError(line, f"internal error (incident {incident})")

    async def _prepare(self, parsed: ParsedLine, chunk: Chunk, run: Run) -> Prepared | LineError:
        loop = asyncio.get_running_loop()
        line = parsed.line
        if parsed.data is not None:
            return await self._decode(parsed, parsed.data, "image_base64", run)
        reserved = self.image_reservation  # taken by the reader with the line (see _pipeline)
        try:
            try:
                data = await loop.run_in_executor(
                    self._fetch_pool,
                    lambda: self.policy.fetch_image(
                        parsed.image_uri,
                        max_bytes=self.image_limits.max_bytes,
                        retries=self.settings.fetch_retries,
                        pools=self._connections,
                    ),
                )
            except (FetchError, ImageTooLarge) as exc:
                return LineError(line, f"image_uri: {exc}", parsed.image_id, parsed.image_uri)
            except ValueError:  # urlsplit on a malformed URI, e.g. http://[127.0.0.1]/x.jpg
                return LineError(line, "image_uri: not a valid URI", parsed.image_id, parsed.image_uri)
            if run.save_image:  # kept for the commit (the frame): it holds its real size until then
                chunk.release(run, reserved - len(data))
                reserved = 0
            return await self._decode(parsed, data, "image_uri", run)
        finally:
            if reserved:  # failed, or not kept: the whole reservation comes back at once
                chunk.release(run, reserved)

    async def _decode(
        self, parsed: ParsedLine, data: bytes, field_name: str, run: Run
    ) -> Prepared | LineError:
        loop = asyncio.get_running_loop()
        try:
            pixels = await loop.run_in_executor(self._cpu_pool, self._pixels, data)
        except (ImageDecodeError, ImageTooLarge) as exc:
            return LineError(parsed.line, f"{field_name}: {exc}", parsed.image_id, parsed.image_uri)
        kept = data if run.save_image else b""
        return Prepared(parsed.line, parsed.image_id, parsed.image_uri, parsed.tags, kept, pixels)

    def _pixels(self, data: bytes) -> np.ndarray:
        img = decode_image(data, self.image_limits, min_side_hint=max(self.preprocess.size))
        return prepare_for_model(img, self.preprocess)

    async def _encode_batch(self, batch: list[Prepared]) -> list[Prepared]:
        pixels = np.stack([p.pixels for p in batch])  # type: ignore[misc]
        async with self._encode_slots:
            vectors = await self._retry("encoding", lambda: self.encode(pixels))
        if len(vectors) != len(batch):
            raise RuntimeError(f"the encoder returned {len(vectors)} vectors for {len(batch)} images")
        for p, v in zip(batch, vectors, strict=True):
            p.vector = np.asarray(v, dtype=np.float32)
            p.pixels = None  # the frame bytes are kept for the write; the pixels are not needed any more
        return batch

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a call to another service with backoff (a replica restarting, a full queue)."""
        delay = 0.5
        for attempt in range(self.settings.step_retries + 1):
            try:
                return await call()
            except (LibraryNotFound, asyncio.CancelledError):
                raise
            except Exception as exc:
                if attempt == self.settings.step_retries:
                    raise TaskFailed(
                        f"{what} failed {attempt + 1} times; last error: {type(exc).__name__}: {exc}"
                    ) from exc
                logger.warning("%s failed (%r); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)
        raise AssertionError("unreachable")
