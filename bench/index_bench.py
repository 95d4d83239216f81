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
   ``other_targets``; the snapshot's recall ``calibration`` is copied into the result). Recall@10 is against exact search over the same rows
   (ground truth computed here with numpy masks and ``faiss.knn``, independently of the planner).
4. ``filter_eval_ms``: a 3-condition filter (categorical ``in``, numeric ``<``, list-valued ``=``)
   evaluated to a bitmap over all rows. ``baseline_exact``: a plain ``faiss.knn`` flat scan.
5. ``catchup_10k_s``: 10,000 rows committed after the load, then one ``catch_up()``; the unfiltered
   queries are timed again with those rows in the exact tail.
6. The peer (LanceDB, IVF-PQ with refine, scalar indexes on the filtered columns): the same queries.

Timings are single queries, one after another (p50/p99 over ``--queries`` queries per case).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filters import parse_filter
from index.ann import IndexConfig
from index.reader import LibraryReader
from index.snapshot import read_manifest
from index.store import LibraryStore, NewRecord
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


class Data:
    """Vectors and tag columns (numpy) of a synthetic library; row i has row id i + 1 in the store."""

    def __init__(self, n: int, dim: int, seed: int, *, data: str = "shipped") -> None:
        shape = DISTRIBUTIONS[data]
        structure = np.random.default_rng(12345)  # shared by the library and its queries
        rng = np.random.default_rng(seed)
        self.vectors = np.empty((n, dim), dtype=np.float32)
        if shape is not None:
            latent, clusters = shape
            # Random Gaussian directions in 512-d are nearly orthogonal: no QR needed for a latent basis.
            basis = (structure.standard_normal((dim, latent)) / np.sqrt(dim)).astype(np.float32)
            centres = structure.standard_normal((clusters, latent)).astype(np.float32)
        for start in range(0, n, 100_000):  # in chunks: bounded scratch memory at n = 1M
            m = min(100_000, n - start)
            if shape is None:
                v = rng.standard_normal((m, dim), dtype=np.float32)
            else:
                z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal(
                    (m, latent), dtype=np.float32
                )
                v = z @ basis.T + 0.05 * rng.standard_normal((m, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            self.vectors[start : start + m] = v
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
        result["index_config"] = {k: v for k, v in config.__dict__.items() if not k.startswith("snapshot")}
        result["phases_s"] = phases.seconds
        result["total_s"] = round(time.perf_counter() - started, 1)
        result["machine"] = {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "faiss": faiss.__version__,
            "search_threads": search_threads,
        }
        reader.close()
        writer.close()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s in %.0fs total", args.out, result["total_s"])


if __name__ == "__main__":
    main()
