"""The in-memory vector table of one library: vectors, tag columns and a live bitmap, slot-aligned.

A *slot* is a position in the table; a *row id* is the record's key in SQLite. An upsert or a tag
update kills the record's old slot and appends a new one, a delete kills the slot: the FAISS index is
append-only and every search ANDs the live bitmap in. When more than ``COMPACT_DEAD_FRACTION`` of the
slots are dead the table is compacted (rebuilt from its live slots).

Memory ownership: the vectors live inside the ``faiss.IndexFlatIP`` (its ``xb`` buffer). ``_xb()``
returns a numpy *view* of that buffer, valid only until the next ``add`` (which may reallocate it), so
it is never kept across calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from filters import TagColumns, evaluate
from index.store import VECTOR_KINDS, Change

logger = logging.getLogger(__name__)

COMPACT_DEAD_FRACTION = 0.2
COMPACT_MIN_DEAD = 64
#: At or below this many candidate rows, gather them and search exactly; above it, scan the index
#: with a bitmap selector. Gathering costs a copy of m vectors; the selector scan costs all N.
EXACT_GATHER_MAX = 20_000
EXACT_GATHER_FRACTION = 0.05

_KIND_CODES = {k: i for i, k in enumerate(VECTOR_KINDS)}


@dataclass(frozen=True)
class SearchHits:
    row_ids: np.ndarray  # int64, best first
    cosines: np.ndarray  # float32, descending
    candidates: int  # rows that passed the filter (and kind) before ranking


class VectorTable:
    """Slot-aligned vectors + tags + liveness for one library. Not thread-safe: callers lock."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexFlatIP(dim)
        self.row_ids = np.empty(0, dtype=np.int64)
        self.kinds = np.empty(0, dtype=np.int8)
        self.live = np.empty(0, dtype=bool)
        self.tags = TagColumns()
        self.slot_of: dict[int, int] = {}
        self.applied_seq = 0

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        dim: int,
        vectors: np.ndarray,
        row_ids: np.ndarray,
        kinds: np.ndarray,
        tags: TagColumns,
        applied_seq: int,
    ) -> VectorTable:
        """A table whose slots are all live (a snapshot)."""
        table = cls(dim)
        if len(row_ids):
            table.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        table.row_ids = np.asarray(row_ids, dtype=np.int64).copy()
        table.kinds = np.asarray(kinds, dtype=np.int8).copy()
        table.live = np.ones(len(row_ids), dtype=bool)
        table.tags = tags
        table.slot_of = {int(r): i for i, r in enumerate(table.row_ids)}
        table.applied_seq = applied_seq
        return table

    def __len__(self) -> int:
        """Number of slots (live and dead)."""
        return len(self.row_ids)

    @property
    def live_count(self) -> int:
        return len(self.slot_of)

    def apply(self, changes: Iterable[Change]) -> int:
        """Apply rows from the store's change feed (in seq order). Returns how many were applied."""
        new_vecs: list[np.ndarray] = []
        new_rows: list[int] = []
        new_kinds: list[int] = []
        pending: dict[int, int] = {}  # row id -> index into new_* (a row may change twice in a batch)
        dead_pending: set[int] = set()
        applied = 0
        for ch in changes:
            applied += 1
            old = self.slot_of.pop(ch.row_id, None)
            if old is not None:
                self.live[old] = False
            if ch.row_id in pending:
                dead_pending.add(pending.pop(ch.row_id))
            if not ch.deleted:
                if ch.vector is None:
                    raise RuntimeError(f"store sent live row {ch.row_id} without a vector")
                pending[ch.row_id] = len(new_rows)
                new_vecs.append(ch.vector)
                new_rows.append(ch.row_id)
                new_kinds.append(_KIND_CODES[ch.vector_kind])
                self.tags.append(ch.tags)
            self.applied_seq = max(self.applied_seq, ch.seq)
        if new_rows:
            base = len(self.row_ids)
            self.index.add(np.ascontiguousarray(np.stack(new_vecs), dtype=np.float32))
            self.row_ids = np.concatenate([self.row_ids, np.asarray(new_rows, dtype=np.int64)])
            self.kinds = np.concatenate([self.kinds, np.asarray(new_kinds, dtype=np.int8)])
            fresh = np.ones(len(new_rows), dtype=bool)
            fresh[list(dead_pending)] = False
            self.live = np.concatenate([self.live, fresh])
            for row_id, i in pending.items():
                self.slot_of[row_id] = base + i
        if self._should_compact():
            self.compact()
        return applied

    def _should_compact(self) -> bool:
        dead = len(self.row_ids) - self.live_count
        return dead >= COMPACT_MIN_DEAD and dead > COMPACT_DEAD_FRACTION * len(self.row_ids)

    def compact(self) -> None:
        """Drop dead slots (rebuilds the FAISS index from the live vectors)."""
        keep = np.flatnonzero(self.live)
        logger.info("compacting vector table: %d live of %d slots", len(keep), len(self.row_ids))
        vectors = self._xb()[keep].copy() if len(keep) else np.empty((0, self.dim), np.float32)
        rebuilt = VectorTable.from_arrays(
            self.dim, vectors, self.row_ids[keep], self.kinds[keep], self.tags.take(keep), self.applied_seq
        )
        self.__dict__.update(rebuilt.__dict__)

    # -- reading ---------------------------------------------------------------------------------

    def _xb(self) -> np.ndarray:
        n = self.index.ntotal
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

    def vector(self, row_id: int) -> np.ndarray | None:
        slot = self.slot_of.get(row_id)
        return None if slot is None else self._xb()[slot].copy()

    def live_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, TagColumns]:
        """Copies of the live vectors, row ids, kinds and tags (for snapshots)."""
        keep = np.flatnonzero(self.live)
        vectors = self._xb()[keep].copy() if len(keep) else np.empty((0, self.dim), np.float32)
        return vectors, self.row_ids[keep].copy(), self.kinds[keep].copy(), self.tags.take(keep)

    def candidates(self, node: object, vector_kind: str | None) -> np.ndarray:
        """The bool mask of slots a query may return: live, of the query's kind, passing the filter."""
        mask = self.live.copy()
        if vector_kind is not None:
            mask &= self.kinds == _KIND_CODES[vector_kind]
        if node is not None and mask.any():
            mask &= evaluate(node, self.tags)  # type: ignore[arg-type]
        return mask

    def search(
        self, query: np.ndarray, k: int, node: object = None, vector_kind: str | None = None
    ) -> SearchHits:
        """Exact top-k by inner product among the candidate slots.

        The filter is applied before ranking: the result is the true top-k of the rows that pass it.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        mask = self.candidates(node, vector_kind)
        m = int(mask.sum())
        k = min(k, m)
        if k == 0:
            return SearchHits(np.empty(0, np.int64), np.empty(0, np.float32), m)
        n = len(self.row_ids)
        if m <= max(EXACT_GATHER_MAX, int(EXACT_GATHER_FRACTION * n)) and m < n:
            slots = np.flatnonzero(mask)
            dist, idx = faiss.knn(q, self._xb()[slots], k, metric=faiss.METRIC_INNER_PRODUCT)
            found = slots[idx[0]]
        elif m == n:
            dist, idx = self.index.search(q, k)
            found = idx[0]
        else:
            bits = np.packbits(mask, bitorder="little")  # must outlive the search: FAISS keeps a pointer
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)))
            dist, idx = self.index.search(q, k, params=params)
            found = idx[0]
        ok = found >= 0
        return SearchHits(self.row_ids[found[ok]], dist[0][ok].astype(np.float32), m)
