"""The shard fan-out through the running service: a 1-shard and an S-shard library of the same rows,
searched over HTTP side by side, query by query.

    python bench/fanout_bench.py --n 50000 --shards 4 --out bench/results/fanout_serve.json

``bench/index_bench.py --shards`` measures the fan-out inside one process (shard after shard, no Serve);
this measures what a client of the service sees: the ingress's concurrent calls to LibraryIndex replicas
(one per shard here: ``num_replicas`` = S), each a Ray actor call with its (de)serialisation, then the
merge. Everything runs on this machine, so the Ray calls cross loopback, not a network: the figure is a
lower bound of a cluster's hop.

The libraries are written directly through ``LibraryWriter`` (shipped distribution, as index_bench)
with the tiny random model's identity and dimension, their snapshots built, then the app is deployed on
that storage (``model=tiny-random``, embedded mode) in a private Ray instance. Queries: ``/search/by-text``
(the same text each time: the Encoder's share is the same for both libraries) and ``/search/by-id``
(no Encoder; a sharded library first reads the vector from the id's shard: one call more), unfiltered
and with a 10% tag filter, top 10, one client, the two libraries alternating query by query.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index_bench import Data, ingest
from index.model.spec import resolve_model_spec
from index.writer import LibraryWriter

log = logging.getLogger("fanout_bench")
PREFIX = "/api/v1/operators/image-search"
ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}


def write_libraries(root: Path, n: int, shards: int) -> dict[str, int]:
    """``{library name: shards}``: the same ``n`` rows as a 1-shard and a ``shards``-shard library."""
    spec = resolve_model_spec("tiny-random")
    model = {"model": "tiny-random", "pretrained": "random", "identity": spec.identity, "dim": spec.dim}
    data = Data(n, spec.dim, seed=1, data="shipped")
    writer = LibraryWriter(root)
    libraries = {"one": 1, f"s{shards}": shards}
    for name, count in libraries.items():
        writer.create_library(name, "general_search", None, model, index_kind="auto", shards=count)
        ingest(writer, name, data, 0, n)
        writer.snapshot_all(name)
        log.info("library %s: %d rows in %d shard(s)", name, n, count)
    writer.close()
    return libraries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray
    from ray import serve

    from deployments.app import build_app

    work = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    libraries = write_libraries(work / "store", args.n, args.shards)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {d: ZERO_CPU for d in ("Ingress", "Encoder", "Writer", "Importer")}
        options["LibraryIndex"] = {**ZERO_CPU, "num_replicas": args.shards}  # a replica per shard
        serve.run(
            build_app(
                {"model": "tiny-random", "storage_root": str(work / "store"), "deployment_options": options}
            ),
            name="fanout",
            route_prefix="/",
        )
        base = f"http://127.0.0.1:{port}{PREFIX}"
        session = requests.Session()
        rng = np.random.default_rng(3)
        tenth = {"field": "category", "op": "in", "value": ["cat03", "cat11"]}  # index_bench's 10% case

        def body(route: str, lib: str, i: int, tag_filter: Any) -> dict[str, Any]:
            b: dict[str, Any] = {"library_name": lib, "top_k": 10}
            b |= {"query_text": "a photo"} if route == "by-text" else {"image_id": f"img{i}"}
            return b | ({"tag_filter": tag_filter} if tag_filter else {})

        def call(route: str, b: dict[str, Any]) -> float:
            t = time.perf_counter()
            r = session.post(f"{base}/search/{route}", json=b, timeout=60)
            ms = (time.perf_counter() - t) * 1000
            assert r.status_code == 200, r.text[:300]
            return ms

        result: dict[str, Any] = {"n": args.n, "shards": args.shards, "queries": args.queries, "cases": []}
        for route in ("by-text", "by-id"):
            for label, tag_filter in (("unfiltered", None), ("filter 0.1", tenth)):
                ids = rng.integers(0, args.n, args.queries)
                for lib in libraries:  # warm: every shard loaded by its replica
                    for i in ids[:20]:
                        call(route, body(route, lib, int(i), tag_filter))
                times: dict[str, list[float]] = {lib: [] for lib in libraries}
                for j, i in enumerate(ids):
                    order = list(libraries) if j % 2 == 0 else list(libraries)[::-1]
                    for lib in order:
                        times[lib].append(call(route, body(route, lib, int(i), tag_filter)))
                p50 = {lib: float(np.percentile(t, 50)) for lib, t in times.items()}
                p99 = {lib: float(np.percentile(t, 99)) for lib, t in times.items()}
                one, many = list(libraries)
                case = {
                    "route": route,
                    "case": label,
                    "p50_ms_1": round(p50[one], 3),
                    f"p50_ms_{args.shards}": round(p50[many], 3),
                    "p99_ms_1": round(p99[one], 3),
                    f"p99_ms_{args.shards}": round(p99[many], 3),
                    "serve_fanout_ratio": round(p50[many] / p50[one], 3),
                    "serve_fanout_added_ms": round(p50[many] - p50[one], 3),
                }
                log.info("%s", case)
                result["cases"].append(case)
        result["machine"] = {"cpus": os.cpu_count(), "load_avg_at_end": list(os.getloadavg())}
        args.out.write_text(json.dumps(result, indent=1))
        log.info("wrote %s", args.out)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
