"""End-to-end serving benchmark: the model's ceiling, the Serve app, and a naive server, in one run.

    python bench/serving_bench.py --model ViT-B-32 --out serving.json

With the same model (random weights by default: the compute is the same as trained ones) and the same
real JPEGs of mixed sizes (photos from scikit-image, resized and re-encoded), it measures:

* ``raw_images_per_s``: the model alone in a tight in-process loop, at its best batch size (the ceiling);
  measured before the servers start, again just before each served level (``raw_images_per_s_just_before``:
  the machine's background load drifts) and after the servers stop; the highest is the ceiling.
* ``served``: ``POST /search/by-image`` through Serve's HTTP proxy on the full app (ingress decode and
  resize, batched encoder, library index) at each concurrency: ``images_per_s``, ``p50_ms``, ``p99_ms``,
  ``errors`` and the encoder's mean forward-pass batch size.
* ``naive``: the same requests against ``bench/naive_server.py`` (one uvicorn process, the model called
  per request, same model wrapper and image preparation). ``--naive-modes sync,async`` measures both of
  its modes and counts the better one at c=32; the default is ``sync`` (a ``def`` route): the ``async
  def`` route blocks its event loop on the model, and in the run that measured both (bench/README.md) it
  was far slower at c=1, 8 and 64 and level with ``sync`` at c=32.
* ``served_text_per_s``: ``POST /search/by-text`` at concurrency 32.

Each level also records where the machine's CPU went (``cpu_ms_per_request`` by process role: encoder,
ingress, library_index, proxy, serve_controller, naive_server, load_generator, other Ray processes) and
how busy the machine was (``machine_cpu_busy``, 1.0 = every core all the time): on a CPU the model and
everything around it share the same cores, and this says what the served path costs beside the model.

Served and naive levels alternate (served c=1, naive c=1, served c=8, ...) so that a change in the
machine's background load hits both alike. Closed loop: each of ``c`` clients sends its next request
when the previous one is answered. Nothing here is a test; the figures go to ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, not an installed copy

PREFIX = "/api/v1/operators/image-search"
LIBRARY = "bench"
TEXTS = [
    "a photo of a cat",
    "an astronaut in a white suit",
    "a cup of coffee on a table",
    "a rocket on the launch pad",
    "ein rotes Auto im Schnee",
    "une tasse de café",
    "two dogs playing on the beach at sunset",
    "close-up of a tabby cat's face",
]
# (width, height): phone photos, web images, screenshots, portrait and landscape.
SIZES = [
    (320, 240),
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1600, 1200),
    (1920, 1080),
    (480, 640),
    (1080, 1350),
]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` real JPEGs of mixed sizes: scikit-image's photos, resized, quality 85-95."""
    import skimage.data
    from PIL import Image

    photos = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        skimage.data.cat(),
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        img = Image.fromarray(photos[i % len(photos)]).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


# -- the ceiling --------------------------------------------------------------------------------------


class RawLoop:
    """The model alone, in this process, on inputs already prepared: the ceiling of any server."""

    def __init__(self, spec: Any, pixels: list[np.ndarray]) -> None:
        from index.model.embedder import ClipEmbedder

        self.embedder = ClipEmbedder.load(spec)
        self.embedder.warmup()
        self.pixels = pixels

    def rate(self, batch_size: int, min_s: float) -> float:
        """Images/s of ``encode_images`` in a tight loop at ``batch_size``, for at least ``min_s``."""
        batch = np.stack([self.pixels[i % len(self.pixels)] for i in range(batch_size)])
        self.embedder.encode_images(batch)  # warm this shape
        done, start = 0, time.perf_counter()
        while True:
            self.embedder.encode_images(batch)
            done += batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= min_s and done >= 2 * batch_size:
                return done / elapsed


# -- load generation ----------------------------------------------------------------------------------


def closed_loop(url: str, bodies: list[bytes], concurrency: int, n_requests: int) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when answered; ``n_requests`` in all."""
    import requests

    def one(session: requests.Session, body: bytes) -> tuple[bool, float]:
        start = time.perf_counter()
        try:
            r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=300)
            ok = r.status_code == 200 and r.json().get("status") == "SUCCESS"
        except requests.RequestException:
            ok = False
        return ok, time.perf_counter() - start

    # warm-up round (connections, first batches), not measured
    sessions = [requests.Session() for _ in range(concurrency)]
    warm = [threading.Thread(target=one, args=(s, bodies[i % len(bodies)])) for i, s in enumerate(sessions)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()

    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client(session: requests.Session) -> None:
        nonlocal errors
        while (i := next(counter)) < n_requests:
            ok, seconds = one(session, bodies[i % len(bodies)])
            with lock:
                if ok:
                    latencies.append(seconds)
                else:
                    errors += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in sessions]
    cpu_before = cpu_snapshot()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = cpu_split(cpu_before, cpu_snapshot(), n_requests, wall)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "images_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": errors,
        "wall_s": round(wall, 2),
        **cpu,
    }


# Processes by role, from their command lines (Ray names replica processes after their deployment).
ROLES = (
    ("Encoder", "encoder"),
    ("Ingress", "ingress"),
    ("LibraryIndex", "library_index"),
    ("ProxyActor", "proxy"),
    ("ServeController", "serve_controller"),
    ("naive_server.py", "naive_server"),
    ("serving_bench.py", "load_generator"),
)


def cpu_snapshot() -> dict[str, Any]:
    """CPU seconds used so far by each process on the machine, and by the machine as a whole."""
    import psutil

    procs: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            times = proc.cpu_times()
            procs[proc.pid] = (" ".join(proc.info["cmdline"] or []), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    machine = psutil.cpu_times()
    return {"procs": procs, "busy_s": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)}


def cpu_split(before: dict[str, Any], after: dict[str, Any], requests: int, wall: float) -> dict[str, Any]:
    """Where the CPU went during a level: milliseconds per request by role, and how busy the machine was.

    Roles not named in ``ROLES`` (Ray's GCS, raylet, dashboard, other replicas) are summed as ``other``;
    ``unattributed`` is machine time no process still alive at the end accounts for (e.g. the kernel).
    """
    per_role: dict[str, float] = {}
    for pid, (cmdline, used) in after["procs"].items():
        if pid not in before["procs"]:
            continue
        delta = used - before["procs"][pid][1]
        role = next((r for key, r in ROLES if key in cmdline), "other")
        per_role[role] = per_role.get(role, 0.0) + delta
    busy = after["busy_s"] - before["busy_s"]
    per_role["unattributed"] = max(busy - sum(per_role.values()), 0.0)
    return {
        "cpu_ms_per_request": {r: round(v / requests * 1000, 1) for r, v in sorted(per_role.items())},
        "machine_cpu_busy": round(busy / (wall * (os.cpu_count() or 1)), 3),
    }


# -- the two servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import requests

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {deadline_s}s")


def start_naive(
    args: argparse.Namespace, library_dir: Path, mode: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        str(REPO / "bench" / "naive_server.py"),
        f"--model={args.model}",
        f"--pretrained={args.pretrained}",
        f"--device={args.device}",
        f"--threads={args.threads}",
        f"--port={port}",
        f"--library={library_dir}",
        f"--mode={mode}",
    ]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", 600, proc)
    return proc, base


def start_served(
    args: argparse.Namespace, storage: Path, jpegs: list[bytes], gpu: bool, batch: int
) -> tuple[str, Callable[[], dict[str, Any]]]:
    """Start Ray + the Serve app (this checkout), fill the library; return the base URL and a stats getter."""
    import ray
    import requests
    from ray import serve

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=args.threads,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(REPO),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.http:proxy_middlewares",
            }
        },
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    zero_cpu = {"ray_actor_options": {"num_cpus": 0}}
    app_args = {
        "model": args.model,
        "pretrained": args.pretrained,
        "device": args.device,
        "storage_root": str(storage),
        # the Ingress's calls to the Encoder carry up to one forward pass of items (serve_config.yaml)
        "encode_batching": {"max_batch_size": batch},
        "deployment_options": {
            # Big enough queues that nothing is shed below the highest concurrency measured.
            "Ingress": {**zero_cpu, "max_ongoing_requests": 256},
            "Encoder": {
                # The encoder gets the cores the raw loop and the naive server use (OMP threads follow).
                "ray_actor_options": {"num_cpus": args.threads, "num_gpus": 1 if gpu else 0},
                "max_ongoing_requests": 256,
                "user_config": {
                    "max_batch_size": batch,
                    "max_concurrent_batches": args.max_concurrent_batches or (2 if gpu else 1),
                },
            },
            "LibraryIndex": {**zero_cpu, "max_ongoing_requests": 256},
            "Writer": zero_cpu,
            "Importer": zero_cpu,
        },
    }
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", 600)
    session = requests.Session()
    session.post(
        base + PREFIX + "/library/create", json={"library_name": LIBRARY, "mode": "general_search"}
    ).raise_for_status()
    for i, data in enumerate(jpegs):
        r = session.post(
            base + PREFIX + "/image/add",
            json={
                "library_name": LIBRARY,
                "image_id": f"img{i:03d}",
                "image_uri": f"bench://img{i:03d}.jpg",
                "image_base64": base64.b64encode(data).decode(),
                "save_image": False,
            },
        )
        r.raise_for_status()
    handle = serve.get_deployment_handle("Encoder", app_name="bench")
    return base, lambda: handle.info.remote().result()


def stop_served() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# -- the run ------------------------------------------------------------------------------------------


def machine_info(gpu: bool) -> dict[str, Any]:
    import open_clip
    import ray
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "ray": ray.__version__,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description="Serving benchmark (see the module docstring).")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random", help="'random' (default) or a tag/file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for the model, everywhere"
    )
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=48)
    parser.add_argument("--images", type=int, default=36, help="distinct JPEGs (library and queries)")
    parser.add_argument("--raw-batches", default="", help="batch sizes for the ceiling (default: by device)")
    parser.add_argument("--raw-min-s", type=float, default=3.0)
    parser.add_argument(
        "--served-max-batch-size",
        type=int,
        default=0,
        help="the served Encoder's max_batch_size; 0: the shipped values, 32 on CPU (EncoderConfig's"
        " default) and 64 on GPU (serve_config.yaml). Not the raw loop's best batch: on a CPU the rates"
        " of batches 8-64 lie within the noise, and a small best batch would starve the merging batcher",
    )
    parser.add_argument("--max-concurrent-batches", type=int, default=0, help="0: 1 on CPU, 2 on GPU")
    parser.add_argument(
        "--naive-modes",
        default="sync",
        help="naive_server.py modes to measure, e.g. 'sync,async'; the best at c=32 counts",
    )
    parser.add_argument("--text-requests", type=int, default=256)
    args = parser.parse_args()
    # Stopping the run (Ctrl-C, or kill from another shell: a background job ignores SIGINT) must still
    # stop the naive servers and Ray: turn both signals into exceptions that reach the finally below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    from index.model.imaging import ImageLimits, decode_image, prepare_for_model
    from index.model.spec import resolve_model_spec

    torch.set_num_threads(args.threads)
    spec = resolve_model_spec(args.model, pretrained=args.pretrained, device=args.device)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    levels = [int(c) for c in args.concurrency.split(",")]
    raw_batches = [int(b) for b in args.raw_batches.split(",") if b] or (
        [1, 8, 32, 64, 128, 256] if gpu else [1, 8, 16, 32, 64]
    )
    result: dict[str, Any] = {
        "model": spec.identity,
        "device": "cuda" if gpu else "cpu",
        "threads": args.threads,
        "machine": machine_info(gpu),
        "loadavg": {"start": os.getloadavg()},
    }

    jpegs = make_jpegs(args.images)
    result["images"] = {
        "count": len(jpegs),
        "sizes": sorted({f"{w}x{h}" for w, h in SIZES[: len(jpegs)]}),
        "mean_jpeg_kib": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
    }
    hint = max(spec.preprocess.size)
    pixels = [
        prepare_for_model(decode_image(j, ImageLimits(), min_side_hint=hint), spec.preprocess) for j in jpegs
    ]
    image_bodies = [
        json.dumps(
            {
                "library_name": LIBRARY,
                "image_base64": base64.b64encode(j).decode(),
                "top_k": 10,
                "return_frame": False,
            }
        ).encode()
        for j in jpegs
    ]
    text_bodies = [
        json.dumps({"library_name": LIBRARY, "query_text": t, "top_k": 10, "return_frame": False}).encode()
        for t in TEXTS
    ]

    print(f"ceiling: {spec.identity} on {result['device']}, {args.threads} threads", flush=True)
    raw_loop = RawLoop(spec, pixels)
    raw: dict[int, float] = {}
    for b in raw_batches:
        raw[b] = raw_loop.rate(b, args.raw_min_s)
        print(f"  raw batch {b:4d}: {raw[b]:8.1f} images/s", flush=True)
    best_batch = max(raw, key=lambda b: raw[b])
    # Re-measured beside every served level (the machine's load drifts); the highest is the ceiling.
    raw_checks = [raw[best_batch]]
    result["raw_by_batch"] = {str(b): round(r, 2) for b, r in raw.items()}
    result["raw_best_batch"] = best_batch
    result["loadavg"]["after_raw"] = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    naive_procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        library_dir = work / "library"
        library_dir.mkdir()
        for i, data in enumerate(jpegs):
            (library_dir / f"img{i:03d}.jpg").write_bytes(data)
        modes = [m for m in args.naive_modes.split(",") if m]
        naive_urls = {}
        for mode in modes:
            print(f"starting naive server ({mode})", flush=True)
            naive_procs[mode], base = start_naive(args, library_dir, mode)
            naive_urls[mode] = base + PREFIX + "/search/by-image"
        served_batch = args.served_max_batch_size or (64 if gpu else 32)
        result["served_max_batch_size"] = served_batch
        print(f"starting the Serve app (encoder max_batch_size {served_batch})", flush=True)
        served_base, encoder_info = start_served(args, work / "storage", jpegs, gpu, served_batch)
        result["encoder"] = {k: v for k, v in encoder_info().items() if k not in ("stats", "pid")}

        served: dict[str, Any] = {}
        naive: dict[str, dict[str, Any]] = {m: {} for m in modes}
        for c in levels:
            n = max(args.min_requests, args.requests_per_client * c)
            raw_now = raw_loop.rate(best_batch, args.raw_min_s)
            raw_checks.append(raw_now)
            before = encoder_info()["stats"]["image"]
            level = closed_loop(served_base + PREFIX + "/search/by-image", image_bodies, c, n)
            after = encoder_info()["stats"]["image"]
            passes = after["batches"] - before["batches"]
            level["mean_batch_size"] = (
                round((after["items"] - before["items"]) / passes, 2) if passes else None
            )
            level["raw_images_per_s_just_before"] = round(raw_now, 2)
            level["loadavg_1m"] = os.getloadavg()[0]
            served[str(c)] = level
            print(f"  served c={c:3d}: {level}", flush=True)
            for mode in modes:
                naive[mode][str(c)] = closed_loop(naive_urls[mode], image_bodies, c, n)
                print(f"  naive-{mode} c={c:3d}: {naive[mode][str(c)]}", flush=True)
        text = closed_loop(served_base + PREFIX + "/search/by-text", text_bodies, 32, args.text_requests)
        text["texts_per_s"] = text.pop("images_per_s")
        print(f"  served text c=32: {text}", flush=True)
        result["loadavg"]["after_load"] = os.getloadavg()
    finally:
        for proc in naive_procs.values():
            proc.terminate()
            proc.wait(timeout=60)
        stop_served()
        shutil.rmtree(work, ignore_errors=True)

    print("ceiling again, servers stopped", flush=True)
    raw_after = raw_loop.rate(best_batch, args.raw_min_s)
    raw_checks.append(raw_after)
    ceiling = max(raw_checks)
    ref = str(32 if 32 in levels else levels[-1])
    best_mode = max(naive, key=lambda m: naive[m][ref]["images_per_s"]) if naive else None
    result.update(
        raw_images_per_s=round(ceiling, 2),
        raw_images_per_s_checks=[round(r, 2) for r in raw_checks],
        served=served,
        naive=naive[best_mode] if best_mode else {},
        naive_mode=best_mode,
        naive_by_mode=naive,
        served_text=text,
        served_text_per_s=text["texts_per_s"],
    )
    result["loadavg"]["end"] = os.getloadavg()
    s_ref = served[ref]["images_per_s"]
    result["ratios"] = {
        f"served_c{ref}_over_raw": round(s_ref / ceiling, 3),
        f"served_c{ref}_over_raw_just_before": round(s_ref / served[ref]["raw_images_per_s_just_before"], 3),
        f"served_c{ref}_over_naive_c{ref}": round(s_ref / naive[best_mode][ref]["images_per_s"], 3)
        if best_mode
        else None,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("raw_images_per_s", "ratios", "served_text_per_s")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
