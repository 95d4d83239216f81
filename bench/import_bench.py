"""Bulk import throughput through the running app, against the encoder's raw ceiling in the same run.

    python bench/import_bench.py --n 2000 --out import-tiny.json
    python bench/import_bench.py --n 300 --model ViT-B-32 --pretrained random --out import-b32.json

1. Raw ceiling: the embedder alone, in this process, on images already decoded and resized, at each
   batch size of ``--batch-sizes``; the best one is measured again after step 2. The Encoder deployment
   alone (pre-formed batches through its handle, two in flight) is measured too, just before and just
   after the import, in the same actor conditions as the import. The ceiling (``raw_images_per_s``) is
   the best of these four: the machine is shared, its load drifts, and a CPU model runs at different
   speeds in this process and in a Ray actor, so the conservative choice is the highest figure seen.
2. End to end: a local Ray Serve app (same model, device and torch thread count for the Encoder) imports
   a JSONL file of ``--n`` lines, each a distinct synthetic JPEG photo (``--width`` x ``--height``) inline
   as base64; the clock runs from ``POST /image/tasks/create`` to the first poll that sees the task
   finished (every second, as the CLI polls, and every 50 ms once the end is near).
   The importer's ``encode_batch_size`` is set to the best raw batch size.

``ratio = images_per_s / raw_images_per_s``. The end-to-end figure includes what the raw one does not:
JSON parsing, base64 and JPEG decoding, resizing, writing records and frames to SQLite, and the Ray
calls, all on the same machine as the encoder. Run it on an otherwise idle machine where possible; the
JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREFIX = "/api/v1/operators/image-search"


def photo(seed: int, width: int, height: int) -> bytes:
    """A distinct photo-like JPEG: smooth colour fields plus sensor-like noise (so it compresses like one)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    noisy = base + rng.normal(0, 12, size=base.shape)
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


class RawCeiling:
    """ClipEmbedder.encode_images alone, in this process, on images already decoded and resized."""

    def __init__(self, spec: Any, photos: list[bytes]) -> None:
        from index.model.embedder import ClipEmbedder
        from index.model.imaging import ImageLimits, decode_image, prepare_for_model

        self.embedder = ClipEmbedder.load(spec)
        self.embedder.warmup()
        self.pixels = np.stack(
            [prepare_for_model(decode_image(p, ImageLimits()), spec.preprocess) for p in photos[:64]]
        )

    def measure(self, batch_size: int, seconds: float) -> float:
        """Images per second at ``batch_size``, over at least ``seconds``."""
        batch = np.resize(self.pixels, (batch_size, *self.pixels.shape[1:]))
        self.embedder.encode_images(batch)  # warm this shape
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.embedder.encode_images(batch)
            n += batch_size
        rate = n / (time.perf_counter() - start)
        print(f"raw batch {batch_size}: {rate:.1f} images/s", flush=True)
        return rate


def poll_interval(task: dict[str, Any], n: int, elapsed: float) -> float:
    """Seconds until the next status poll: as a client polls (1 s), then 50 ms near the expected end.

    Each poll is an HTTP request through the proxy and the ingress, on the same cores as the import:
    polling every 50 ms throughout cost ~5 CPU-seconds of a 22-second ViT-B-32 import on 2 cores (an
    eighth of the machine), which slowed the import it measured. Progress moves a chunk at a time, so
    the end is predicted from the rate so far rather than waited for in the counters.
    """
    done = task["succeeded"] + task["failed"]
    if done == 0:
        return 1.0
    expected_total_s = elapsed * n / done
    return 0.05 if elapsed + 1.0 >= 0.9 * expected_total_s else 1.0


def encoder_alone(encoder: Any, pixels: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images per second of the Encoder deployment alone: pre-formed batches, two calls in flight."""
    batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
    encoder.embed_image_batch.remote(batch).result()
    n, start = 0, time.perf_counter()
    pending = [encoder.embed_image_batch.remote(batch) for _ in range(2)]
    while time.perf_counter() - start < seconds:
        pending.pop(0).result()
        n += batch_size
        pending.append(encoder.embed_image_batch.remote(batch))
    for r in pending:
        r.result()
        n += batch_size
    rate = n / (time.perf_counter() - start)
    print(f"encoder deployment alone, batch {batch_size}: {rate:.1f} images/s", flush=True)
    return rate


def end_to_end(
    args: argparse.Namespace, photos: list[bytes], best_batch: int, pixels: np.ndarray
) -> dict[str, Any]:
    import ray
    from ray import serve

    from deployments.app import build_app

    work = Path(tempfile.mkdtemp(prefix="import-bench-"))
    (work / "in").mkdir()
    source = work / "in" / "source.jsonl"
    with open(source, "w") as f:
        for i in range(args.n):
            b64 = base64.b64encode(photos[i % len(photos)]).decode()
            # a distinct id per line; images repeat only when n exceeds the generated set
            f.write(
                json.dumps({"image_id": f"img{i}", "image_uri": f"bench://{i}", "image_base64": b64}) + "\n"
            )
    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=4 * cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {
        "model": args.model,
        "pretrained": args.pretrained,
        "storage_root": str(work / "data"),
        "import_roots": [str(work / "in")],
        "imports": {"encode_batch_size": best_batch, "decode_threads": args.decode_threads},
        "deployment_options": {
            # the Encoder gets as many torch threads as the raw measurement had (Ray sets OMP threads
            # from num_cpus); the logical CPU count of ray.init leaves room for everything else
            "Encoder": {"ray_actor_options": {"num_cpus": cpus}},
            "Importer": {"ray_actor_options": {"num_cpus": 1}},
            "Ingress": {"ray_actor_options": {"num_cpus": 0.25}},
            "LibraryIndex": {"ray_actor_options": {"num_cpus": 0.25}},
            "Writer": {"ray_actor_options": {"num_cpus": 0.25}},
        },
    }
    try:
        serve.run(build_app(app_args), name="bench", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while requests.get(base + "/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("app not ready")
            time.sleep(0.5)
        encoder = serve.get_deployment_handle("Encoder", app_name="bench")
        alone_before = encoder_alone(encoder, pixels, best_batch, args.raw_seconds)
        s = requests.Session()
        r = s.post(
            base + PREFIX + "/library/create", json={"library_name": "bench", "mode": "general_search"}
        )
        assert r.status_code == 200, r.text
        start = time.perf_counter()
        r = s.post(
            base + PREFIX + "/image/tasks/create", json={"library_name": "bench", "source": str(source)}
        )
        assert r.status_code == 200, r.text
        task_id = r.json()["data"]["task_id"]
        polls = 0
        while True:
            d = s.get(base + PREFIX + f"/image/tasks/results/{task_id}", timeout=30).json()["data"]
            polls += 1
            if d["state"] not in ("PENDING", "RUNNING"):
                break
            time.sleep(poll_interval(d, args.n, time.perf_counter() - start))
        elapsed = time.perf_counter() - start
        count = s.get(base + PREFIX + "/library/bench").json()["data"]["image_count"]
        if d["state"] != "SUCCEEDED" or count != args.n:
            raise RuntimeError(f"import did not succeed: {d['state']} {d['error']} count={count}")
        alone_after = encoder_alone(encoder, pixels, best_batch, args.raw_seconds)
        return {
            "images_per_s": args.n / elapsed,
            "seconds": elapsed,
            "state": d["state"],
            "image_count": count,
            "encoder_alone": [alone_before, alone_after],
            "status_polls": polls,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="lines in the imported JSONL")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--distinct", type=int, default=500, help="distinct photos generated (reused beyond)")
    p.add_argument("--batch-sizes", default="8,16,32,64")
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--raw-seconds", type=float, default=3.0, help="time spent per raw batch size")
    args = p.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from index.model.spec import resolve_model_spec

    spec = resolve_model_spec(args.model, pretrained=args.pretrained, device=args.device)
    load_before = os.getloadavg()
    photos = [photo(i, args.width, args.height) for i in range(min(args.n, args.distinct))]
    raw = RawCeiling(spec, photos)
    per_batch = {int(b): raw.measure(int(b), args.raw_seconds) for b in args.batch_sizes.split(",")}
    best = max(per_batch, key=lambda b: per_batch[b])
    e2e = end_to_end(args, photos, best, raw.pixels)
    load_e2e = os.getloadavg()
    # The machine is shared and its load drifts: the ceiling is measured again after the import, and
    # the better of the two is the ceiling the import is compared with (the conservative choice).
    raw_after = raw.measure(best, args.raw_seconds)
    ceiling = max(per_batch[best], raw_after, *e2e["encoder_alone"])
    out = {
        "n": args.n,
        "model": args.model,
        "pretrained": args.pretrained,
        "device": raw.embedder.info["device"],
        "image": f"{args.width}x{args.height} JPEG, {np.mean([len(x) for x in photos]) / 1024:.0f} KiB mean",
        "raw_images_per_s": ceiling,
        "raw_best_batch": best,
        "raw_per_batch_before": per_batch,
        "raw_best_batch_after": raw_after,
        "encoder_deployment_alone_before_after": e2e["encoder_alone"],
        "images_per_s": e2e["images_per_s"],
        "seconds": e2e["seconds"],
        "status_polls": e2e["status_polls"],
        "ratio": e2e["images_per_s"] / ceiling,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after_import": load_e2e,
        "loadavg_after": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
