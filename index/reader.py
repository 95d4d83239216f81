"""What a LibraryIndex replica holds for one library: a vector table kept in step with SQLite.

``catch_up()`` runs before every answer: one cheap ``last_seq`` read, and when the store is ahead, an
incremental apply of just the new rows (or a full reload when the table is far behind). So an add or a
delete acknowledged by the writer is visible to the very next search on every replica.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from pathlib import Path

import numpy as np

from index.snapshot import load_snapshot
from index.store import LibraryStore, StoredRecord
from index.table import SearchHits, VectorTable

logger = logging.getLogger(__name__)

#: Reload from snapshot + replay rather than apply incrementally when more rows than this fraction of
#: the table changed (an incremental apply of most of a library costs more than a fresh load).
RELOAD_FRACTION = 0.5


def load_table(store: LibraryStore, library_dir: Path, *, model_identity: str) -> VectorTable:
    """Snapshot (if any) + replay of every row committed after it."""
    started = time.perf_counter()
    # Read the committed seq BEFORE replaying: everything up to it is then certainly in the replay.
    # Reading it after would race with a commit landing in between, and the table would claim a seq
    # whose rows it never saw (a snapshot built from it would lose them for good).
    last = store.last_seq()
    table = load_snapshot(library_dir, model_identity=model_identity, dim=store.dim)
    from_snapshot = table is not None
    if table is None:
        table = VectorTable(store.dim)
        table.apply(store.changes_since(0, live_only=True))
    else:
        table.apply(store.changes_since(table.applied_seq))
    table.applied_seq = max(table.applied_seq, last)
    logger.info(
        "loaded %s: %d vectors at seq %d in %.3fs (%s)",
        library_dir.name,
        table.live_count,
        table.applied_seq,
        time.perf_counter() - started,
        "snapshot + replay" if from_snapshot else "full replay",
    )
    return table


class LibraryReader:
    """Read path of one library. Thread-safe: searches and catch-ups serialise on one lock."""

    def __init__(self, library_dir: str | Path, *, model_identity: str) -> None:
        self.dir = Path(library_dir)
        self.model_identity = model_identity
        self._store = LibraryStore(self.dir, readonly=True)
        self._lock = threading.Lock()
        self._table = load_table(self._store, self.dir, model_identity=model_identity)

    @property
    def applied_seq(self) -> int:
        return self._table.applied_seq

    def catch_up(self) -> int:
        """Bring the table up to the store's latest commit. Returns the rows applied."""
        with self._lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        last = self._store.last_seq()
        if last <= self._table.applied_seq:
            return 0
        pending = self._store.count_changed_since(self._table.applied_seq)
        if pending > max(1000, RELOAD_FRACTION * self._table.live_count):
            self._table = load_table(self._store, self.dir, model_identity=self.model_identity)
            return pending
        applied = self._table.apply(self._store.changes_since(self._table.applied_seq))
        self._table.applied_seq = max(self._table.applied_seq, last)
        return applied

    def search(
        self, query: np.ndarray, k: int, node: object = None, vector_kind: str | None = None
    ) -> SearchHits:
        """Catch up, then return the exact top-k among rows passing ``node`` (see VectorTable.search)."""
        with self._lock:
            self._catch_up_locked()
            return self._table.search(query, k, node, vector_kind)

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
        self._store.close()


def result_objects(
    reader: LibraryReader,
    hits: SearchHits,
    scores: np.ndarray,
    *,
    min_score: float | None,
    return_frame: bool,
) -> list[dict[str, object]]:
    """The API's result objects for ranked hits (records deleted since the search are skipped)."""
    records = reader.records(hits.row_ids)
    out: list[dict[str, object]] = []
    for row_id, score in zip(hits.row_ids.tolist(), scores.tolist(), strict=True):
        if min_score is not None and score < min_score:
            break  # scores are sorted descending
        rec = records.get(row_id)
        if rec is None:
            continue
        obj = record_object(reader, rec, return_frame=return_frame)
        tags = obj.pop("tags")
        out.append({**obj, "score": round(float(score), 6), "tags": tags})  # the spec's field order
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
