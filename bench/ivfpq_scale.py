"""IVF-PQ at scale: the ``ivfpq`` index kind over more vectors than fit in RAM as float32, streamed.

    python bench/ivfpq_scale.py --n 4000000 --workdir /tmp/ivfpq4m --out bench/results/ivfpq_4m.json

What it does, in order (every phase timed):

1. Streams ``n`` vectors of ``--data`` (the distributions of ``bench/index_bench.py``, same generator) to
   ``<workdir>/vectors.npy``, written through a memory map 100k rows at a time: the float32 vectors are
   never all in RAM. ``--reuse`` keeps an existing file of the right shape.
2. Exact ground truth of ``--queries`` fresh queries (seed 3): ``faiss.knn`` over the memory-mapped
   vectors 250k rows at a time, the per-chunk top-10s merged.
3. Builds the index as ``IvfPqBase.build`` does (same ``nlist_for``, ``pq_m_for``, training sample
   ``max(nlist * 64, 16384)`` rows drawn by ``index.search.ann._sample``, ``IndexIVFPQ`` over a flat
   inner-product quantizer), except that vectors are added 200k at a time from the memory map rather than from
   one in-RAM array (``IvfPqBase.build`` holds x and a copy of it: 2 x 8 GiB at 4M). ``train_s``, ``add_s``.
4. Writes ``index.faiss`` beside ``vectors.npy`` (the snapshot layout of an ``ivfpq`` base) and loads it
   with ``IvfPqBase.load`` (codes read into memory, raw vectors memory-mapped), then searches through
   ``IvfPqBase.search`` (coarse search, PQ scan, exact refine of ``refine_factor * k`` candidates from the
   memory-mapped vectors), one FAISS thread, single queries one after another:

   - ``default``: the config's uncalibrated plan (``ivf_nprobe`` lists' worth of candidates);
   - ``calibrated``: what a snapshot's calibration picks for ``recall_target`` (``index.search.calibration``,
     unfiltered ladder, ``--calibration-queries`` other fresh queries as the held-out set).

Memory, two ways: ``bytes_per_vector_ram`` from the FAISS structures (PQ codes + ids in the inverted
lists, coarse centroids, PQ centroids; the float32 vectors excluded: memory-mapped, read only for the
rows re-ranked), and ``rss_anon_bytes_per_vector``: the growth of the process's anonymous RSS when the
index is loaded (heap, after ``malloc_trim``; the memory-mapped pages are RssFile and excluded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index_bench import DISTRIBUTIONS, K, Phases, rss_anon, run_facts, timed, vector_chunks
from index.search.ann import IndexConfig, IvfPqBase, _sample
from index.search.calibration import calibrate

log = logging.getLogger("ivfpq_scale")


def stream_vectors(path: Path, n: int, dim: int, data: str, *, reuse: bool) -> np.ndarray:
    """``n`` vectors in a ``.npy`` file, written chunk by chunk; returned memory-mapped read-only."""
    if reuse and path.exists():
        existing = np.load(path, mmap_mode="r")
        if existing.shape == (n, dim):
            return existing
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    start = 0
    for v in vector_chunks(n, dim, np.random.default_rng(1), data):
        out[start : start + len(v)] = v
        start += len(v)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def exact_topk(queries: np.ndarray, vectors: np.ndarray, chunk: int = 250_000) -> np.ndarray:
    """Exact top-K row indexes by inner product, over ``vectors`` read ``chunk`` rows at a time."""
    best_d = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = np.ascontiguousarray(vectors[start : start + chunk])
        d, i = faiss.knn(queries, block, K, metric=faiss.METRIC_INNER_PRODUCT)
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, i + start], axis=1)
        top = np.argsort(-d, axis=1)[:, :K]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def build(vectors: np.ndarray, config: IndexConfig, phases: Phases) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = vectors.shape
    nlist = min(IvfPqBase.nlist_for(n, config), max(1, n // 39))
    m = IvfPqBase.pq_m_for(dim, config)
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim), dim, nlist, m, config.pq_nbits, faiss.METRIC_INNER_PRODUCT
    )
    index.verbose = True  # k-means progress on stdout: a 4M build trains for many minutes
    sample = phases.run("draw training sample", lambda: _sample(vectors, max(nlist * 64, 256 * 64)))
    rows = len(sample)
    phases.run("train (coarse k-means + PQ)", lambda: index.train(sample))
    sample = np.empty((0, dim), dtype=np.float32)  # release it before the add
    index.verbose = False

    def add() -> None:
        for start in range(0, n, 200_000):
            index.add(np.ascontiguousarray(vectors[start : start + 200_000]))
            log.info("added %d / %d", min(start + 200_000, n), n)

    phases.run("add (assign + encode)", add)
    return index, {"nlist": nlist, "pq_m": m, "pq_nbits": config.pq_nbits, "training_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=list(DISTRIBUTIONS), default="shipped")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--calibration-queries", type=int, default=200)
    parser.add_argument("--workdir", type=Path, required=True, help="vectors.npy and index.faiss (kept)")
    parser.add_argument("--reuse", action="store_true", help="reuse vectors.npy of the right shape")
    parser.add_argument(
        "--reuse-index",
        action="store_true",
        help="search the index.faiss a previous run of the same --n/--data left in --workdir instead of "
        "building one (to measure search-time settings such as refine_factor; no build figures)",
    )
    parser.add_argument("--index", type=json.loads, default={}, help="IndexConfig overrides (JSON)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    config = IndexConfig(**args.index)
    args.workdir.mkdir(parents=True, exist_ok=True)
    phases = Phases()
    build_threads = faiss.omp_get_max_threads()
    vectors = phases.run(
        "stream vectors to disk",
        lambda: stream_vectors(args.workdir / "vectors.npy", args.n, args.dim, args.data, reuse=args.reuse),
    )
    queries = next(vector_chunks(args.queries, args.dim, np.random.default_rng(3), args.data))
    held_out = next(vector_chunks(args.calibration_queries, args.dim, np.random.default_rng(4), args.data))
    truth = phases.run("ground truth (exact, chunked)", lambda: exact_topk(queries, vectors))

    reused = args.reuse_index and (args.workdir / "index.faiss").exists()
    rss_start = rss_built = rss_anon()
    shape: dict[str, Any] = {}  # a reused index's shape is read from it once loaded, below
    if not reused:
        index, shape = build(vectors, config, phases)
        rss_built = rss_anon()
        faiss.write_index(index, str(args.workdir / "index.faiss"))
        del index
    before = rss_anon()
    t = time.perf_counter()
    base = IvfPqBase.load(args.workdir)  # codes into memory, vectors.npy memory-mapped
    load_s = time.perf_counter() - t
    loaded = rss_anon() - before
    ivf = faiss.downcast_index(base.index)
    if reused:
        if ivf.ntotal != args.n:
            raise SystemExit(f"{args.workdir}/index.faiss holds {ivf.ntotal} vectors, not --n {args.n}")
        shape = {"nlist": ivf.nlist, "pq_m": ivf.pq.M, "pq_nbits": ivf.pq.nbits, "training_rows": None}
    structures = {
        "codes_and_ids": base.nbytes(),
        "coarse_centroids": ivf.nlist * ivf.d * 4,
        "pq_centroids": int(ivf.pq.centroids.size()) * 4,
    }
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])

    faiss.omp_set_num_threads(config.search_threads or build_threads)
    result: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "data": args.data,
        "index_kind": "ivfpq",
        **shape,
        "code_size": int(ivf.code_size),
        "list_size_min_median_max": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
        "bytes_per_vector_ram": round(sum(structures.values()) / args.n, 2),
        "ram_structures_bytes": structures,
        "rss_anon_bytes_per_vector": round(loaded / args.n, 2),
        "rss_anon_growth_during_build_bytes": rss_built - rss_start,
        "raw_vectors_on_disk_bytes": os.path.getsize(args.workdir / "vectors.npy"),
        "load_s": round(load_s, 3),
        "reused_index": reused,
    }

    def search(plan: Any) -> Any:
        def run(q: np.ndarray) -> np.ndarray:
            return base.search(q.reshape(1, -1), K, None, 1.0, config, plan)[1]

        return run

    default = base.default_plan(K, 1.0, False, config)
    found, t = phases.run("queries, default plan", lambda: timed(search(default), queries))
    result["default"] = {
        "plan": [default.method, default.value],
        **t,
        "recall_at_10": round(recall(found, truth), 4),
    }
    log.info("default plan %s: %s recall %.4f", default, t, result["default"]["recall_at_10"])

    cal_config = IndexConfig(**{**args.index, "calibration_selectivities": ()})
    calibration = phases.run(
        "calibrate (unfiltered ladder)", lambda: calibrate(base, held_out, None, cal_config)
    )
    result["calibrated"] = []
    if calibration is not None:
        result["calibration"] = calibration.to_dict()
        for target in (config.recall_target, 0.99):
            plan = calibration.plan(base, K, 1.0, target, config)
            if plan.method != "ivf":  # no IVF setting reaches the target: the reader scans every row
                result["calibrated"].append(
                    {"recall_target": target, "plan": [plan.method, plan.value], "recall_at_10": 1.0}
                )
                continue
            found, t = phases.run(
                f"queries, calibrated for {target}", lambda plan=plan: timed(search(plan), queries)
            )
            result["calibrated"].append(
                {
                    "recall_target": target,
                    "plan": [plan.method, plan.value],
                    **t,
                    "recall_at_10": round(recall(found, truth), 4),
                }
            )
    faiss.omp_set_num_threads(build_threads)
    if not reused:
        result["train_s"] = phases.seconds["train (coarse k-means + PQ)"]
        result["add_s"] = phases.seconds["add (assign + encode)"]
        result["build_s"] = round(
            result["train_s"] + result["add_s"] + phases.seconds["draw training sample"], 2
        )
    result.update(
        run_facts(
            config,
            phases,
            started,
            search_threads=config.search_threads or build_threads,
            build_threads=build_threads,
        )
    )
    args.out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s in %.0fs", args.out, result["total_s"])


if __name__ == "__main__":
    main()
