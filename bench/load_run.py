"""Load run: steady concurrency against a running service, bounded in time and requests.

    # start the service (offline demo model), then:
    python bench/load_run.py --base-url http://127.0.0.1:8000 --concurrency 8 --duration 180

A closed loop: ``--concurrency`` workers each send their next request as soon as the previous one is
answered, for ``--duration`` seconds or ``--max-requests`` requests, whichever comes first. The mix is
mostly searches (by image, by text, by id, with and without a tag filter) with some adds and gets, on a
library the run creates and fills first (``--images``) and deletes at the end. It reports, per operation
and overall: count, errors (anything but HTTP 200 with ``SUCCESS``, or no answer), p50/p90/p99/max
latency, and throughput; and writes the same as JSON under ``bench/results/``.

This is a measurement, not a test: it asserts nothing. The figures depend on the machine and what else
runs on it; say so when quoting them (``bench/README.md``).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

PREFIX = "/api/v1/operators/image-search"

#: operation -> share of the requests (the rest of the script's behaviour follows these names)
MIX = {
    "search_by_image": 0.35,
    "search_by_image_filtered": 0.10,
    "search_by_text": 0.20,
    "search_by_id": 0.10,
    "add": 0.15,
    "get": 0.10,
}
COLORS = ("red", "green", "blue", "white", "black")


def image_b64(seed: int, size: int = 96) -> str:
    """A deterministic PNG of smooth colour blobs (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(5):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, size / 2)
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - weight) + rng.uniform(0, 255, 3) * weight
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies[op].append(seconds)
            if error is not None:
                self.errors[op][error] += 1


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.base = args.base_url.rstrip("/") + PREFIX
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.library = f"loadrun_{os.getpid()}_{int(time.time())}"
        self.images = args.images
        self.queries = [image_b64(seed) for seed in range(min(args.images, 64))]
        self.next_id = itertools.count(args.images)
        self.results = Results()
        self.rng_seed = args.seed

    def call(self, session: requests.Session, path: str, body: dict[str, Any]) -> str | None:
        """POST ``body``; None when the answer is 200 SUCCESS, else a short description of the error."""
        try:
            r = session.post(self.base + path, json=body, headers=self.headers, timeout=60)
        except requests.RequestException as exc:
            return type(exc).__name__
        if r.status_code != 200:
            try:
                return f"{r.status_code} {r.json().get('status')}"
            except ValueError:
                return f"{r.status_code} (not JSON)"
        return None

    def setup(self) -> None:
        session = requests.Session()
        err = self.call(session, "/library/create", {"library_name": self.library, "mode": "general_search"})
        if err is not None:
            sys.exit(f"cannot create the library: {err}")
        for i in range(self.images):
            body = {
                "library_name": self.library,
                "image_id": f"img{i}",
                "image_uri": f"https://images.example/{i}.png",
                "image_base64": image_b64(i),
                "tags": {"color": COLORS[i % len(COLORS)], "price": i % 100, "new": i % 3 == 0},
            }
            err = self.call(session, "/image/add", body)
            if err is not None:
                sys.exit(f"cannot add image {i}: {err}")

    def request(self, op: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
        lib = self.library
        search = {"library_name": lib, "top_k": 10, "return_frame": False}
        if op == "search_by_image":
            return "/search/by-image", search | {"image_base64": rng.choice(self.queries)}
        if op == "search_by_image_filtered":
            flt = [
                {"field": "color", "op": "in", "value": rng.sample(COLORS, 2)},
                {
                    "or": [
                        {"field": "price", "op": "<", "value": 50},
                        {"field": "new", "op": "=", "value": True},
                    ]
                },
            ]
            return "/search/by-image", search | {"image_base64": rng.choice(self.queries), "tag_filter": flt}
        if op == "search_by_text":
            text = rng.choice(["a red shirt", "blue sky", "a cat on a sofa", "white sneakers", "手提包"])
            return "/search/by-text", search | {"query_text": text}
        if op == "search_by_id":
            return "/search/by-id", search | {"image_id": f"img{rng.randrange(self.images)}"}
        if op == "add":
            i = next(self.next_id)
            return "/image/add", {
                "library_name": lib,
                "image_id": f"img{i}",
                "image_uri": f"https://images.example/{i}.png",
                "image_base64": rng.choice(self.queries),
                "tags": {"color": rng.choice(COLORS), "price": i % 100},
                "save_image": False,
            }
        if op == "get":
            return "/image/get", {"library_name": lib, "image_id": f"img{rng.randrange(self.images)}"}
        raise ValueError(op)

    def worker(self, worker: int, stop_at: float, budget: itertools.count, max_requests: int) -> None:
        rng = random.Random(self.rng_seed * 1000 + worker)
        ops, weights = list(MIX), list(MIX.values())
        session = requests.Session()
        while time.monotonic() < stop_at and next(budget) < max_requests:
            op = rng.choices(ops, weights)[0]
            path, body = self.request(op, rng)
            started = time.perf_counter()
            err = self.call(session, path, body)
            self.results.add(op, time.perf_counter() - started, err)

    def run(self, concurrency: int, duration_s: float, max_requests: int) -> float:
        budget = itertools.count()
        stop_at = time.monotonic() + duration_s
        threads = [
            threading.Thread(target=self.worker, args=(w, stop_at, budget, max_requests))
            for w in range(concurrency)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - started

    def teardown(self) -> None:
        self.call(requests.Session(), "/library/delete", {"library_name": self.library})


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
    }


def machine() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg": [round(load1, 2), round(load5, 2), round(load15, 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of steady load (bound)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="requests in all (bound)")
    parser.add_argument("--images", type=int, default=500, help="images added before the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the library afterwards")
    args = parser.parse_args()

    runner = Runner(args)
    health = requests.get(args.base_url.rstrip("/") + "/health", timeout=30).json()["data"]
    before = machine()
    t0 = time.monotonic()
    runner.setup()
    setup_s = time.monotonic() - t0
    try:
        wall = runner.run(args.concurrency, args.duration, args.max_requests)
    finally:
        if not args.keep:
            runner.teardown()
    after = machine()

    res = runner.results
    every = [x for values in res.latencies.values() for x in values]
    errors = sum(sum(e.values()) for e in res.errors.values())
    report: dict[str, Any] = {
        "model": health.get("model"),
        "device": health.get("device"),
        "concurrency": args.concurrency,
        "images": args.images,
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall, 1),
        "requests": len(every),
        "errors": errors,
        "throughput_rps": round(len(every) / wall, 1),
        "overall": percentiles(every),
        "by_operation": {
            op: {"count": len(v), "errors": dict(res.errors.get(op, {}))} | percentiles(v)
            for op, v in sorted(res.latencies.items())
        },
        "machine_before": before,
        "machine_after": after,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"load_run_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))

    print(
        f"{report['requests']} requests in {report['wall_s']} s at concurrency {args.concurrency} "
        f"({report['throughput_rps']} req/s), errors: {errors}"
    )
    print(f"{'operation':28} {'count':>7} {'err':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    rows = [*report["by_operation"].items(), ("ALL", {"count": len(every), "errors": {}} | report["overall"])]
    for op, r in rows:
        n_err = errors if op == "ALL" else sum(r["errors"].values())
        print(
            f"{op:28} {r['count']:>7} {n_err:>5} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}"
        )
    if errors:
        print("errors:", json.dumps({op: dict(e) for op, e in res.errors.items()}))
    print(f"load average before {before['loadavg']}, after {after['loadavg']}; written to {path}")
    print(f"mean latency {statistics.fmean(every) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
