"""Cluster mode against embedded mode, side by side in one run: the same library written and searched
through the real storage layer (``index.storage``), with PostgreSQL and an object store started here.

    python bench/cluster_bench.py --n 100000 --out cluster.json
    python bench/cluster_bench.py --n 100000 --cold-n 1000000 --object-store s3 --out cluster.json

What it measures (every phase timed and logged):

1. ``adds_per_s``: one-record adds through ``LibraryWriter.add_images`` (the Writer deployment's work per
   ``/image/add``: a transaction that stamps a seq, with frames none), and ``rows_per_s_batched``:
   batches of 1,000 records (what an import chunk commits).
2. ``search_ms``: p50/p99 of ``LibraryReader.search`` (top 10) on the ``--n`` library, unfiltered and
   with a 10% tag filter. Each search first catches up with the store, as a replica does: in cluster
   mode that is a ``last_seq`` query over the network and a read of the snapshot pointer, which is what
   this compares. ``write_then_search_ms``: an add followed by a search that must see it.
3. ``cold_start`` (cluster mode, ``--cold-n`` vectors): a replica on a fresh node: an empty
   ``cache_dir``, the snapshot copied from the object store and memory-mapped, the first answer;
   seconds and MB/s of the copy.

PostgreSQL runs from Debian's binaries with durable commits (fsync on, as in production; the test
suite's server turns them off), SQLite with ``synchronous=FULL``. ``--object-store s3`` is moto's S3
server in this process (a Python server holding objects in memory: its MB/s says little about S3's),
``file`` a directory through fsspec's local filesystem. Timings are of one process on a shared
machine: compare the modes' ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_bench import MODEL, Data

from filters import parse_filter
from index.query.reader import LibraryReader
from index.search.ann import IndexConfig
from index.storage.backends import Storage, StorageSettings, open_storage
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter
from tests.pg_server import PgServer, find_bindir

log = logging.getLogger("cluster_bench")
K = 10


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


@contextmanager
def object_store(kind: str, work: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(object_store_url, object_store_options)`` of a fresh store of the given kind."""
    if kind == "file":
        root = work / "bucket"
        root.mkdir()
        yield f"file://{root}", {}
        return
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        options = {
            "key": "bench",
            "secret": "bench",
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        yield "s3://bench/cluster", options
    finally:
        server.stop()


def settings_for(
    mode: str, work: Path, pg: PgServer | None, store: tuple[str, dict[str, Any]]
) -> StorageSettings:
    if mode == "embedded":
        return StorageSettings(storage_root=str(work / "embedded"))
    assert pg is not None
    return StorageSettings(
        database_url=pg.url(),
        object_store_url=store[0],
        object_store_options=store[1],
        cache_dir=str(work / "cache-writer"),
    )


def ingest(writer: LibraryWriter, name: str, data: Data, lo: int, hi: int, batch: int) -> float:
    """Rows per second of adding rows [lo, hi) in batches of ``batch``."""
    uid = writer.catalog.get(name).uid
    started = time.perf_counter()
    for start in range(lo, hi, batch):
        stop = min(hi, start + batch)
        writer.add_images(
            name,
            uid,
            [
                NewRecord(f"img{i}", f"s3://bench/{i}.jpg", data.vectors[i], tags=data.tags(i))
                for i in range(start, stop)
            ],
        )
    return (hi - lo) / (time.perf_counter() - started)


def timed(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t) * 1000)
    return out


def measure_mode(
    mode: str, settings: StorageSettings, data: Data, queries: np.ndarray, singles: int
) -> dict[str, Any]:
    config = IndexConfig()
    storage: Storage = open_storage(settings)
    writer = LibraryWriter(storage, config=config)
    writer.create_library("bench", "general_search", None, MODEL | {"dim": data.vectors.shape[1]})
    n = len(data) - 200  # the last 200 rows are written during the read-your-writes phase
    result: dict[str, Any] = {"mode": mode}
    result["adds_per_s"] = round(ingest(writer, "bench", data, 0, singles, 1), 1)
    result["rows_per_s_batched"] = round(ingest(writer, "bench", data, singles, n, 1000), 1)
    log.info("%s: %.0f adds/s, %.0f rows/s batched", mode, result["adds_per_s"], result["rows_per_s_batched"])
    t = time.perf_counter()
    manifest = writer.snapshot_now("bench")
    result["snapshot_s"] = round(time.perf_counter() - t, 2)
    result["index_kind"] = manifest.index_kind
    info = writer.catalog.get("bench")
    reader_storage = open_storage(
        settings.model_copy(update={"cache_dir": settings.cache_dir and settings.cache_dir + "-reader"})
    )
    t = time.perf_counter()
    reader = LibraryReader(
        reader_storage.library(info), model_identity=MODEL["identity"], config=config, background_pickup=False
    )
    result["load_s"] = round(time.perf_counter() - t, 2)
    node = parse_filter({"field": "category", "op": "in", "value": ["cat00", "cat01"]})  # ~10%
    result["search_ms"] = {
        "unfiltered": percentiles(timed(lambda q: reader.search(q, K), queries)),
        "filtered_10pct": percentiles(timed(lambda q: reader.search(q, K, node), queries)),
    }
    uid = info.uid
    ryw = []
    for i in range(n, len(data)):
        t = time.perf_counter()
        writer.add_images(
            "bench", uid, [NewRecord(f"img{i}", f"s3://bench/{i}.jpg", data.vectors[i], tags={})]
        )
        hits = reader.search(data.vectors[i], 1)
        ryw.append((time.perf_counter() - t) * 1000)
        assert hits.row_ids.size and reader.records(hits.row_ids)[int(hits.row_ids[0])].image_id == f"img{i}"
    result["write_then_search_ms"] = percentiles(ryw)
    log.info("%s: %s", mode, result)
    reader.close()
    writer.close()
    reader_storage.close()
    return result


def cold_start(settings: StorageSettings, n: int, dim: int, work: Path, index_kind: str) -> dict[str, Any]:
    """A replica on a fresh node: empty cache_dir, the snapshot copied from the object store, first answer."""
    config = IndexConfig()
    data = Data(n, dim, seed=7)
    writer = LibraryWriter(open_storage(settings), config=config)
    writer.create_library("cold", "general_search", None, MODEL | {"dim": dim}, index_kind)
    t = time.perf_counter()
    ingest(writer, "cold", data, 0, n, 5000)
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    manifest = writer.snapshot_now("cold")
    snapshot_s = time.perf_counter() - t
    info = writer.catalog.get("cold")
    writer.close()
    fresh = work / "cache-fresh-node"
    storage = open_storage(settings.model_copy(update={"cache_dir": str(fresh)}))
    t = time.perf_counter()
    reader = LibraryReader(
        storage.library(info), model_identity=MODEL["identity"], config=config, background_pickup=False
    )
    reader.search(data.vectors[0], K)
    first_answer_s = time.perf_counter() - t
    copied = sum(p.stat().st_size for p in fresh.rglob("*") if p.is_file())
    reader.close()
    storage.close()
    return {
        "n": n,
        "index_kind": manifest.index_kind,
        "ingest_rows_per_s": round(n / ingest_s, 1),
        "snapshot_s": round(snapshot_s, 1),
        "first_answer_s": round(first_answer_s, 2),
        "copied_mb": round(copied / 1e6, 1),
        "copy_mb_per_s_upper_bound": round(copied / 1e6 / first_answer_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--singles", type=int, default=1000, help="one-record adds timed")
    p.add_argument("--cold-n", type=int, default=0, help="vectors of the cold-start library (0: skip)")
    p.add_argument("--cold-kind", default="auto", help="index_kind of the cold-start library")
    p.add_argument("--object-store", choices=("s3", "file"), default="s3")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bindir = find_bindir()
    if bindir is None:
        sys.exit("PostgreSQL's binaries are not installed (apt install postgresql)")
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    pg = PgServer(bindir, durable=True)
    result: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "object_store": args.object_store,
        "machine": f"{platform.machine()}, {platform.processor() or '?'}",
    }
    try:
        pg.start()
        data = Data(args.n + 200, args.dim, seed=1)
        queries = Data(args.queries, args.dim, seed=2).vectors
        with object_store(args.object_store, work) as store:
            result["embedded"] = measure_mode(
                "embedded", settings_for("embedded", work, None, store), data, queries, args.singles
            )
            result["cluster"] = measure_mode(
                "cluster", settings_for("cluster", work, pg, store), data, queries, args.singles
            )
            e, c = result["embedded"], result["cluster"]
            result["ratios_cluster_over_embedded"] = {
                "adds_per_s": round(c["adds_per_s"] / e["adds_per_s"], 2),
                "rows_per_s_batched": round(c["rows_per_s_batched"] / e["rows_per_s_batched"], 2),
                "search_p50_unfiltered": round(
                    c["search_ms"]["unfiltered"]["p50"] / e["search_ms"]["unfiltered"]["p50"], 2
                ),
                "search_p50_filtered": round(
                    c["search_ms"]["filtered_10pct"]["p50"] / e["search_ms"]["filtered_10pct"]["p50"], 2
                ),
                "write_then_search_p50": round(
                    c["write_then_search_ms"]["p50"] / e["write_then_search_ms"]["p50"], 2
                ),
            }
            if args.cold_n:
                cold_settings = settings_for("cluster", work, pg, store)
                result["cold_start"] = cold_start(cold_settings, args.cold_n, args.dim, work, args.cold_kind)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
