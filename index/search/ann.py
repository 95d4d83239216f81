"""Index kinds: the searchable structure over the *base* slots of a library's vector table.

Three kinds, chosen by size (`choose_kind`), overridable per library:

- ``flat``: ``faiss.IndexFlatIP``, exact. Below ``IndexConfig.hnsw_min_rows`` live rows.
- ``hnsw``: ``faiss.IndexHNSWFlat`` (M, efConstruction from the config), approximate, for unfiltered
  searches; filtered ones go to an IVF-SQ8 *filter index* over the same vectors, whose recall does not
  fall with the filter's selectivity (`HnswBase`).
- ``ivfpq``: ``faiss.IndexIVFPQ`` over a flat coarse quantizer, approximate, with an exact *refine*:
  ``refine_factor * k`` PQ candidates are re-ranked with the raw vectors. Chosen when an HNSW index would
  not fit ``IndexConfig.memory_budget_bytes``: it keeps about ``pq_m + 8`` bytes per vector resident and
  reads raw vectors (memory-mapped from the snapshot) only for the few rows it refines.

Slots are the ids: the base's vector i is the table's slot i (FAISS assigns sequential ids on ``add``),
so a bitmap over slots is directly a FAISS ``IDSelectorBitmap``.

Memory ownership: a base loaded from a snapshot is memory-mapped read-only (``IO_FLAG_MMAP_IFC`` for the
flat storage of ``flat``/``hnsw``, ``np.load(mmap_mode="r")`` for the raw vectors of ``ivfpq``): loading
1M vectors costs page-cache reads, not a copy, and every replica on a node shares those pages. FAISS
*aborts the process* when asked to grow a memory-mapped index, so a loaded base is never added to:
``add`` checks ``writable`` first. Search parameters are built per call (never set on the shared index),
so concurrent searches do not race.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")
CONFIGURED_KINDS = ("auto", *KINDS)


class IndexConfig(BaseModel):
    """How libraries are indexed and searched (builder arg ``index``).

    Every field is optional; unknown fields are refused. A library may override the kind with
    ``index_kind`` on ``/library/create`` (docs/API.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hnsw_min_rows: int = Field(
        100_000,
        ge=1,
        description="auto libraries use exact flat below this many live images, hnsw at or above",
    )
    memory_budget_bytes: int | None = Field(
        None,
        gt=0,
        description="auto picks ivfpq when a library's HNSW index would need more bytes than this (about "
        "2,320 bytes per 512-d vector, plus 520 for the filter IVF); None: no budget, never ivfpq "
        "automatically",
    )
    ivfpq_min_rows: int = Field(
        10_000,
        ge=1,
        description="IVF-PQ needs this many rows to train: a smaller library stays flat even when asked for "
        "ivfpq (and an HNSW library this small has no filter IVF)",
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree (M)")
    hnsw_ef_construction: int = Field(40, ge=8, description="HNSW build effort (efConstruction)")
    hnsw_ef_search: int = Field(
        256,
        ge=1,
        description="uncalibrated libraries only: efSearch of an unfiltered search; a filter passing a "
        "fraction s > filter_ivf_max_selectivity of the rows uses hnsw_ef_search / s**2, capped at "
        "hnsw_ef_search_max. Measured at 1M x 512 (bench/README.md): recall@10 0.86 at ef 64, 0.91 at 128, "
        "0.96 at 256, 0.975 at 512, all under ~1.2 ms",
    )
    hnsw_ef_search_max: int = Field(768, ge=1, description="the cap of a filtered search's efSearch")
    filter_ivf: bool = Field(
        True,
        description="HNSW libraries also keep an IVF-SQ8 index (dim + 8 bytes per vector) for filtered "
        "searches; it probes the lists nearest the query until they hold enough rows that pass the filter "
        "(counted per list), so its work grows with 1/selectivity",
    )
    filter_ivf_nlist: int = Field(
        0,
        ge=0,
        description="the filter IVF's lists; 0: sqrt(n) rounded to a power of two, clamped to [16, 4096]",
    )
    filter_ivf_nprobe: int = Field(
        32,
        ge=1,
        description="uncalibrated: the filter IVF scores as many passing rows as this many average lists "
        "hold",
    )
    filter_ivf_max_selectivity: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="filters passing at most this fraction of the rows go to the filter IVF; looser ones "
        "to the graph",
    )
    ivf_nlist: int = Field(
        0, ge=0, description="IVF-PQ lists; 0: 4 * sqrt(n) rounded to a power of two, clamped to [16, 65536]"
    )
    ivf_nprobe: int = Field(
        32, ge=1, description="uncalibrated IVF-PQ: lists probed unfiltered (raised as selectivity falls)"
    )
    ivf_nprobe_max: int = Field(256, ge=1, description="the cap of IVF-PQ's lists probed")
    pq_m: int = Field(64, ge=1, description="PQ sub-quantizers (rounded down to a divisor of the dimension)")
    pq_nbits: int = Field(8, ge=4, le=12, description="bits per PQ code")
    refine_factor: int = Field(
        16,
        ge=1,
        description="IVF-PQ and the filter IVF re-rank refine_factor * k candidates exactly. 16: at 4M "
        "vectors (512-d, 64-byte codes) 8 left recall@10 at 0.947 (PQ ranking errors push true neighbours "
        "below the re-rank depth); 16 gave 0.9895 (bench/README.md, 'IVF-PQ over streamed vectors')",
    )
    exact_max_candidates: int = Field(
        20_000,
        ge=0,
        description="a filter passing at most max(exact_max_candidates, exact_max_fraction * rows) rows is "
        "searched exactly over just those rows",
    )
    exact_max_fraction: float = Field(0.02, ge=0.0, le=1.0, description="see exact_max_candidates")
    exact_by_cost: bool = Field(
        True,
        description="above those thresholds too, search exactly whenever the passing rows are fewer than "
        "the index plan's expected distance computations",
    )
    compact_dead_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="a snapshot rebuilds the index from the live rows when more of its slots than this "
        "fraction are deleted or overwritten",
    )
    snapshot_min_rows: int = Field(
        2_000,
        ge=1,
        description="the writer snapshots a library when at least snapshot_min_rows rows changed since the "
        "last snapshot and either snapshot_fraction of the library or snapshot_max_tail_rows did",
    )
    snapshot_fraction: float = Field(0.1, ge=0.0, description="see snapshot_min_rows")
    snapshot_max_tail_rows: int = Field(
        10_000,
        ge=1,
        description="see snapshot_min_rows; bounds the tail searched exactly beside the index (about 1 ms "
        "per 10k 512-d rows)",
    )
    recall_target: float = Field(
        0.95,
        ge=0.5,
        le=1.0,
        description="recall@10 that searches aim for; a search request may ask for another (recall_target). "
        "The writer measures recall on the library's own vectors when it builds a snapshot "
        "(index.search.calibration) and records the settings that reach each target; 1.0 means exact search "
        "(docs/operations.md, 'Recall target')",
    )
    calibration_queries: int = Field(
        200,
        ge=0,
        description="held-out library vectors used as calibration queries (0: no calibration, the "
        "uncalibrated efforts above)",
    )
    calibration_selectivities: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = Field(
        (0.5, 0.2, 0.1, 0.05),
        description="filter selectivities calibrated (random subsets of the rows); others interpolate "
        "between them",
    )
    calibration_margin: float = Field(
        0.005,
        ge=0.0,
        le=0.1,
        description="a setting is chosen for a target only when its measured recall is at least target + "
        "margin (the sample's recall is an estimate: 200 queries x 10 neighbours)",
    )
    recalibrate_growth: float = Field(
        0.2,
        ge=0.0,
        description="an incremental snapshot (tail folded in) recalibrates when the index grew by more "
        "than this fraction since its last calibration; a rebuild always does",
    )
    search_threads: int = Field(
        1,
        ge=0,
        description="FAISS OpenMP threads in a LibraryIndex replica (process-wide, set when the replica "
        "starts; 0: one per core). One query at a time gains nothing from more, while idle OpenMP threads "
        "spin: on a busy 2-core machine a 10k-row exact scan took 0.7 ms on one thread and 14-20 ms on "
        "two. Index builds (the writer) use every core regardless",
    )


DEFAULT_CONFIG = IndexConfig()


@dataclass(frozen=True)
class Plan:
    """How one search runs on a base (`AnnBase.search`).

    ``method``: ``hnsw`` (graph search, ``value`` = efSearch), ``ivf`` (an IVF index scores at least
    ``value`` candidates that pass the filter, then the best ``refine_factor * k`` are re-ranked
    exactly) or ``exact`` (the planner scans the passing rows itself; ``value`` unused).
    """

    method: str
    value: int = 0


EXACT = Plan("exact")

#: Relative costs in the planner's unit (one float32 distance): a code an IVF scan skips because its id
#: fails the filter costs a bitmap test, not a distance.
SKIPPED_CODE_COST = 0.1
#: An exact scan of the passing rows reads each from wherever it lies (a gather, often from a memory
#: map): measured here at 0.2-0.5 us a row, against 0.05-0.2 us per distance of an index search.
EXACT_ROW_COST = 2.0


def hnsw_bytes_per_vector(dim: int, config: IndexConfig) -> float:
    """Resident bytes of one vector in an HNSW index: the float32 vector, its level-0 links (2M int32),
    and the expected upper-level links (a fraction 1/M of nodes per level, M links each)."""
    return 4 * dim + 8 * config.hnsw_m + 4 * config.hnsw_m / (config.hnsw_m - 1) + 12


def choose_kind(configured: str, live_rows: int, dim: int, config: IndexConfig) -> str:
    """The index kind a library should have now.

    Args:
        configured: the library's ``index_kind`` (``auto``, ``flat``, ``hnsw`` or ``ivfpq``).
        live_rows: the library's live rows.
        dim: vector dimension.
        config: thresholds.

    Raises:
        ValueError: an unknown ``configured`` kind.
    """
    if configured not in CONFIGURED_KINDS:
        raise ValueError(f"index_kind {configured!r} is not one of {', '.join(CONFIGURED_KINDS)}")
    if configured == "auto":
        if live_rows < config.hnsw_min_rows:
            return "flat"
        budget = config.memory_budget_bytes
        if budget is not None and live_rows * hnsw_bytes_per_vector(dim, config) > budget:
            configured = "ivfpq"
        else:
            return "hnsw"
    if configured == "ivfpq" and live_rows < config.ivfpq_min_rows:
        return "flat"  # too few rows to train the quantizers
    return configured


class AnnBase:
    """The index over slots ``[0, ntotal)`` of a table. Subclasses: `FlatBase`, `HnswBase`, `IvfPqBase`."""

    kind: ClassVar[str]
    index: faiss.Index

    def __init__(self, index: faiss.Index, *, writable: bool) -> None:
        self.index = index
        self.writable = writable

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def vectors(self) -> np.ndarray:
        """The raw float32 vectors, shape (ntotal, dim): a read-only view, valid until the next `add`."""
        raise NotImplementedError

    def add(self, x: np.ndarray) -> None:
        """Append vectors (slots ``ntotal ..``). Only on an in-memory base (``writable``)."""
        if not self.writable:
            raise RuntimeError("this index is memory-mapped from a snapshot and cannot grow")
        self.index.add(np.ascontiguousarray(x, dtype=np.float32))

    def add_except(self, x: np.ndarray, skip: np.ndarray | None) -> None:
        """Add the rows of ``x`` but those at the sorted positions ``skip``, in order, in runs (``x`` is
        not copied)."""
        start = 0
        for stop in [*([] if skip is None else skip.tolist()), len(x)]:
            if stop > start:
                self.add(x[start:stop])
            start = stop + 1

    def search(
        self,
        q: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        selectivity: float,
        config: IndexConfig,
        plan: Plan | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query among the slots set in ``bitmap`` (None: all slots).

        Args:
            q: float32 query, shape (1, dim).
            k: results wanted.
            bitmap: ``np.packbits(mask, bitorder="little")`` over ``ntotal`` slots, or None.
            selectivity: the fraction of slots that pass (search effort rises as it falls).
            config: search parameters.
            plan: the method and effort (the planner's, from the calibration); None: `default_plan`.

        Returns:
            ``(scores, slots)`` of shape (k,), best first; missing results have slot -1.
        """
        raise NotImplementedError

    def methods(self, filtered: bool) -> tuple[str, ...]:
        """The approximate methods this base offers for an unfiltered or a filtered search."""
        return ()

    def default_plan(self, k: int, selectivity: float, filtered: bool, config: IndexConfig) -> Plan:
        """The plan without a calibration (the config's fixed efforts)."""
        return EXACT

    def ladder(self, method: str, k: int, config: IndexConfig) -> list[int]:
        """The efforts calibration tries for ``method``, cheapest first."""
        return []

    def cost(self, plan: Plan, k: int, selectivity: float, config: IndexConfig) -> float:
        """Expected work of ``plan`` in distance computations (an exact scan of m rows costs m)."""
        return float(self.ntotal) * selectivity

    def nbytes(self) -> int:
        """Resident bytes of the index structure (vectors or codes, and links), for reporting."""
        raise NotImplementedError

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory: Path) -> list[Path]:
        """Write the index into ``directory``; returns the files written (the caller fsyncs them)."""
        path = directory / "index.faiss"
        faiss.write_index(self.index, str(path))
        return [path]

    @classmethod
    def load(cls, directory: Path) -> AnnBase:
        """Memory-map the index a `save` wrote (read-only)."""
        index = faiss.read_index(str(directory / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
        return cls(index, writable=False)

    @classmethod
    def load_writable(cls, directory: Path) -> AnnBase:
        """Read the index a `save` wrote into memory, so that it can grow (the writer's snapshots)."""
        return cls(faiss.read_index(str(directory / "index.faiss")), writable=True)


def _selector(bitmap: np.ndarray | None, ntotal: int) -> faiss.IDSelector | None:
    # FAISS keeps a raw pointer into ``bitmap``: the caller keeps the array alive until the search ends.
    return None if bitmap is None else faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bitmap))


def _flat_vectors(flat: faiss.IndexFlat, n: int, dim: int) -> np.ndarray:
    if n == 0:
        return np.empty((0, dim), dtype=np.float32)
    view = faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)
    view.flags.writeable = False  # it may be a read-only memory map
    return view


class FlatBase(AnnBase):
    """Exact inner-product search over every base slot."""

    kind = "flat"

    @classmethod
    def build(cls, x: np.ndarray, config: IndexConfig, skip: np.ndarray | None = None) -> FlatBase:
        base = cls(faiss.IndexFlatIP(x.shape[1]), writable=True)
        base.add_except(x, skip)
        return base

    def vectors(self) -> np.ndarray:
        return _flat_vectors(self.index, self.ntotal, self.dim)

    def search(
        self,
        q: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        selectivity: float,
        config: IndexConfig,
        plan: Plan | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = _selector(bitmap, self.ntotal)
        params = None if sel is None else faiss.SearchParameters(sel=sel)
        dist, idx = self.index.search(q, k, params=params)
        return dist[0], idx[0]

    def default_plan(self, k: int, selectivity: float, filtered: bool, config: IndexConfig) -> Plan:
        return Plan("flat")  # FAISS's flat scan with the selector: exact

    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4


class HnswBase(AnnBase):
    """HNSW graph over a flat float32 storage (``IndexHNSWFlat``, inner product), plus an IVF-SQ8
    *filter index* over the same vectors for filtered searches.

    Why two structures: FAISS's HNSW with a bitmap selector loses recall as a filter gets selective,
    and at 1M rows its graph (M 32, efConstruction 40: what builds in minutes on 2 cores) tops out near
    0.97-0.98 recall@10 whatever the efSearch (measured: bench/README.md). An IVF index's recall does not
    depend on the filter: it scans the ``nprobe`` lists nearest the query and skips failing ids, so a
    50% or 10% filter keeps the unfiltered recall. The IVF stores 8-bit scalar-quantised codes (dim + 8
    bytes per vector) and its candidates are re-ranked exactly from the HNSW's float32 storage. Unfiltered
    searches (and a filter passing more than ``filter_ivf_max_selectivity``) use the HNSW graph.
    """

    kind = "hnsw"

    def __init__(self, index: faiss.Index, *, writable: bool, filter_ivf: faiss.Index | None = None) -> None:
        super().__init__(index, writable=writable)
        self.filter_ivf = filter_ivf
        self._lists: _IvfLists | None = None  # the filter IVF's list contents, read on first use

    @classmethod
    def build(cls, x: np.ndarray, config: IndexConfig, skip: np.ndarray | None = None) -> HnswBase:
        index = faiss.IndexHNSWFlat(x.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        base = cls(index, writable=True, filter_ivf=_train_filter_ivf(x, config))
        base.add_except(x, skip)
        return base

    def add(self, x: np.ndarray) -> None:
        started = time.perf_counter()
        super().add(x)
        if self.filter_ivf is not None:
            self.filter_ivf.add(np.ascontiguousarray(x, dtype=np.float32))
        if len(x) >= 10_000:
            logger.info("HNSW: added %d vectors in %.1fs", len(x), time.perf_counter() - started)

    def vectors(self) -> np.ndarray:
        return _flat_vectors(faiss.downcast_index(self.index.storage), self.ntotal, self.dim)

    def ef_for(self, k: int, selectivity: float, config: IndexConfig, ef: int | None = None) -> int:
        """efSearch for a graph search whose filter passes ``selectivity`` of the slots: ``ef`` when
        the plan gives one (calibrated for that selectivity), else the uncalibrated default.

        With a selector, FAISS's HNSW counts only passing nodes towards ``ef`` but still walks through
        the failing ones, so the passing nodes it reaches get sparser as selectivity falls and recall
        drops. The default ``hnsw_ef_search / s**2`` keeps an unfiltered search (s = 1, or nearly 1 with
        a few deleted rows) at ``hnsw_ef_search`` and gives a 50% filter 4x, capped at
        ``hnsw_ef_search_max``.
        """
        if ef is None:
            default = config.hnsw_ef_search / max(selectivity, 1e-6) ** 2
            return int(min(max(default, k, config.hnsw_ef_search), max(config.hnsw_ef_search_max, k)))
        return int(max(ef, k))

    def methods(self, filtered: bool) -> tuple[str, ...]:
        return ("hnsw",) if self.filter_ivf is None else ("hnsw", "ivf")

    def default_plan(self, k: int, selectivity: float, filtered: bool, config: IndexConfig) -> Plan:
        if filtered and self.filter_ivf is not None and selectivity <= config.filter_ivf_max_selectivity:
            return Plan("ivf", _default_candidates(self.filter_ivf, config.filter_ivf_nprobe))
        return Plan("hnsw", self.ef_for(k, selectivity, config))

    def ladder(self, method: str, k: int, config: IndexConfig) -> list[int]:
        if method == "hnsw":
            return [ef for ef in HNSW_EF_LADDER if ef >= k]
        return _candidate_ladder(k, config, self.ntotal)

    def cost(self, plan: Plan, k: int, selectivity: float, config: IndexConfig) -> float:
        if plan.method == "hnsw":
            # An HNSW (M 32) search computes about 2M distances per node it expands; under a filter it
            # also walks failing nodes (measured at a fixed efSearch: ~1.7x the time at s = 0.1 as at 0.5).
            ef = self.ef_for(k, selectivity, config, plan.value)
            return float(2 * config.hnsw_m * ef / math.sqrt(min(max(selectivity, 1e-9), 1.0)))
        if plan.method == "ivf" and self.filter_ivf is not None:
            return _ivf_cost(self.filter_ivf, plan.value, k, selectivity, config)
        return super().cost(plan, k, selectivity, config)

    def search(
        self,
        q: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        selectivity: float,
        config: IndexConfig,
        plan: Plan | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if plan is None:
            plan = self.default_plan(k, selectivity, bitmap is not None, config)
        if plan.method == "ivf" and self.filter_ivf is not None:
            kk = k * config.refine_factor
            if self._lists is None or self._lists.ntotal != self.filter_ivf.ntotal:
                self._lists = _IvfLists(self.filter_ivf)
            idx, _ = _ivf_search(self.filter_ivf, self._lists, q, kk, bitmap, selectivity, plan.value)
            return _refine(q, k, idx, self.vectors())
        sel = _selector(bitmap, self.ntotal)
        params = faiss.SearchParametersHNSW()
        params.efSearch = self.ef_for(k, selectivity, config, plan.value if plan.method == "hnsw" else None)
        if sel is not None:
            params.sel = sel
        dist, idx = self.index.search(q, k, params=params)
        return dist[0], idx[0]

    def nbytes(self) -> int:
        hnsw = self.index.hnsw
        graph = self.ntotal * self.dim * 4 + int(hnsw.neighbors.size()) * 4 + int(hnsw.offsets.size()) * 8
        ivf = 0 if self.filter_ivf is None else self.ntotal * (self.filter_ivf.code_size + 8)
        return graph + ivf

    def save(self, directory: Path) -> list[Path]:
        paths = super().save(directory)
        if self.filter_ivf is not None:
            path = directory / "filter_ivf.faiss"
            faiss.write_index(self.filter_ivf, str(path))
            paths.append(path)
        return paths

    @classmethod
    def load(cls, directory: Path) -> HnswBase:
        index = faiss.read_index(str(directory / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
        return cls(index, writable=False, filter_ivf=_read_optional(directory / "filter_ivf.faiss"))

    @classmethod
    def load_writable(cls, directory: Path) -> HnswBase:
        index = faiss.read_index(str(directory / "index.faiss"))
        return cls(index, writable=True, filter_ivf=_read_optional(directory / "filter_ivf.faiss"))


def _read_optional(path: Path) -> faiss.Index | None:
    return faiss.read_index(str(path)) if path.exists() else None


def _train_filter_ivf(x: np.ndarray, config: IndexConfig) -> faiss.Index | None:
    """An empty, trained IVF-SQ8 index for `HnswBase`'s filtered searches (None when disabled or when
    there are too few rows to train it)."""
    n, dim = x.shape
    if not config.filter_ivf or n < config.ivfpq_min_rows:
        return None
    nlist = config.filter_ivf_nlist or int(min(4096, max(16, 2 ** round(math.log2(math.sqrt(n))))))
    nlist = min(nlist, max(1, n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
    )
    index.cp.niter = 10  # k-means iterations: the lists only need to be roughly balanced and compact
    started = time.perf_counter()
    index.train(_sample(x, nlist * 64))
    logger.info("filter IVF: trained nlist=%d in %.1fs", nlist, time.perf_counter() - started)
    return index


def _sample(x: np.ndarray, size: int) -> np.ndarray:
    """A fixed random sample of rows (training in bounded time at any n)."""
    n = len(x)
    if n <= size:
        return np.ascontiguousarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    return np.ascontiguousarray(x[rows], dtype=np.float32)


#: efSearch values calibration tries (`HnswBase.ladder`).
HNSW_EF_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048)


def _candidate_ladder(k: int, config: IndexConfig, ntotal: int) -> list[int]:
    """Candidate counts calibration tries for an IVF: from the re-rank depth, doubling, to ntotal."""
    out, c = [], max(k * config.refine_factor, 64)
    while c < ntotal:
        out.append(c)
        c *= 2
    return [*out, ntotal]


def _default_candidates(ivf: faiss.Index, nprobe: int) -> int:
    """Uncalibrated: as many passing candidates as ``nprobe`` average lists hold (what an unfiltered
    search probing ``nprobe`` lists scores), whatever the filter's selectivity."""
    return max(1, int(nprobe * ivf.ntotal / max(ivf.nlist, 1)))


def _ivf_cost(ivf: faiss.Index, candidates: int, k: int, selectivity: float, config: IndexConfig) -> float:
    """Expected work of an IVF search scoring ``candidates`` passing codes: the coarse scan of the
    centroids, the passing codes, the failing codes skipped (bitmap tests), the exact re-rank."""
    s = min(max(selectivity, 1e-9), 1.0)
    scored = min(candidates, s * ivf.ntotal)
    return ivf.nlist + scored + SKIPPED_CODE_COST * scored * (1 / s - 1) + k * config.refine_factor


class _IvfLists:
    """The ids in each list of an IVF index, read once (for counting the passing ids of a list)."""

    def __init__(self, ivf: faiss.Index) -> None:
        self.ntotal = int(ivf.ntotal)
        nlist, invlists = int(ivf.nlist), ivf.invlists
        self.sizes = np.fromiter((invlists.list_size(i) for i in range(nlist)), np.int64, count=nlist)
        self.offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.ids = np.empty(int(self.offsets[-1]), dtype=np.int64)
        for i in np.flatnonzero(self.sizes).tolist():
            # rev_swig_ptr views FAISS's own buffer: copied at once into ours.
            self.ids[self.offsets[i] : self.offsets[i + 1]] = faiss.rev_swig_ptr(
                invlists.get_ids(i), int(self.sizes[i])
            )

    def passing(self, lists: np.ndarray, bitmap: np.ndarray | None) -> np.ndarray:
        """How many ids of each of ``lists`` are set in ``bitmap`` (all of them when None)."""
        lens = self.sizes[lists]
        if bitmap is None:
            return lens
        ends = np.cumsum(lens)
        # Positions of every id of the chosen lists in ``ids``, list after list (no Python loop).
        pos = np.repeat(self.offsets[lists] - (ends - lens), lens) + np.arange(
            int(ends[-1]) if len(ends) else 0
        )
        ids = self.ids[pos]
        passed = np.concatenate([[0], np.cumsum((bitmap[ids >> 3] >> (ids & 7)) & 1)])
        return passed[ends] - passed[ends - lens]


def _ivf_search(
    ivf: faiss.Index,
    lists: _IvfLists,
    q: np.ndarray,
    kk: int,
    bitmap: np.ndarray | None,
    selectivity: float,
    candidates: int,
) -> tuple[np.ndarray, int]:
    """The ``kk`` best slots by the IVF's (approximate) scores among passing ids, probing the lists
    nearest ``q`` until they hold at least ``candidates`` passing ids (or every list is probed).

    The number of lists probed follows the filter: the passing ids of each list are counted (not
    estimated), so a filter that passes few rows near the query, even one correlated with the
    clusters, widens the search until enough candidates are really scored.

    Returns:
        The slots (-1 for none) and the passing candidates scored.
    """
    nlist = int(ivf.nlist)
    mean = max(lists.ntotal / max(nlist, 1), 1.0)
    # First guess: twice the lists the candidates need at this selectivity; all of them if short.
    guess = min(nlist, int(2 * candidates / (mean * max(selectivity, 1e-9))) + 8)
    while True:
        coarse_d, coarse_i = ivf.quantizer.search(q, guess)
        order = coarse_i[0]
        order = order[order >= 0]
        counts = lists.passing(order, bitmap)
        cum = np.cumsum(counts)
        if (len(cum) and cum[-1] >= candidates) or guess >= nlist:
            break
        guess = nlist
    nprobe = min(int(np.searchsorted(cum, candidates)) + 1, len(order))
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    sel = _selector(bitmap, lists.ntotal)
    if sel is not None:
        params.sel = sel
    assign = np.ascontiguousarray(order[:nprobe].reshape(1, nprobe), dtype=np.int64)
    assign_d = np.ascontiguousarray(coarse_d[:, :nprobe], dtype=np.float32)  # IVF-PQ adds <q, centroid>
    dist = np.empty((1, kk), dtype=np.float32)
    idx = np.empty((1, kk), dtype=np.int64)
    ivf.search_preassigned_c(
        1,
        faiss.swig_ptr(q),
        kk,
        faiss.swig_ptr(assign),
        faiss.swig_ptr(assign_d),
        faiss.swig_ptr(dist),
        faiss.swig_ptr(idx),
        False,
        params,
    )
    return idx[0], int(cum[nprobe - 1]) if nprobe else 0


def _refine(
    q: np.ndarray, k: int, candidates: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``candidates`` (slots, -1 for none) by their raw ``vectors``."""
    found = np.sort(candidates[candidates >= 0])  # sorted: reads a memory map front to back
    out_d = np.full(k, -np.inf, dtype=np.float32)
    out_i = np.full(k, -1, dtype=np.int64)
    if len(found):
        dist, idx = faiss.knn(q, vectors[found], min(k, len(found)), metric=faiss.METRIC_INNER_PRODUCT)
        out_d[: idx.shape[1]] = dist[0]
        out_i[: idx.shape[1]] = found[idx[0]]
    return out_d, out_i


class IvfPqBase(AnnBase):
    """IVF-PQ codes resident, raw vectors beside them for the exact refine (memory-mapped once loaded)."""

    kind = "ivfpq"

    def __init__(self, index: faiss.Index, raw: np.ndarray, *, writable: bool) -> None:
        super().__init__(index, writable=writable)
        self.raw = raw
        self._lists: _IvfLists | None = None  # the list contents, read on first use

    @staticmethod
    def nlist_for(n: int, config: IndexConfig) -> int:
        if config.ivf_nlist:
            return config.ivf_nlist
        return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))

    @staticmethod
    def pq_m_for(dim: int, config: IndexConfig) -> int:
        return max(m for m in range(1, min(config.pq_m, dim) + 1) if dim % m == 0)

    @classmethod
    def build(cls, x: np.ndarray, config: IndexConfig, skip: np.ndarray | None = None) -> IvfPqBase:
        n, dim = x.shape
        nlist = min(cls.nlist_for(n, config), max(1, n // 39))  # k-means wants ~39 points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(
            quantizer, dim, nlist, cls.pq_m_for(dim, config), config.pq_nbits, faiss.METRIC_INNER_PRODUCT
        )
        # A fixed-size random sample trains in bounded time at any n (k-means is O(sample * nlist)).
        sample = _sample(x, max(nlist * 64, 256 * 64))
        started = time.perf_counter()
        index.train(sample)
        logger.info(
            "IVF-PQ: trained nlist=%d on %d vectors in %.1fs",
            nlist,
            len(sample),
            time.perf_counter() - started,
        )
        base = cls(index, np.empty((0, dim), dtype=np.float32), writable=True)
        base.add_except(x, skip)
        return base

    def add_except(self, x: np.ndarray, skip: np.ndarray | None) -> None:
        # One add: each add copies the raw vectors so far.
        self.add(x if skip is None or not len(skip) else np.delete(x, skip, axis=0))

    def add(self, x: np.ndarray) -> None:
        super().add(x)
        self.raw = np.concatenate([self.raw, np.asarray(x, dtype=np.float32)])

    def vectors(self) -> np.ndarray:
        return self.raw

    def methods(self, filtered: bool) -> tuple[str, ...]:
        return ("ivf",)

    def default_plan(self, k: int, selectivity: float, filtered: bool, config: IndexConfig) -> Plan:
        # nprobe ivf_nprobe / s, capped at ivf_nprobe_max, as candidates: what those lists hold that passes.
        nprobe = min(
            max(config.ivf_nprobe / max(selectivity, 1e-9), config.ivf_nprobe), config.ivf_nprobe_max
        )
        return Plan("ivf", max(1, int(nprobe * selectivity * self.ntotal / max(self.index.nlist, 1))))

    def ladder(self, method: str, k: int, config: IndexConfig) -> list[int]:
        return _candidate_ladder(k, config, self.ntotal)

    def cost(self, plan: Plan, k: int, selectivity: float, config: IndexConfig) -> float:
        if plan.method == "ivf":
            return _ivf_cost(self.index, plan.value, k, selectivity, config)
        return super().cost(plan, k, selectivity, config)

    def search(
        self,
        q: np.ndarray,
        k: int,
        bitmap: np.ndarray | None,
        selectivity: float,
        config: IndexConfig,
        plan: Plan | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if plan is None or plan.method != "ivf":
            plan = self.default_plan(k, selectivity, bitmap is not None, config)
        if self._lists is None or self._lists.ntotal != self.index.ntotal:
            self._lists = _IvfLists(self.index)
        kk = k * config.refine_factor
        idx, _ = _ivf_search(self.index, self._lists, q, kk, bitmap, selectivity, plan.value)
        return _refine(q, k, idx, self.raw)  # exact scores of the PQ candidates

    def nbytes(self) -> int:
        return self.ntotal * (self.index.code_size + 8)  # codes + ids; raw vectors stay on disk (mmap)

    def save(self, directory: Path) -> list[Path]:
        paths = super().save(directory)
        raw = directory / "vectors.npy"
        np.save(raw, self.raw)
        return [*paths, raw]

    @classmethod
    def load(cls, directory: Path) -> IvfPqBase:
        index = faiss.read_index(str(directory / "index.faiss"))  # codes: small, read into memory
        raw = np.load(directory / "vectors.npy", mmap_mode="r")
        return cls(index, raw, writable=False)

    @classmethod
    def load_writable(cls, directory: Path) -> IvfPqBase:
        index = faiss.read_index(str(directory / "index.faiss"))
        return cls(index, np.load(directory / "vectors.npy"), writable=True)


BASES: dict[str, type[AnnBase]] = {"flat": FlatBase, "hnsw": HnswBase, "ivfpq": IvfPqBase}


def build_base(kind: str, x: np.ndarray, config: IndexConfig, skip: np.ndarray | None = None) -> AnnBase:
    """Build a base of ``kind`` over ``x`` (float32, (n, dim)), in memory and writable.

    Args:
        skip: sorted positions of rows left out (calibration's held-out queries, added later); the
            quantizers still train on every row.
    """
    started = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    base = BASES[kind].build(x, config, skip)  # type: ignore[attr-defined]
    logger.info("built %s index over %d vectors in %.1fs", kind, len(x), time.perf_counter() - started)
    return base
