"""Index benchmark: our read path (snapshot load, query planner, FAISS) against an exact baseline and a
peer engine (LanceDB), side by side in one process, on synthetic CLIP-like data.

    python bench/index_bench.py --n 1000000 --dim 512 --out result.json
    python bench/index_bench.py --n 300000 --data c256_50k --recall-targets 0.95,0.99 --peer none --out r.json

What it does, in order (every phase is timed and logged):

1. Generates ``n`` unit vectors of the distribution ``--data`` names: ``shipped`` (like CLIP
   embeddings, of low intrinsic dimension: 1,000 clusters in a 64-d latent subspace plus small full-rank
   noise), the harder ``c128_5k`` (5,000 clusters in 128-d) and ``c256_50k`` (50,000 in 256-d), or
   ``sphere`` (spread evenly on the unit sphere: no structure), and realistic tags: categorical
   ``category`` (20 values), ``color`` (10), ``brand`` (1,000), boolean ``in_stock``, numeric ``price``
   (log-normal) and a list-valued ``labels`` (1-3 of 100). Queries are fresh draws from the same
   distribution, not stored vectors.
2. Writes the library through the real storage path (``LibraryWriter`` + SQLite), then builds the
   snapshot the way the writer's background thread does (``index_kind: auto`` picks the kind by size).
3. Loads a ``LibraryReader`` from that snapshot (``load_s``) and runs the queries through
   ``LibraryReader.search`` (catch-up check, filter evaluation, planner, FAISS, id mapping): unfiltered
   and at selectivities 0.5, 0.1, 0.01 and 0.001, at each ``--recall-targets`` value (the first one's
   figures are the top-level keys, with ``recall_target`` and ``data``; the others are listed under
   ``other_targets``; the snapshot's recall ``calibration`` is copied into the result). Recall@10 is
   against exact search over the same rows (ground truth computed here with numpy masks and
   ``faiss.knn``, independently of the planner).
4. ``filter_eval_ms``: a 3-condition filter (categorical ``in``, numeric ``<``, list-valued ``=``)
   evaluated to a bitmap over all rows. ``baseline_exact``: a plain ``faiss.knn`` flat scan.
5. ``catchup_10k_s``: 10,000 rows committed after the load, then one ``catch_up()``; the unfiltered
   queries are timed again with those rows in the exact tail.
6. The peer (LanceDB, IVF-PQ with refine, scalar indexes on the filtered columns): the same queries.

``--shards S`` (S > 1), for each index kind of ``--kinds`` (``auto``, ``flat``, ``hnsw``, ``ivfpq``):
the same rows written through ``LibraryWriter`` twice, as a 1-shard and as an S-shard library (records
routed by ``index.search.sharding.shard_of``), snapshots built per shard (``snapshot_all``), one
``LibraryReader`` per shard; each case searched on both, side by side, the way the service answers:
every shard's top-k as result objects (records read from its store) merged by cosine with
``index.query.merge.merge_results`` (a 1-shard library goes through the same path). The fan-out is
**sequential** here (one process, shard after shard); the service fans out concurrently across
LibraryIndex replicas, so each query also records ``critical_p50_ms``, the slowest shard plus the merge.
Per kind: ``identical_top10`` (fraction of queries whose merged ids equal the unsharded library's; 1.0
for exact kinds), recall of both and its difference, ``shard_fanout_ratio`` = p50(S) / p50(1) and
``bytes_per_vector_ram`` (`resident_index_bytes`, from the FAISS structures; ``rss_anon_bytes_per_vector``
is the process's anonymous RSS growth when the readers load). The first kind's sharded library gives the
unsharded JSON's keys (plus ``shards``, ``shard_fanout_ratio``, ``bytes_per_vector_ram`` per kind,
``per_kind``); its libraries take the 10k-row catch-up.

    python bench/index_bench.py --n 200000 --shards 4 --kinds flat,hnsw,ivfpq --peer none --out s.json

Timings are single queries, one after another (p50/p99 over ``--queries`` queries per case).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filters import parse_filter
from index.query.merge import merge_results
from index.query.reader import LibraryReader, result_objects
from index.search.ann import IndexConfig
from index.search.scores import ScoreCalibration
from index.storage.embedded.snapshot import read_manifest
from index.storage.embedded.store import LibraryStore, NewRecord
from index.writer import LibraryWriter

log = logging.getLogger("index_bench")

CATEGORIES = [f"cat{i:02d}" for i in range(20)]
COLORS = [f"color{i}" for i in range(10)]
LABELS = [f"l{i:02d}" for i in range(100)]
MODEL = {"model": "synthetic", "pretrained": "none", "identity": "synthetic/none"}
K = 10


# -- data ----------------------------------------------------------------------------------------


#: ``--data``: (latent dimension, clusters) of the clustered distributions; ``sphere``: points spread
#: evenly on the unit sphere of R^dim (no structure at all: the hardest case for any index).
DISTRIBUTIONS: dict[str, tuple[int, int] | None] = {
    "shipped": (64, 1000),
    "c128_5k": (128, 5000),
    "c256_50k": (256, 50000),
    "sphere": None,
}


def vector_chunks(
    n: int, dim: int, rng: np.random.Generator, data: str, chunk: int = 100_000
) -> Iterator[np.ndarray]:
    """The vectors of ``--data`` distribution ``data``, ``chunk`` rows at a time (bounded scratch memory
    at any n: `bench/ivfpq_scale.py` streams them to a memory-mapped file)."""
    shape = DISTRIBUTIONS[data]
    structure = np.random.default_rng(12345)  # shared by the library and its queries
    if shape is not None:
        latent, clusters = shape
        # Random Gaussian directions in 512-d are nearly orthogonal: no QR needed for a latent basis.
        basis = (structure.standard_normal((dim, latent)) / np.sqrt(dim)).astype(np.float32)
        centres = structure.standard_normal((clusters, latent)).astype(np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if shape is None:
            v = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal(
                (m, latent), dtype=np.float32
            )
            v = z @ basis.T + 0.05 * rng.standard_normal((m, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        yield v


class Data:
    """Vectors and tag columns (numpy) of a synthetic library; row i has row id i + 1 in the store."""

    def __init__(self, n: int, dim: int, seed: int, *, data: str = "shipped") -> None:
        rng = np.random.default_rng(seed)
        self.vectors = np.empty((n, dim), dtype=np.float32)
        start = 0
        for v in vector_chunks(n, dim, rng, data):
            self.vectors[start : start + len(v)] = v
            start += len(v)
        self.category = rng.integers(0, len(CATEGORIES), n)
        self.color = rng.integers(0, len(COLORS), n)
        self.brand = np.minimum(rng.zipf(1.3, n), 1000) - 1
        self.in_stock = rng.random(n) < 0.5
        self.price = np.round(np.exp(rng.normal(4.0, 1.0, n)), 2)
        # 1-3 distinct labels per row: a random first one, the others at offsets 1-49 and 50-99 from it.
        first = rng.integers(0, len(LABELS), n)
        self.labels = np.stack(
            [first, (first + rng.integers(1, 50, n)) % 100, (first + rng.integers(50, 100, n)) % 100], axis=1
        )
        self.label_count = rng.integers(1, 4, n)

    def __len__(self) -> int:
        return len(self.vectors)

    def tags(self, i: int) -> dict[str, Any]:
        return {
            "category": CATEGORIES[self.category[i]],
            "color": COLORS[self.color[i]],
            "brand": f"brand{self.brand[i]}",
            "in_stock": bool(self.in_stock[i]),
            "price": float(self.price[i]),
            "labels": [LABELS[j] for j in self.labels[i, : self.label_count[i]]],
        }

    def has_label(self, label: int) -> np.ndarray:
        present = self.labels == label
        present &= np.arange(3) < self.label_count[:, None]
        return present.any(axis=1)


def cases(data: Data) -> list[dict[str, Any]]:
    """Filters at the four selectivities: our tag_filter, the peer's SQL, and the true mask (numpy)."""
    label7 = data.has_label(7)
    return [
        {
            "selectivity": 0.5,
            "filter": [{"field": "in_stock", "op": "=", "value": True}],
            "sql": "in_stock = true",
            "mask": data.in_stock.copy(),
        },
        {
            "selectivity": 0.1,
            "filter": [{"field": "category", "op": "in", "value": ["cat03", "cat11"]}],
            "sql": "category IN ('cat03', 'cat11')",
            "mask": np.isin(data.category, [3, 11]),
        },
        {
            "selectivity": 0.01,
            "filter": [
                {"field": "category", "op": "=", "value": "cat05"},
                {"field": "color", "op": "in", "value": ["color1", "color2"]},
            ],
            "sql": "category = 'cat05' AND color IN ('color1', 'color2')",
            "mask": (data.category == 5) & np.isin(data.color, [1, 2]),
        },
        {
            "selectivity": 0.001,
            "filter": [
                {"field": "category", "op": "=", "value": "cat07"},
                {"field": "labels", "op": "=", "value": "l07"},
            ],
            "sql": "category = 'cat07' AND array_has(labels, 'l07')",
            "mask": (data.category == 7) & label7,
        },
    ]


THREE_CONDITIONS = [
    {"field": "category", "op": "in", "value": ["cat01", "cat02", "cat03"]},
    {"field": "price", "op": "<", "value": 80},
    {"field": "labels", "op": "=", "value": "l42"},
]


# -- measuring -------------------------------------------------------------------------------------


def ground_truth(data: Data, queries: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Exact top-k row indexes of each query among the rows in ``mask`` (all rows when None)."""
    if mask is None:
        _, idx = faiss.knn(queries, data.vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
        return idx
    rows = np.flatnonzero(mask)
    _, idx = faiss.knn(queries, data.vectors[rows], K, metric=faiss.METRIC_INNER_PRODUCT)
    return np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    hits = total = 0
    for got, want in zip(found, truth, strict=True):
        want = want[want >= 0]
        hits += len(set(got.tolist()) & set(want.tolist()))
        total += len(want)
    return hits / max(total, 1)


def timed(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """Run ``fn`` on each query; latency percentiles in ms and the row indexes it returned."""
    fn(queries[0])  # warm-up (first touch of memory maps, lazy initialisation)
    found, times = [], []
    for q in queries:
        t = time.perf_counter()
        rows = fn(q)
        times.append(time.perf_counter() - t)
        found.append(rows)
    ms = np.array(times) * 1e3
    return found, {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("%s ...", name)
        t = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t, 2)
        log.info("%s: %.1fs", name, self.seconds[name])
        return out


def run_facts(config: IndexConfig, phases: Phases, started: float, **machine: Any) -> dict[str, Any]:
    """What every result JSON records about its run: the index settings, the phases' seconds, the total
    time, and the machine (CPUs, load at the end, faiss version, plus ``machine`` entries)."""
    return {
        "index_config": {k: v for k, v in config.model_dump().items() if not k.startswith("snapshot")},
        "phases_s": phases.seconds,
        "total_s": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "faiss": faiss.__version__,
            **machine,
        },
    }


# -- ours ------------------------------------------------------------------------------------------


def ingest(writer: LibraryWriter, name: str, data: Data, start: int, stop: int, batch: int = 5000) -> None:
    info = writer.catalog.get(name)
    for lo in range(start, stop, batch):
        hi = min(stop, lo + batch)
        writer.add_images(
            name,
            info.uid,
            [
                NewRecord(f"img{i}", f"s3://bench/{i}.jpg", data.vectors[i], tags=data.tags(i))
                for i in range(lo, hi)
            ],
        )


def search_fn(
    reader: LibraryReader, node: object, target: float | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    def run(q: np.ndarray) -> np.ndarray:
        return reader.search(q, K, node, recall_target=target).row_ids - 1

    return run


def measure_catchup(
    reader: LibraryReader, library_dir: Path, extra: Data, queries: np.ndarray, phases: Phases, threads: int
) -> dict[str, Any]:
    """Commit ``extra`` (10k rows) after the reader loaded, time one ``catch_up()``, and time the
    unfiltered queries again with those rows in the exact tail."""
    with LibraryStore(library_dir) as store:

        def commit() -> None:  # as the writer does: one transaction per add_images call (500 rows)
            for lo in range(0, len(extra), 500):
                store.upsert(
                    [
                        NewRecord(f"new{i}", f"s3://bench/new{i}.jpg", extra.vectors[i], tags=extra.tags(i))
                        for i in range(lo, min(lo + 500, len(extra)))
                    ]
                )

        phases.run("commit 10k new rows", commit)
    t = time.perf_counter()
    applied = reader.catch_up()
    seconds = time.perf_counter() - t
    log.info("caught up %d rows in %.2fs", applied, seconds)
    faiss.omp_set_num_threads(threads)
    _, with_tail = timed(search_fn(reader, None), queries)
    return {"catchup_10k_s": round(seconds, 3), "unfiltered_with_10k_tail": with_tail}


# -- sharded libraries (--shards) -------------------------------------------------------------------


def rss_anon() -> int:
    """Anonymous resident memory of this process (bytes): heap and FAISS structures read into memory,
    not the pages of memory-mapped files (those are RssFile). Freed heap is returned to the system first
    (``malloc_trim``), else a load reuses what a build freed and the growth reads as zero."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path, under: str | None = None) -> int:
    """Bytes of the files under ``path`` (only those below a directory named ``under``, if given)."""
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and (under is None or under in f.relative_to(path).parts[:-1])
    )


def resident_index_bytes(base: Any) -> int:
    """Bytes an index keeps in RAM, from its FAISS structures (the float32 vectors of ``flat`` and
    ``hnsw`` are memory-mapped but searched directly, so they count; the raw vectors of ``ivfpq`` are
    read only for the rows it re-ranks, so they do not): flat = vectors; hnsw = vectors + links + the
    filter IVF's SQ8 codes, ids and centroids; ivfpq = PQ codes + ids + coarse centroids + PQ centroids."""
    if base is None:
        return 0
    if base.kind == "flat":
        return base.ntotal * base.dim * 4
    if base.kind == "hnsw":
        ivf = base.filter_ivf
        return base.nbytes() + (0 if ivf is None else ivf.nlist * ivf.d * 4)
    ivf = faiss.downcast_index(base.index)
    return base.nbytes() + ivf.nlist * ivf.d * 4 + int(ivf.pq.centroids.size()) * 4


class Fanout:
    """A library's shards searched as the service does: each shard's reader answers its top-k (catch-up,
    planner, FAISS, records read from its store: ``index.query.shard.search_reader``), the answers are
    merged by cosine with ``index.query.merge.merge_results`` (as the ingress does, also for a 1-shard
    library).

    The shards are searched one after another, in this one process; the service fans out concurrently
    to LibraryIndex replicas. ``critical_ms`` records, per query, the slowest shard plus the merge: the
    latency of a concurrent fan-out with one replica per shard and no queueing."""

    def __init__(self, readers: list[LibraryReader]) -> None:
        self.readers = readers
        self.calibration = ScoreCalibration()
        self.critical_ms: list[float] = []
        self.shard_ms: list[float] = []  # every shard call of every query
        self.scores: list[list[float]] = []
        self.paths: dict[str, int] = {}

    def fn(self, node: object, target: float) -> Callable[[np.ndarray], np.ndarray]:
        def run(q: np.ndarray) -> np.ndarray:
            answers, slowest = [], 0.0
            for reader in self.readers:
                t = time.perf_counter()
                hits = reader.search(q, K, node, recall_target=target)
                scores = self.calibration.for_query("image", hits.cosines)
                answers.append(
                    result_objects(reader, hits, scores, min_score=None, return_frame=False, with_rank=True)
                )
                took = time.perf_counter() - t
                self.shard_ms.append(took * 1e3)
                slowest = max(slowest, took)
                self.paths[hits.path] = self.paths.get(hits.path, 0) + 1
            t = time.perf_counter()
            merged = merge_results(answers, K)
            self.critical_ms.append((slowest + time.perf_counter() - t) * 1e3)
            self.scores.append([r["score"] for r in merged])
            return np.array([int(str(r["image_id"])[3:]) for r in merged], dtype=np.int64)

        return run

    def reset(self) -> None:
        self.critical_ms, self.shard_ms, self.scores, self.paths = [], [], [], {}


def open_readers(writer: LibraryWriter, name: str, config: IndexConfig) -> tuple[list[LibraryReader], float]:
    info = writer.catalog.get(name)
    t = time.perf_counter()
    readers = [
        LibraryReader(d, model_identity=MODEL["identity"], config=config, background_pickup=False)
        for d in writer.storage.shards(info)
    ]
    return readers, time.perf_counter() - t


def measure_fanout(
    fanout: Fanout,
    queries: np.ndarray,
    all_cases: list[dict],
    truths: dict,
    target: float,
    label: str,
    phases: Phases,
) -> tuple[dict[str, Any], dict[Any, tuple[list[np.ndarray], list[list[float]]]]]:
    """The benchmark's cases on one library through ``fanout``: the same keys as the unsharded
    measurement, plus ``critical_p50_ms`` (slowest shard + merge); and what each case returned."""
    out: dict[str, Any] = {"recall_target": target, "filtered": []}
    returned: dict[Any, tuple[list[np.ndarray], list[list[float]]]] = {}
    for case in [None, *all_cases]:
        node = None if case is None else parse_filter(case["filter"])
        key = None if case is None else case["selectivity"]
        fanout.reset()
        found, t = phases.run(
            f"{label}: queries at {key or 'unfiltered'} (target {target})",
            lambda node=node: timed(fanout.fn(node, target), queries),
        )
        scores = fanout.scores[1:]  # without the warm-up
        returned[key] = (found, scores)
        row = {
            **t,
            "critical_p50_ms": round(float(np.percentile(fanout.critical_ms[1:], 50)), 3),
            "shard_call_p50_ms": round(float(np.percentile(fanout.shard_ms[len(fanout.readers) :], 50)), 3),
            "recall_at_10": round(recall(found, truths[key]), 4),
            "planner_paths": dict(fanout.paths),
        }
        if case is None:
            out["unfiltered"] = row
        else:
            out["filtered"].append(
                {
                    "selectivity": key,
                    "actual_selectivity": round(float(case["mask"].mean()), 5),
                    **row,
                }
            )
    return out, returned


def sharded_kind(
    writer: LibraryWriter,
    kind: str,
    shards: int,
    data: Data,
    queries: np.ndarray,
    all_cases: list[dict],
    truths: dict,
    targets: list[float],
    config: IndexConfig,
    phases: Phases,
    search_threads: int,
    build_threads: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One index kind: the same rows written as a 1-shard and as a ``shards``-shard library through the
    writer, snapshots built per shard, one reader per shard; the cases measured side by side (for each
    case, the 1-shard library's queries then the sharded one's) and compared.

    Returns:
        The per-kind figures, and the sharded library's measurement at the first target in the
        unsharded JSON's shape (the top-level keys when this is the first kind).
    """
    model = {**MODEL, "dim": data.vectors.shape[1]}
    libs: dict[str, dict[str, Any]] = {}
    for label, count in (("unsharded", 1), ("sharded", shards)):
        name = f"{label}_{kind}"
        writer.create_library(name, "general_search", None, model, index_kind=kind, shards=count)
        phases.run(f"{name}: ingest into SQLite", lambda name=name: ingest(writer, name, data, 0, len(data)))
        t = time.perf_counter()
        manifests = phases.run(f"{name}: build snapshots", lambda name=name: writer.snapshot_all(name))
        libs[label] = {"name": name, "manifests": manifests, "build_s": round(time.perf_counter() - t, 2)}
    out: dict[str, Any] = {"shards": shards}
    for label, lib in libs.items():
        gc.collect()
        before = rss_anon()
        readers, load_s = open_readers(writer, lib["name"], config)
        lib["rss_anon_delta"] = rss_anon() - before
        lib["readers"], lib["fanout"] = readers, Fanout(readers)
        bases = [r.table.base for r in readers]
        manifests = lib["manifests"]
        out[label] = {
            "index_kinds": sorted({r.kind for r in readers}),
            "shard_rows": [m.count for m in manifests],
            "build_s": lib["build_s"],
            "load_s": round(load_s, 3),
            "bytes_per_vector": round(sum(m.index_bytes for m in manifests) / len(data), 1),
            "bytes_per_vector_ram": round(sum(resident_index_bytes(b) for b in bases) / len(data), 1),
            "rss_anon_bytes_per_vector": round(lib["rss_anon_delta"] / len(data), 1),
            # on disk: the record stores (SQLite: vectors, tags, ids) and the snapshots
            "disk_bytes_per_vector": round(dir_bytes(writer.catalog.library_dir(lib["name"])) / len(data), 1),
            "snapshot_disk_bytes_per_vector": round(
                dir_bytes(writer.catalog.library_dir(lib["name"]), "snapshots") / len(data), 1
            ),
            "calibration": [m.calibration for m in manifests],
        }
    faiss.omp_set_num_threads(search_threads)
    measured: dict[str, list[dict[str, Any]]] = {"unsharded": [], "sharded": []}
    comparisons = []
    for target in targets:
        got = {}
        for label in ("unsharded", "sharded"):
            m, returned = measure_fanout(
                libs[label]["fanout"], queries, all_cases, truths, target, f"{kind} {label}", phases
            )
            measured[label].append(m)
            got[label] = returned
        rows = []
        for key in [None, *(c["selectivity"] for c in all_cases)]:
            (ids1, sc1), (idss, scs) = got["unsharded"][key], got["sharded"][key]

            def case(m: dict[str, Any], key: Any = key) -> dict[str, Any]:
                if key is None:
                    return m["unfiltered"]
                return next(f for f in m["filtered"] if f["selectivity"] == key)

            one, many = case(measured["unsharded"][-1]), case(measured["sharded"][-1])
            rows.append(
                {
                    "selectivity": key if key is not None else 1.0,
                    "identical_top10": round(
                        float(np.mean([np.array_equal(a, b) for a, b in zip(ids1, idss, strict=True)])), 4
                    ),
                    "identical_scores": round(
                        float(np.mean([a == b for a, b in zip(sc1, scs, strict=True)])), 4
                    ),
                    "recall_unsharded": one["recall_at_10"],
                    "recall_sharded": many["recall_at_10"],
                    "recall_delta": round(many["recall_at_10"] - one["recall_at_10"], 4),
                    "p50_ms_unsharded": one["p50_ms"],
                    "p50_ms_sharded": many["p50_ms"],
                    "shard_fanout_ratio": round(many["p50_ms"] / max(one["p50_ms"], 1e-9), 3),
                    "critical_p50_ms_sharded": many["critical_p50_ms"],
                    "critical_fanout_ratio": round(many["critical_p50_ms"] / max(one["p50_ms"], 1e-9), 3),
                    "shard_call_p50_ms_sharded": many["shard_call_p50_ms"],
                    "straggler_ratio": round(
                        many["critical_p50_ms"] / max(many["shard_call_p50_ms"], 1e-9), 3
                    ),
                }
            )
        comparisons.append({"recall_target": target, "cases": rows})
    faiss.omp_set_num_threads(build_threads)
    out["measured"] = measured
    out["comparison"] = comparisons
    first = comparisons[0]["cases"]
    out["summary"] = {
        "identical_top10_all_cases": min(r["identical_top10"] for c in comparisons for r in c["cases"]),
        "max_abs_recall_delta": max(abs(r["recall_delta"]) for c in comparisons for r in c["cases"]),
        "shard_fanout_ratio_unfiltered": first[0]["shard_fanout_ratio"],
        "critical_fanout_ratio_unfiltered": first[0]["critical_fanout_ratio"],
    }
    top = {
        "index_kind": ",".join(out["sharded"]["index_kinds"]),
        "bytes_per_vector": out["sharded"]["bytes_per_vector"],
        "load_s": out["sharded"]["load_s"],
        **measured["sharded"][0],
        "other_targets": measured["sharded"][1:],
        "calibration": out["sharded"]["calibration"],
    }
    return out, top


def sharded_catchup(
    writer: LibraryWriter,
    name: str,
    readers: list[LibraryReader],
    extra: Data,
    queries: np.ndarray,
    phases: Phases,
    threads: int,
) -> dict[str, Any]:
    """``measure_catchup`` for a sharded library: 10k rows through the writer (routed by id), then one
    ``catch_up()`` per shard; the unfiltered queries again with those rows in the shards' tails."""
    info = writer.catalog.get(name)

    def commit() -> None:
        for lo in range(0, len(extra), 500):
            writer.add_images(
                name,
                info.uid,
                [
                    NewRecord(f"new{i}", f"s3://bench/new{i}.jpg", extra.vectors[i], tags=extra.tags(i))
                    for i in range(lo, min(lo + 500, len(extra)))
                ],
            )

    phases.run("commit 10k new rows", commit)
    t = time.perf_counter()
    applied = sum(r.catch_up() for r in readers)
    seconds = time.perf_counter() - t
    log.info("caught up %d rows in %.2fs", applied, seconds)
    faiss.omp_set_num_threads(threads)

    def by_rows(q: np.ndarray) -> np.ndarray:  # timing only: every shard searched, sequentially
        for reader in readers:
            reader.search(q, K, None)
        return np.empty(0, dtype=np.int64)

    _, with_tail = timed(by_rows, queries)
    return {"catchup_10k_s": round(seconds, 3), "unfiltered_with_10k_tail": with_tail}


# -- peer ------------------------------------------------------------------------------------------


def lancedb_peer(
    data: Data, queries: np.ndarray, all_cases: list[dict], truths: dict, workdir: Path, phases: Phases, args
) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa

    n, dim = data.vectors.shape

    def table() -> pa.Table:
        return pa.table(
            {
                "id": pa.array(np.arange(n, dtype=np.int64)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(data.vectors.reshape(-1)), dim),
                "category": pa.array([CATEGORIES[c] for c in data.category]),
                "color": pa.array([COLORS[c] for c in data.color]),
                "in_stock": pa.array(data.in_stock),
                "price": pa.array(data.price),
                "labels": pa.array(
                    [
                        [LABELS[j] for j in row[:c]]
                        for row, c in zip(data.labels, data.label_count, strict=True)
                    ],
                    type=pa.list_(pa.string()),
                ),
            }
        )

    db = lancedb.connect(str(workdir / "lancedb"))
    tbl = phases.run("peer: write table", lambda: db.create_table("bench", table(), mode="overwrite"))
    partitions = max(16, int(np.sqrt(n)))

    def build() -> None:
        tbl.create_index(
            metric="dot",
            index_type="IVF_PQ",
            num_partitions=partitions,
            num_sub_vectors=args.peer_sub_vectors,
            vector_column_name="vector",
            max_iterations=args.peer_iterations,
            sample_rate=args.peer_sample_rate,
        )
        tbl.create_scalar_index("category", index_type="BITMAP")
        tbl.create_scalar_index("color", index_type="BITMAP")
        tbl.create_scalar_index("in_stock", index_type="BITMAP")
        tbl.create_scalar_index("labels", index_type="LABEL_LIST")

    phases.run("peer: build indexes", build)

    def fn(sql: str | None) -> Callable[[np.ndarray], np.ndarray]:
        def run(q: np.ndarray) -> np.ndarray:
            query = tbl.search(q).distance_type("dot").limit(K).nprobes(args.peer_nprobes)
            query = query.refine_factor(args.peer_refine).select(["id"])
            if sql is not None:
                query = query.where(sql, prefilter=True)
            return query.to_arrow()["id"].to_numpy()

        return run

    out: dict[str, Any] = {
        "engine": f"lancedb {lancedb.__version__}",
        "index": f"IVF_PQ (partitions {partitions}, sub-vectors {args.peer_sub_vectors}, k-means "
        f"{args.peer_iterations} iterations on {args.peer_sample_rate} samples per partition), "
        f"nprobes {args.peer_nprobes}, refine_factor {args.peer_refine}, prefilter, scalar indexes "
        "(BITMAP category/color/in_stock, LABEL_LIST labels)",
        "build_s": phases.seconds["peer: build indexes"],
    }
    found, t = phases.run("peer: unfiltered queries", lambda: timed(fn(None), queries))
    out["unfiltered"] = {**t, "recall_at_10": round(recall(found, truths[None]), 4)}
    out["filtered"] = []
    for case in all_cases:
        found, t = phases.run(
            f"peer: queries at {case['selectivity']}", lambda c=case: timed(fn(c["sql"]), queries)
        )
        out["filtered"].append(
            {
                "selectivity": case["selectivity"],
                **t,
                "recall_at_10": round(recall(found, truths[case["selectivity"]]), 4),
            }
        )
    return out


def all_truths(
    data: Data, queries: np.ndarray, all_cases: list[dict], phases: Phases
) -> dict[Any, np.ndarray]:
    truths: dict[Any, np.ndarray] = {}
    truths[None] = phases.run("ground truth (exact)", lambda: ground_truth(data, queries, None))
    for case in all_cases:
        truths[case["selectivity"]] = ground_truth(data, queries, case["mask"])
    return truths


def sharded_main(
    args: argparse.Namespace,
    writer: LibraryWriter,
    data: Data,
    extra: Data,
    queries: np.ndarray,
    all_cases: list[dict],
    targets: list[float],
    config: IndexConfig,
    phases: Phases,
) -> dict[str, Any]:
    """``--shards S``: per kind of ``--kinds``, S shards against 1 (`sharded_kind`); the first kind's
    sharded library gives the unsharded JSON's keys, then its catch-up of 10k rows."""
    build_threads = faiss.omp_get_max_threads()
    search_threads = config.search_threads or build_threads
    truths = all_truths(data, queries, all_cases, phases)
    result: dict[str, Any] = {"n": args.n, "dim": args.dim, "data": args.data, "shards": args.shards}
    per_kind: dict[str, Any] = {}
    kinds = [k for k in args.kinds.split(",") if k]
    for i, kind in enumerate(kinds):
        figures, top = sharded_kind(
            writer,
            kind,
            args.shards,
            data,
            queries,
            all_cases,
            truths,
            targets,
            config,
            phases,
            search_threads,
            build_threads,
        )
        per_kind[kind] = figures
        libs = {label: writer.catalog.get(f"{label}_{kind}") for label in ("unsharded", "sharded")}
        if i == 0:
            result.update(top)
            result["shard_fanout_ratio"] = figures["summary"]["shard_fanout_ratio_unfiltered"]
            readers, _ = open_readers(writer, libs["sharded"].name, config)
            tags = [r.table.tags for r in readers]
            from filters import evaluate

            node3 = parse_filter(THREE_CONDITIONS)
            _, t_eval = timed(
                lambda q, node3=node3, tags=tags: [evaluate(node3, t) for t in tags], queries[:50]
            )
            result["filter_eval_ms"] = t_eval["p50_ms"]
            result.update(
                sharded_catchup(writer, libs["sharded"].name, readers, extra, queries, phases, search_threads)
            )
            faiss.omp_set_num_threads(build_threads)
            for r in readers:
                r.close()
        # free this kind's libraries before the next one's (memory and disk)
        gc.collect()
        for label in ("unsharded", "sharded"):
            writer.delete_library(libs[label].name)
    result["bytes_per_vector_ram"] = {
        kind: {
            "unsharded": f["unsharded"]["bytes_per_vector_ram"],
            "sharded": f["sharded"]["bytes_per_vector_ram"],
        }
        for kind, f in per_kind.items()
    }
    result["per_kind"] = per_kind
    result["fanout"] = (
        "sequential: the shards are searched one after another in this process (the service fans out "
        "concurrently to LibraryIndex replicas); critical_p50_ms = slowest shard + merge per query"
    )
    return result


def finish(
    args: argparse.Namespace,
    data: Data,
    queries: np.ndarray,
    all_cases: list[dict],
    workdir: Path,
    phases: Phases,
    config: IndexConfig,
    started: float,
) -> dict[str, Any]:
    """The keys every run ends with: exact baseline, peer, config, phases, machine."""
    build_threads = faiss.omp_get_max_threads()
    search_threads = config.search_threads or build_threads
    out: dict[str, Any] = {}
    faiss.omp_set_num_threads(search_threads)

    def exact(q: np.ndarray) -> np.ndarray:
        return faiss.knn(q.reshape(1, -1), data.vectors, K, metric=faiss.METRIC_INNER_PRODUCT)[1][0]

    truth = ground_truth(data, queries[:30], None)
    found, t_base = phases.run("baseline exact (faiss flat scan)", lambda: timed(exact, queries[:30]))
    out["baseline_exact"] = {**t_base, "recall_at_10": round(recall(found, truth), 4)}
    faiss.omp_set_num_threads(build_threads)
    if args.peer == "lancedb":
        truths = all_truths(data, queries, all_cases, phases)
        out["peer"] = lancedb_peer(data, queries, all_cases, truths, workdir, phases, args)
    out.update(run_facts(config, phases, started, search_threads=search_threads))
    return out


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=200, help="queries per case")
    parser.add_argument("--data", choices=list(DISTRIBUTIONS), default="shipped")
    parser.add_argument(
        "--recall-targets",
        default="",
        help="comma-separated recall targets measured on the same index (default: the config's); the "
        "first one's figures are the top-level keys, the others go under 'other_targets'",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed after")
    parser.add_argument("--peer", choices=["lancedb", "none"], default="lancedb")
    parser.add_argument("--peer-nprobes", type=int, default=32)
    parser.add_argument("--peer-refine", type=int, default=10)
    parser.add_argument("--peer-sub-vectors", type=int, default=64)
    parser.add_argument("--peer-iterations", type=int, default=20, help="k-means iterations (lance: 50)")
    parser.add_argument(
        "--peer-sample-rate", type=int, default=64, help="training rows per partition (lance: 256)"
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="above 1: each --kinds library written both as 1 shard and as this many, searched and "
        "compared side by side (fan-out sequential in this process)",
    )
    parser.add_argument(
        "--kinds",
        default="auto",
        help="with --shards: comma-separated index_kind of the libraries (auto, flat, hnsw, ivfpq); the "
        "first one's sharded figures are the top-level keys",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the library in --workdir (skips ingest, build and catch-up)",
    )
    parser.add_argument(
        "--index",
        type=json.loads,
        default={},
        help="IndexConfig overrides as JSON, e.g. '{\"hnsw_ef_search\": 96}'",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="index-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    phases = Phases()
    # Snapshots only when the benchmark says so: the ingest must not trigger rebuilds midway.
    config = IndexConfig(**{"snapshot_min_rows": 10**12, **args.index})
    build_threads = faiss.omp_get_max_threads()
    # As a LibraryIndex replica does (IndexConfig.search_threads); builds use every core.
    search_threads = config.search_threads or build_threads
    try:
        data = phases.run("generate data", lambda: Data(args.n, args.dim, seed=1, data=args.data))
        extra = phases.run("generate 10k extra rows", lambda: Data(10_000, args.dim, seed=2, data=args.data))
        queries = Data(args.queries, args.dim, seed=3, data=args.data).vectors
        targets = [float(t) for t in args.recall_targets.split(",") if t] or [config.recall_target]
        all_cases = cases(data)

        writer = LibraryWriter(workdir / "ours", config=config)
        if args.shards > 1:
            result = sharded_main(args, writer, data, extra, queries, all_cases, targets, config, phases)
            result.update(finish(args, data, queries, all_cases, workdir, phases, config, started))
            writer.close()
            args.out.write_text(json.dumps(result, indent=1))
            log.info("wrote %s in %.0fs total", args.out, result["total_s"])
            return
        library_dir = writer.catalog.library_dir("bench")
        reuse = args.reuse and library_dir.exists()
        if reuse:
            manifest = read_manifest(library_dir)
        else:
            writer.create_library("bench", "general_search", None, {**MODEL, "dim": args.dim})
            phases.run("ingest into SQLite", lambda: ingest(writer, "bench", data, 0, len(data)))
            manifest = phases.run(
                "build snapshot (replay + index build + write)", lambda: writer.snapshot_now("bench")
            )

        t = time.perf_counter()
        reader = LibraryReader(library_dir, model_identity=MODEL["identity"], config=config)
        load_s = time.perf_counter() - t
        log.info("reader loaded in %.2fs: %s index", load_s, reader.kind)

        truths: dict[Any, np.ndarray] = {}
        truths[None] = phases.run("ground truth (exact)", lambda: ground_truth(data, queries, None))
        for case in all_cases:
            truths[case["selectivity"]] = ground_truth(data, queries, case["mask"])

        faiss.omp_set_num_threads(search_threads)
        result: dict[str, Any] = {
            "n": args.n,
            "dim": args.dim,
            "index_kind": reader.kind,
            "bytes_per_vector": round(manifest.index_bytes / manifest.count, 1),
            "load_s": round(load_s, 3),
        }

        def measure(target: float) -> dict[str, Any]:
            out: dict[str, Any] = {"recall_target": target}
            found, t_unf = phases.run(
                f"our unfiltered queries (target {target})",
                lambda: timed(search_fn(reader, None, target), queries),
            )
            out["unfiltered"] = {**t_unf, "recall_at_10": round(recall(found, truths[None]), 4)}
            out["filtered"] = []
            for case in all_cases:
                node = parse_filter(case["filter"])
                paths: dict[str, int] = {}

                def run(q: np.ndarray, node: object = node, paths: dict = paths) -> np.ndarray:
                    hits = reader.search(q, K, node, recall_target=target)
                    paths[hits.path] = paths.get(hits.path, 0) + 1
                    return hits.row_ids - 1

                found, t = phases.run(
                    f"our queries at {case['selectivity']} (target {target})",
                    lambda run=run: timed(run, queries),
                )
                out["filtered"].append(
                    {
                        "selectivity": case["selectivity"],
                        "actual_selectivity": round(float(case["mask"].mean()), 5),
                        **t,
                        "recall_at_10": round(recall(found, truths[case["selectivity"]]), 4),
                        "planner_paths": paths,
                    }
                )
            return out

        result["data"] = args.data
        result.update(measure(targets[0]))
        result["other_targets"] = [measure(t) for t in targets[1:]]
        result["calibration"] = read_manifest(library_dir).calibration

        from filters import evaluate

        node3 = parse_filter(THREE_CONDITIONS)
        tags = reader.table.tags
        _, t_eval = timed(lambda q: evaluate(node3, tags), queries[:50])
        result["filter_eval_ms"] = t_eval["p50_ms"]

        def exact(q: np.ndarray) -> np.ndarray:
            return faiss.knn(q.reshape(1, -1), data.vectors, K, metric=faiss.METRIC_INNER_PRODUCT)[1][0]

        found, t_base = phases.run("baseline exact (faiss flat scan)", lambda: timed(exact, queries[:30]))
        result["baseline_exact"] = {**t_base, "recall_at_10": round(recall(found, truths[None][:30]), 4)}

        faiss.omp_set_num_threads(build_threads)
        if not reuse:
            result.update(measure_catchup(reader, library_dir, extra, queries, phases, search_threads))
            faiss.omp_set_num_threads(build_threads)

        args.out.write_text(json.dumps(result, indent=1))  # ours, in case the peer fails
        if args.peer == "lancedb":
            result["peer"] = lancedb_peer(data, queries, all_cases, truths, workdir, phases, args)
        result.update(run_facts(config, phases, started, search_threads=search_threads))
        reader.close()
        writer.close()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s in %.0fs total", args.out, result["total_s"])


if __name__ == "__main__":
    main()
