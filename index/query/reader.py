"""What a LibraryIndex replica holds for one library: a vector table kept in step with the record store
(SQLite, or PostgreSQL in cluster mode).

``catch_up()`` runs before every answer: one cheap ``last_seq`` read, and when the store is ahead, an
incremental apply of just the new rows into the table's exact tail (or a full reload when the table is
far behind). So an add or a delete acknowledged by the writer is visible to the very next search on
every replica.

Snapshots written meanwhile by the writer (a tail folded into the index, a compaction, a switch from
flat to HNSW) are picked up without blocking: ``catch_up`` notices that ``snapshots/CURRENT`` changed
and loads the new snapshot in a background thread (memory-mapped, so about a second even at 1M rows)
while searches go on against the current table; the next ``catch_up`` after the load swaps the new table
in and applies whatever was committed after it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from pathlib import Path

import numpy as np

from index.query.merge import RANK_KEY
from index.search.ann import DEFAULT_CONFIG, IndexConfig
from index.search.table import SearchHits, VectorTable
from index.storage.backends import LibraryData, local_library
from index.storage.embedded.snapshot import LocalSnapshots, Snapshots
from index.storage.embedded.store import StoredRecord
from index.storage.interfaces import RecordStore

logger = logging.getLogger(__name__)

#: Reload from snapshot + replay rather than apply incrementally when more rows than this fraction of
#: the table changed (an incremental apply of most of a library costs more than a fresh load).
RELOAD_FRACTION = 0.5


def load_table(
    store: RecordStore,
    snapshots: Snapshots | Path,
    *,
    model_identity: str,
    config: IndexConfig = DEFAULT_CONFIG,
    writable: bool = False,
) -> tuple[VectorTable, str | None]:
    """Snapshot (if any) + replay of every row committed after it.

    Returns:
        The table and the name of the snapshot it started from (None: a full replay).
    """
    started = time.perf_counter()
    # Read the committed seq BEFORE replaying: everything up to it is then certainly in the replay.
    # Reading it after would race with a commit landing in between, and the table would claim a seq
    # whose rows it never saw (a snapshot built from it would lose them for good).
    last = store.last_seq()
    if isinstance(snapshots, Path):
        snapshots = LocalSnapshots(snapshots)
    loaded = snapshots.load(model_identity=model_identity, dim=store.dim, config=config, writable=writable)
    if loaded is None:
        table, name = VectorTable(store.dim, config), None
        table.apply(store.changes_since(0, live_only=True))
    else:
        table, name = loaded
        table.apply(store.changes_since(table.applied_seq))
    table.applied_seq = max(table.applied_seq, last)
    logger.info(
        "loaded %s: %d vectors (%s index, %d in the tail) at seq %d in %.3fs (%s)",
        snapshots.label,
        table.live_count,
        table.kind,
        table.tail_count,
        table.applied_seq,
        time.perf_counter() - started,
        f"snapshot {name} + replay" if name else "full replay",
    )
    return table, name


class LibraryReader:
    """Read path of one library. Thread-safe: searches and catch-ups serialise on one lock.

    Args:
        library: the library's data (``index.storage.backends.Storage.library``), or an embedded library's
            directory.
        model_identity: the model the library must have been built with.
        config: planner thresholds and search effort.
        background_pickup: load newer snapshots in a background thread (False: synchronously inside
            ``catch_up``, for tests and tools that want determinism).
    """

    def __init__(
        self,
        library: LibraryData | str | Path,
        *,
        model_identity: str,
        config: IndexConfig = DEFAULT_CONFIG,
        background_pickup: bool = True,
    ) -> None:
        self.library = library if isinstance(library, LibraryData) else local_library(library)
        self.label = self.library.label
        self.snapshots = self.library.snapshots
        self.model_identity = model_identity
        self.config = config
        self.background_pickup = background_pickup
        self._store = self.library.open_store(True)
        self._lock = threading.Lock()
        self._table, self._snapshot = self._load(self._store)
        self._loading: threading.Thread | None = None
        self._attempted: str | None = None
        self._loaded: tuple[VectorTable, str | None] | None = None
        self._closed = False

    def _load(self, store: RecordStore) -> tuple[VectorTable, str | None]:
        return load_table(store, self.snapshots, model_identity=self.model_identity, config=self.config)

    @property
    def applied_seq(self) -> int:
        return self._table.applied_seq

    @property
    def snapshot(self) -> str | None:
        """The name of the snapshot the current table was loaded from."""
        return self._snapshot

    @property
    def kind(self) -> str:
        return self._table.kind

    @property
    def table(self) -> VectorTable:
        """The current table (for inspection; mutate it only through the reader)."""
        return self._table

    def catch_up(self) -> int:
        """Bring the table up to the store's latest commit. Returns the rows applied."""
        with self._lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        self._pick_up_snapshot_locked()
        last = self._store.last_seq()
        if last <= self._table.applied_seq:
            return 0
        pending = self._store.count_changed_since(self._table.applied_seq)
        if pending > max(1000, RELOAD_FRACTION * self._table.live_count):
            self._table, self._snapshot = self._load(self._store)
            return pending
        applied = self._table.apply(self._store.changes_since(self._table.applied_seq))
        self._table.applied_seq = max(self._table.applied_seq, last)
        return applied

    def _pick_up_snapshot_locked(self) -> None:
        """Swap in a snapshot loaded in the background; start loading one when CURRENT changed."""
        if self._loaded is not None:
            # The loaded table may trail this one by a few commits: the catch-up that follows applies
            # them (the store, not the table, is the source of truth).
            table, name = self._loaded
            self._loaded = None
            logger.info("%s: switching to snapshot %s (%s index)", self.label, name, table.kind)
            self._table, self._snapshot = table, name
        if self._loading is not None:
            return
        name = self.snapshots.current_name()
        if name is None or name in (self._snapshot, self._attempted):
            return
        self._attempted = name  # a snapshot that fails to load is not retried on every search
        if not self.background_pickup:
            self._table, self._snapshot = self._load(self._store)
            return
        self._loading = threading.Thread(
            target=self._load_in_background, name=f"pickup-{self.label}", daemon=True
        )
        self._loading.start()

    def _load_in_background(self) -> None:
        try:
            store = self.library.open_store(True)  # its own connection: no lock contention
            try:
                loaded = self._load(store)
            finally:
                store.close()
        except Exception:
            logger.exception("%s: loading a new snapshot failed; the current table stays", self.label)
            loaded = None
        with self._lock:
            if not self._closed and loaded is not None:
                self._loaded = loaded
            self._loading = None

    def wait_for_pickup(self, timeout: float | None = None) -> None:
        """Wait for a background snapshot load to finish (tests, tools), then catch up."""
        thread = self._loading
        if thread is not None:
            thread.join(timeout)
        self.catch_up()

    def search(
        self,
        query: np.ndarray,
        k: int,
        node: object = None,
        vector_kind: str | None = None,
        recall_target: float | None = None,
        max_filter_work: int | None = None,
    ) -> SearchHits:
        """Catch up, then return the top-k among rows passing ``node`` (see VectorTable.search)."""
        with self._lock:
            self._catch_up_locked()
            return self._table.search(query, k, node, vector_kind, recall_target, max_filter_work)

    def vector_of(self, row_id: int) -> np.ndarray | None:
        with self._lock:
            self._catch_up_locked()
            return self._table.vector(row_id)

    def records(self, row_ids: np.ndarray) -> dict[int, StoredRecord]:
        return self._store.fetch(row_ids.tolist())

    def get(self, image_id: str, image_uri: str | None) -> list[StoredRecord]:
        return self._store.get(image_id, image_uri)

    def read_frame(self, frame: str) -> bytes | None:
        return self._store.read_frame(frame)

    @property
    def live_count(self) -> int:
        return self._table.live_count

    def close(self) -> None:
        """Release the record store's connection (idempotent)."""
        with self._lock:
            self._closed = True
        self._store.close()

    def __del__(self) -> None:
        # Serve's multiplexing calls __del__ explicitly when it evicts a library (LRU): release the
        # connection then, not whenever the garbage collector gets to it. A half-built reader has no store.
        if getattr(self, "_store", None) is not None and hasattr(self, "_lock"):
            self.close()


def result_objects(
    reader: LibraryReader,
    hits: SearchHits,
    scores: np.ndarray,
    *,
    min_score: float | None,
    return_frame: bool,
    with_rank: bool = False,
) -> list[dict[str, object]]:
    """The API's result objects for ranked hits (records deleted since the search are skipped).

    ``with_rank`` adds each hit's raw cosine under ``index.query.merge.RANK_KEY``: what the merge of a
    sharded search ranks by (scores are clipped and rounded, so they tie where cosines do not)."""
    records = reader.records(hits.row_ids)
    out: list[dict[str, object]] = []
    for row_id, score, cosine in zip(
        hits.row_ids.tolist(), scores.tolist(), hits.cosines.tolist(), strict=True
    ):
        if min_score is not None and score < min_score:
            break  # scores are sorted descending
        rec = records.get(row_id)
        if rec is None:
            continue
        obj = record_object(reader, rec, return_frame=return_frame)
        tags = obj.pop("tags")
        out.append({**obj, "score": round(float(score), 6), "tags": tags})  # the spec's field order
        if with_rank:
            out[-1][RANK_KEY] = float(cosine)
    return out


def record_object(reader: LibraryReader, rec: StoredRecord, *, return_frame: bool) -> dict[str, object]:
    frame = None
    if return_frame and rec.frame is not None:
        data = reader.read_frame(rec.frame)
        frame = base64.b64encode(data).decode("ascii") if data is not None else None
    return {
        "image_id": rec.image_id,
        "image_uri": rec.image_uri,
        "image_base64": frame,
        "tags": rec.tags,
    }
