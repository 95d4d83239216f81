"""The in-memory vector table of one library: vectors, tag columns and a live bitmap, slot-aligned,
and the query planner that searches it.

A *slot* is a position in the table; a *row id* is the record's key in SQLite. An upsert or a tag
update kills the record's old slot and appends a new one, a delete kills the slot: every search ANDs
the live bitmap in, so FAISS indexes never need ``remove_ids`` (HNSW has none).

Slots ``[0, base_count)`` are the *base*: an index of some kind (`index.search.ann`) loaded from a snapshot or
built by the writer. Slots from ``base_count`` on are the *tail*: rows applied since that snapshot, kept
as plain float32 vectors and always searched exactly. The tail is what gives read-your-writes without
touching the base: a reader appends new rows to it in microseconds, and the writer's next snapshot folds
them into the base (HNSW ``add``) or rebuilds the base (compaction, a change of kind) in the background.
The writer bounds the tail (``IndexConfig.snapshot_max_tail_rows``), so its exact scan stays cheap.

The query planner (`VectorTable.search`, DESIGN.md "Filtered search"):

1. Price the filter against these tags (`filters.work`; over ``max_filter_work``: InvalidParameter,
   nothing evaluated), evaluate it to a bool mask over all slots (vectorised, `filters.evaluate`), AND
   the live bitmap and the vector kind in, count the passing rows m.
2. m = 0: no results. m <= ``max(exact_max_candidates, exact_max_fraction * slots)``: exact search over
   just those rows (their vectors are gathered in chunks).
3. Otherwise the plan (`VectorTable.plan`): the cheapest setting the base's calibration measured to
   reach the recall target at this selectivity (`index.search.calibration`; the config's fixed efforts when
   the base was not calibrated). No setting reaches it, a target of 1.0, or fewer passing rows than
   the plan's expected work (`AnnBase.cost`, ``exact_by_cost``): exact search over the passing rows.
4. Else the base index searches with an ``IDSelectorBitmap`` of the passing base slots (none when
   every base slot passes) and the plan's effort; the tail is searched exactly; the two top-k lists
   merge by score. If an approximate base finds fewer than k rows while at least k pass, the search is
   redone exactly over all passing rows.

Not thread-safe: callers serialise `apply` and `search` (LibraryReader holds a lock).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import faiss
import numpy as np

from filters import FilterError, TagColumns, evaluate
from filters.work import check_work
from index.errors import InvalidParameter
from index.search.ann import DEFAULT_CONFIG, EXACT, EXACT_ROW_COST, AnnBase, IndexConfig, Plan, build_base
from index.search.calibration import Calibration, calibrate, holdout, sample
from index.search.changes import VECTOR_KINDS, Change

logger = logging.getLogger(__name__)

#: Changes are applied in batches of this many, each all-or-nothing (a replay of 1M rows never holds
#: more than one batch of Python objects).
APPLY_BATCH = 8192

_KIND_CODES = {k: i for i, k in enumerate(VECTOR_KINDS)}


@dataclass(frozen=True)
class SearchHits:
    row_ids: np.ndarray  # int64, best first
    cosines: np.ndarray  # float32, descending
    candidates: int  # rows that passed the filter (and kind) before ranking
    path: str = "exact"  # how the planner answered: empty, exact, index, index+exact


class _Grow:
    """An array that grows along its first axis geometrically: appending k rows costs O(k) amortised."""

    __slots__ = ("_data", "_size")

    def __init__(self, dtype: type, width: int | None = None, data: np.ndarray | None = None) -> None:
        shape = (16,) if width is None else (16, width)
        self._data = np.empty(shape, dtype) if data is None else data
        self._size = 0 if data is None else len(data)

    def __len__(self) -> int:
        return self._size

    def extend(self, rows: np.ndarray) -> None:
        end = self._size + len(rows)
        if end > len(self._data):
            grown = np.empty((max(end, 2 * len(self._data)), *self._data.shape[1:]), self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = rows
        self._size = end

    def truncate(self, size: int) -> None:
        self._size = min(self._size, size)

    @property
    def view(self) -> np.ndarray:
        """The rows so far: a view, valid until the next `extend` (which may reallocate)."""
        return self._data[: self._size]


class VectorTable:
    """Slot-aligned vectors + tags + liveness of one library, and its query planner.

    Args:
        dim: vector dimension.
        config: planner thresholds and search effort.
        base: the index over the first ``base.ntotal`` slots (None: every slot is in the tail).
    """

    def __init__(self, dim: int, config: IndexConfig = DEFAULT_CONFIG, base: AnnBase | None = None) -> None:
        self.dim = dim
        self.config = config
        self.base = base
        self.base_count = 0 if base is None else base.ntotal
        self._tail = _Grow(np.float32, dim)
        self._row_ids = _Grow(np.int64)
        self._kinds = _Grow(np.int8)
        self._live = _Grow(np.bool_)
        self.tags = TagColumns()
        self.slot_of: dict[int, int] = {}
        self.applied_seq = 0
        self._kinds_seen: set[int] = set()
        self._dead_in_base = 0
        #: Recall ladders measured on this base (`index.search.calibration`); None: the config's fixed
        #: efforts.
        self.calibration: Calibration | None = None

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_snapshot(
        cls,
        base: AnnBase,
        row_ids: np.ndarray,
        kinds: np.ndarray,
        live: np.ndarray,
        tags: TagColumns,
        applied_seq: int,
        config: IndexConfig = DEFAULT_CONFIG,
        calibration: Calibration | None = None,
    ) -> VectorTable:
        """A table whose slots are exactly ``base``'s (a snapshot: no tail).

        Raises:
            ValueError: the arrays and ``base`` disagree on the number of slots.
        """
        n = base.ntotal
        if not (len(row_ids) == len(kinds) == len(live) == len(tags) == n):
            raise ValueError(
                f"snapshot parts disagree: {n} vectors, {len(row_ids)} row ids, {len(kinds)} kinds, "
                f"{len(live)} live flags, {len(tags)} tag slots"
            )
        table = cls(base.dim, config, base)
        table._row_ids = _Grow(np.int64, data=np.array(row_ids, dtype=np.int64))
        table._kinds = _Grow(np.int8, data=np.array(kinds, dtype=np.int8))
        table._live = _Grow(np.bool_, data=np.array(live, dtype=np.bool_))
        table.tags = tags
        live_slots = np.flatnonzero(table._live.view)
        table.slot_of = dict(zip(table._row_ids.view[live_slots].tolist(), live_slots.tolist(), strict=True))
        table.applied_seq = applied_seq
        table._kinds_seen = set(np.unique(table._kinds.view).tolist())
        table._dead_in_base = n - len(live_slots)
        table.calibration = calibration
        return table

    def __len__(self) -> int:
        """Number of slots (live and dead)."""
        return len(self._row_ids)

    @property
    def live_count(self) -> int:
        return len(self.slot_of)

    @property
    def tail_count(self) -> int:
        return len(self) - self.base_count

    @property
    def kind(self) -> str:
        """The base index's kind (``flat`` while there is no base: the tail is searched exactly)."""
        return "flat" if self.base is None else self.base.kind

    @property
    def row_ids(self) -> np.ndarray:
        return self._row_ids.view

    @property
    def kinds(self) -> np.ndarray:
        return self._kinds.view

    @property
    def live(self) -> np.ndarray:
        return self._live.view

    def apply(self, changes: Iterable[Change]) -> int:
        """Apply rows from the store's change feed (in seq order). Returns how many were applied.

        Each batch of `APPLY_BATCH` changes is all-or-nothing: its tags and vectors are appended together
        after everything in it has been checked, so a bad row can never leave tag slots and vector slots
        out of step. When a batch fails, ``applied_seq`` stays below its first seq (a retry re-applies
        it; re-applying a row is an upsert, so that is safe) and the error propagates.
        """
        applied = 0
        it: Iterator[Change] = iter(changes)
        while batch := list(islice(it, APPLY_BATCH)):
            try:
                self._apply_batch(batch)
            except BaseException:
                self.applied_seq = min(self.applied_seq, batch[0].seq - 1)
                raise
            applied += len(batch)
        return applied

    def _apply_batch(self, batch: list[Change]) -> None:
        # 1. Plan without touching the table: which existing slots die, which rows get new slots.
        kills: list[int] = []
        touched: set[int] = set()
        pending: dict[int, int] = {}  # row id -> position among the new rows (a row may change twice)
        dead_new: list[int] = []
        vecs: list[np.ndarray] = []
        rows: list[int] = []
        kinds: list[int] = []
        tags: list[dict[str, object]] = []
        for ch in batch:
            if ch.row_id in pending:
                dead_new.append(pending.pop(ch.row_id))
            elif ch.row_id not in touched:
                touched.add(ch.row_id)
                old = self.slot_of.get(ch.row_id)
                if old is not None:
                    kills.append(old)
            if not ch.deleted:
                if ch.vector is None:
                    raise RuntimeError(f"store sent live row {ch.row_id} without a vector")
                if ch.vector.shape != (self.dim,):
                    raise ValueError(
                        f"row {ch.row_id} has a vector of shape {ch.vector.shape}, expected ({self.dim},)"
                    )
                if ch.vector_kind not in _KIND_CODES:
                    raise ValueError(f"row {ch.row_id} has unknown vector_kind {ch.vector_kind!r}")
                pending[ch.row_id] = len(rows)
                vecs.append(ch.vector)
                rows.append(ch.row_id)
                kinds.append(_KIND_CODES[ch.vector_kind])
                tags.append(ch.tags)
        new = np.stack(vecs).astype(np.float32, copy=False) if vecs else np.empty((0, self.dim), np.float32)
        fresh = np.ones(len(rows), dtype=bool)
        fresh[dead_new] = False
        # 2. Append vectors, ids, kinds, liveness and tags together: all of them or none.
        start = len(self)
        grown = (self._tail, self._row_ids, self._kinds, self._live)
        try:
            self._tail.extend(new)
            self._row_ids.extend(np.asarray(rows, dtype=np.int64))
            self._kinds.extend(np.asarray(kinds, dtype=np.int8))
            self._live.extend(fresh)
            self.tags.extend(tags)  # validates every row first; appends nothing when one is bad
        except BaseException:
            for array in grown:
                array.truncate(start - self.base_count if array is self._tail else start)
            raise
        # 3. Nothing below can fail: kill the old slots, point the row ids at their new ones.
        live = self._live.view
        if kills:
            dead = np.asarray(kills, dtype=np.int64)
            live[dead] = False
            self._dead_in_base += int(np.count_nonzero(dead < self.base_count))
        for row_id in touched:
            self.slot_of.pop(row_id, None)
        for row_id, i in pending.items():
            self.slot_of[row_id] = start + i
        self._kinds_seen.update(kinds)
        self.applied_seq = max(self.applied_seq, max(ch.seq for ch in batch))

    # -- maintenance (the writer's snapshot thread) ------------------------------------------------

    def rebuilt(self, kind: str) -> VectorTable:
        """A new table holding only the live rows, with a freshly built base of ``kind`` and no tail.

        This is compaction and the change of index kind in one: dead slots are dropped and the index
        is built over the live vectors. This table is left unchanged. An approximate base is
        calibrated (`index.search.calibration`) with ``calibration_queries`` live rows held out of the index
        while it is measured; they are added right after, as its last slots.
        """
        keep = np.flatnonzero(self.live)
        logger.info("rebuilding as %s: %d live of %d slots", kind, len(keep), len(self))
        vectors = self.gather(keep)  # a view, not a copy, when nothing is dropped and there is no base
        held = holdout(len(keep), self.config) if kind != "flat" else np.empty(0, dtype=np.int64)
        rest = np.ones(len(keep), dtype=bool)
        rest[held] = False
        base = build_base(kind, vectors, self.config, skip=held)
        calibration = None
        if len(held):
            queries = vectors[held]
            calibration = calibrate(base, queries, None, self.config)
            base.add(queries)
        del vectors
        order = keep[np.concatenate([np.flatnonzero(rest), held])]  # the slots' new order
        return VectorTable.from_snapshot(
            base,
            self.row_ids[order],
            self.kinds[order],
            np.ones(len(order), dtype=bool),
            self.tags.take(order),
            self.applied_seq,
            self.config,
            calibration,
        )

    def absorb_tail(self) -> None:
        """Add the tail's vectors to the base index (HNSW/IVF ``add``), so the table has no tail.

        Raises:
            RuntimeError: the table has no base, or its base is memory-mapped (read-only).
        """
        if self.base is None:
            raise RuntimeError("a table without a base index has nothing to absorb its tail into")
        self._maybe_recalibrate()
        if self.tail_count:
            self.base.add(self._tail.view)
            self._dead_in_base += int(np.count_nonzero(~self.live[self.base_count :]))
            self.base_count = self.base.ntotal
            self._tail = _Grow(np.float32, self.dim)

    def _maybe_recalibrate(self) -> None:
        """Before the tail joins the base: recalibrate when the base will have grown by more than
        ``recalibrate_growth`` since it was measured, using live tail rows (not yet in the index) as
        the held-out queries."""
        cfg, base = self.config, self.base
        if base is None or not base.methods(False) or cfg.calibration_queries == 0:
            return
        if self.calibration is not None and len(self) <= (1 + cfg.recalibrate_growth) * self.calibration.rows:
            return
        tail_live = np.flatnonzero(self.live[self.base_count :])
        if len(tail_live) < min(cfg.calibration_queries, 50):
            return  # too few new rows to measure with: the old calibration (or none) stands
        queries = self._tail.view[tail_live[sample(len(tail_live), cfg.calibration_queries)]]
        self.calibration = calibrate(base, queries, self.live[: self.base_count], cfg)

    # -- reading ---------------------------------------------------------------------------------

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """The (len(slots), dim) float32 vectors of ``slots`` (sorted ascending).

        A run of consecutive slots within the base or the tail comes back as a read-only *view* (no
        copy), valid until the table changes; anything else is a new array.
        """
        split = int(np.searchsorted(slots, self.base_count))
        parts = []
        if split and self.base is not None:
            parts.append(_take(self.base.vectors(), slots[:split]))
        if split < len(slots):
            parts.append(_take(self._tail.view, slots[split:] - self.base_count))
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def vector(self, row_id: int) -> np.ndarray | None:
        slot = self.slot_of.get(row_id)
        if slot is None:
            return None
        return self.gather(np.array([slot]))[0].copy()

    def candidates(
        self, node: object, vector_kind: str | None, max_filter_work: int | None = None
    ) -> np.ndarray:
        """The bool mask of slots a query may return: live, of the query's kind, passing the filter.

        Returns ``self.live`` itself (not a copy) when nothing narrows it: treat the result as read-only.

        Raises:
            InvalidParameter: evaluating ``node`` over these tags would cost more than
                ``max_filter_work`` work units (`filters.work`; None: no bound); nothing is evaluated.
        """
        mask = self.live
        if vector_kind is not None:
            code = _KIND_CODES[vector_kind]
            if self._kinds_seen != {code}:  # a library of one kind needs no kind mask
                mask = mask & (self.kinds == code)
        if node is not None:
            if max_filter_work is not None:
                try:
                    check_work(node, self.tags, max_filter_work)  # type: ignore[arg-type]
                except FilterError as exc:
                    raise InvalidParameter(str(exc)) from None
            passed = evaluate(node, self.tags)  # type: ignore[arg-type]
            passed &= mask
            mask = passed
        return mask

    def search(
        self,
        query: np.ndarray,
        k: int,
        node: object = None,
        vector_kind: str | None = None,
        recall_target: float | None = None,
        max_filter_work: int | None = None,
    ) -> SearchHits:
        """Top-k by inner product among the live rows of ``vector_kind`` that pass ``node``.

        The filter is applied before ranking: the result is the top-k of the rows that pass it, exact
        whenever the planner searches exactly, approximate otherwise, with the effort the calibration
        measured to reach ``recall_target`` (None: ``IndexConfig.recall_target``; 1.0: always exact).
        See the module docstring for the plan. Raises InvalidParameter for a filter over
        ``max_filter_work`` (`candidates`).
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        mask = self.candidates(node, vector_kind, max_filter_work)
        m = self.live_count if mask is self.live else int(np.count_nonzero(mask))
        k = min(k, m)
        if k == 0:
            return SearchHits(np.empty(0, np.int64), np.empty(0, np.float32), m, "empty")
        n = len(self)
        cfg = self.config
        target = cfg.recall_target if recall_target is None else recall_target
        small = m <= max(cfg.exact_max_candidates, int(cfg.exact_max_fraction * n))
        if self.base is None or (small and m < n) or target >= 1.0:
            scores, slots = self._exact(q, k, mask)
            return self._hits(scores, slots, k, m, "exact")
        nb = self.base_count
        base_mask = mask[:nb]
        m_base = (nb - self._dead_in_base) if mask is self.live else int(np.count_nonzero(base_mask))
        parts = []
        if m_base:
            selectivity = m_base / nb
            plan = self.plan(min(k, m_base), selectivity, target)
            index_cost = self.base.cost(plan, min(k, m_base), selectivity, cfg) + (m - m_base)
            exact_cost = EXACT_ROW_COST * m
            if plan is EXACT or (cfg.exact_by_cost and self.base.kind != "flat" and exact_cost <= index_cost):
                scores, slots = self._exact(q, k, mask)
                return self._hits(scores, slots, k, m, "exact")
            # The bitmap must outlive the search: FAISS's selector keeps a pointer into it.
            bits = None if m_base == nb else np.packbits(base_mask, bitorder="little")
            parts.append(self.base.search(q, min(k, m_base), bits, selectivity, cfg, plan))
            found = int(np.count_nonzero(parts[0][1] >= 0))
            if found < min(k, m_base):
                logger.debug("index returned %d of %d rows: exact rerun over %d", found, k, m)
                scores, slots = self._exact(q, k, mask)
                return self._hits(scores, slots, k, m, "index+exact")
        if m > m_base:  # the tail holds candidates too
            parts.append(self._exact(q, k, mask, start=nb))
        scores = np.concatenate([p[0] for p in parts])
        slots = np.concatenate([p[1] for p in parts])
        return self._hits(scores, slots, k, m, "index")

    def plan(self, k: int, selectivity: float, target: float) -> Plan:
        """The base's search plan for a filter passing ``selectivity`` of its slots: the calibrated
        setting for ``target`` (`Calibration.plan`), or the config's fixed effort without one."""
        if self.base is None:
            return EXACT
        if self.calibration is None:
            return self.base.default_plan(k, selectivity, selectivity < 1.0, self.config)
        return self.calibration.plan(self.base, k, selectivity, target, self.config)

    def _exact(
        self, q: np.ndarray, k: int, mask: np.ndarray, start: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the slots ``>= start`` set in ``mask``.

        Scores are computed in place from the base's and the tail's vector arrays by slot number
        (``fvec_inner_products_by_idx``): no candidate vector is copied, which at 10k candidates of a
        1M x 512 library is 3-7x faster than gathering them first. One thread, no BLAS: a single query
        is a matrix-vector product, and a BLAS thread pool's wake-ups cost more than the product on a
        busy machine.
        """
        slots = np.flatnonzero(mask[start:])
        if start:
            slots += start
        split = int(np.searchsorted(slots, self.base_count))
        scores = np.empty(len(slots), dtype=np.float32)
        if split and self.base is not None:
            _inner_products(q, self.base.vectors(), slots[:split], scores[:split])
        if split < len(slots):
            _inner_products(q, self._tail.view, slots[split:] - self.base_count, scores[split:])
        if len(scores) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            return scores[top], slots[top]
        return scores, slots

    def _hits(self, scores: np.ndarray, slots: np.ndarray, k: int, m: int, path: str) -> SearchHits:
        ok = slots >= 0
        scores, slots = scores[ok], slots[ok]
        # Best first; ties broken by slot so that equal scores come back in a stable order.
        order = np.lexsort((slots, -scores))[:k]
        return SearchHits(self.row_ids[slots[order]], scores[order].astype(np.float32), m, path)

    def live_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, TagColumns]:
        """Copies of the live vectors, row ids, kinds and tags."""
        keep = np.flatnonzero(self.live)
        return self.gather(keep), self.row_ids[keep].copy(), self.kinds[keep].copy(), self.tags.take(keep)


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows``; a slice (no copy) when they are consecutive."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return array[rows[0] : rows[-1] + 1]
    return array[rows]


def _inner_products(q: np.ndarray, vectors: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = vectors[rows[i]] . q[0]`` without copying the rows (FAISS reads them in place).

    ``vectors`` must be C-contiguous float32 (the flat storage, a memory map, or the tail buffer), and
    ``out`` a contiguous float32 array of ``len(rows)``.
    """
    ids = np.ascontiguousarray(rows, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # a no-op for every array we pass
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(q),
        faiss.swig_ptr(vectors),
        faiss.swig_ptr(ids),
        q.shape[1],
        1,
        len(ids),
    )
