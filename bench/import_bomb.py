"""Import hardening figures: the import runner's peak RSS on a gzip bomb, and its CPU time on a gzip of
newlines. Plain Python (no Ray): the runner with the tiny model, a real writer and task store.

    python bench/import_bomb.py bomb --lines 64 --line-mib 32 --cap-gib 3
    python bench/import_bomb.py newlines --mib 4
    python bench/import_bomb.py bomb --settings '{"max_bytes_in_flight": 268435456}'
    python bench/import_bomb.py fetch --lines 64 --image-mib 18

``bomb``: a ``.gz`` source of ``--lines`` lines of ``--line-mib`` MiB each (a base64 field of ``A``s, so
each is a line error once parsed), about 1000:1. ``newlines``: a ``.gz`` of ``--mib`` MiB of ``\\n``.
``fetch``: a plain source of ``--lines`` ``image_uri`` lines naming ``--distinct`` images of
``--image-mib`` MiB each (a small PNG padded after its end, so it decodes fast) on a loopback http
server, imported with ``save_image: true``; it also reports the peak of the runner's budget, of the
image bytes really held (fetched and not yet written) and of the fetches in flight.
A sampler thread reads the process's RSS every 20 ms; over ``--cap-gib`` it stops the process (so a run
of the unbounded code cannot take the shared machine). Prints one JSON line: the task's end state and
error, the source's compressed and inflated sizes, the baseline and peak RSS, the task's wall and CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    """Peak RSS every 20 ms; exits the process (status 3) with a JSON line when it passes ``cap``."""

    def __init__(self, cap: int) -> None:
        super().__init__(daemon=True)
        self.cap = cap
        self.peak = 0
        self.running = True
        self.watch: Any = lambda: None  # also called every 20 ms (the runner's budget peak)

    def run(self) -> None:
        while self.running:
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            self.watch()
            if rss > self.cap:
                print(json.dumps({"stopped": f"RSS {rss / MiB:.0f} MiB passed the cap"}), flush=True)
                os._exit(3)
            time.sleep(0.02)


def write_bomb(path: Path, lines: int, line_bytes: int) -> int:
    head = b'{"image_id": "b%d", "image_uri": "https://example.com/b.png", "image_base64": "'
    with gzip.open(path, "wb", compresslevel=9) as f:
        for i in range(lines):
            start = head % i
            f.write(start)
            left = line_bytes - len(start) - 2
            block = b"A" * MiB
            while left > 0:
                f.write(block[: min(left, MiB)])
                left -= MiB
            f.write(b'"}\n')
    return lines * line_bytes


def padded_png(seed: int, size: int) -> bytes:
    """A 64x64 PNG followed by ``size`` bytes in all: decoders stop at its IEND, the fetch reads it all."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    head = buf.getvalue()
    return head + bytes(size - len(head))


class Fetches:
    """Image fetches in flight and image bytes held (fetched, not yet written), with their peaks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight = self.peak_inflight = self.held = self.peak_held = 0

    def install(self) -> None:
        from index.ingest.fetch import FetchPolicy

        fetch = FetchPolicy.fetch_image

        def counted(policy: Any, uri: str, **kw: Any) -> bytes:
            with self.lock:
                self.inflight += 1
                self.peak_inflight = max(self.peak_inflight, self.inflight)
            try:
                data = fetch(policy, uri, **kw)
            finally:
                with self.lock:
                    self.inflight -= 1
            with self.lock:
                self.held += len(data)
                self.peak_held = max(self.peak_held, self.held)
            return data

        FetchPolicy.fetch_image = counted  # type: ignore[method-assign,assignment]

    def written(self, n: int) -> None:
        with self.lock:
            self.held -= n


def serve_images(images: list[bytes], delay_s: float = 0.0) -> str:
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = images[int(self.path.rsplit("/", 1)[1].split(".")[0]) % len(images)]
            time.sleep(delay_s)  # a remote server's latency
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def write_newlines(path: Path, size: int) -> int:
    with gzip.open(path, "wb", compresslevel=9) as f:
        block = b"\n" * MiB
        for _ in range(size // MiB):
            f.write(block)
    return size


async def run(
    source: str,
    root: Path,
    settings: dict[str, Any],
    sampler: Sampler,
    fetches: Fetches | None = None,
) -> dict[str, Any]:
    from filters import TagLimits
    from index.ingest.fetch import FetchPolicy
    from index.ingest.importer import ImportRunner, ImportSettings
    from index.model.embedder import ClipEmbedder
    from index.model.imaging import ImageLimits
    from index.model.spec import resolve_model_spec
    from index.storage.embedded.catalog import Catalog
    from index.storage.embedded.store import NewRecord
    from index.storage.embedded.tasks import TaskStore
    from index.writer import LibraryWriter

    embedder = ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu"))
    writer = LibraryWriter(root / "root")
    writer.create_library("lib", "general_search", None, embedder.info)
    uid = Catalog(root / "root").get("lib").uid
    tasks = TaskStore(root / "root")

    async def encode(batch: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(embedder.encode_images, batch)

    async def write(name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        out = await asyncio.to_thread(writer.add_images, name, uid, records)
        if fetches is not None:
            fetches.written(sum(len(r.frame or b"") for r in records))
        return out

    runner = ImportRunner(
        tasks=tasks,
        catalog=Catalog(root / "root"),
        encode=encode,
        write=write,
        preprocess=embedder.spec.preprocess,
        settings=ImportSettings(**settings),
        image_limits=ImageLimits(),
        tag_limits=TagLimits(),
        policy=FetchPolicy(import_roots=(str(Path(source).parent),), allowed_networks=("127.0.0.0/8",)),
    )
    budget_peak = [0]
    sampler.watch = lambda: budget_peak.__setitem__(0, max(budget_peak[0], runner._budget.used))
    baseline = rss_bytes()
    sampler.peak = baseline
    await runner.start()
    wall, cpu = time.monotonic(), time.process_time()
    try:
        task = await runner.create("lib", uid, source, fetches is not None)
        while True:
            d = await runner.describe(task.task_id)
            if d["state"] not in ("PENDING", "RUNNING"):
                break
            await asyncio.sleep(0.02)
    finally:
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        await runner.close()
        writer.close()
        tasks.close()
    extra: dict[str, Any] = {"budget_peak_mib": round(budget_peak[0] / MiB, 1)}
    if fetches is not None:
        extra |= {
            "images_held_peak_mib": round(fetches.peak_held / MiB, 1),
            "fetches_in_flight_peak": fetches.peak_inflight,
        }
    return extra | {
        "state": d["state"],
        "succeeded": d["succeeded"],
        "error": d["error"],
        "failed": d["failed"],
        "first_errors": [e["reason"][:80] for e in d["errors"][:2]],
        "baseline_rss_mib": round(baseline / MiB),
        "peak_rss_mib": round(sampler.peak / MiB),
        "task_wall_s": round(wall, 2),
        "task_cpu_s": round(cpu, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["bomb", "newlines", "fetch"])
    p.add_argument("--lines", type=int, default=64, help="bomb: lines")
    p.add_argument("--line-mib", type=int, default=32, help="bomb: MiB per line")
    p.add_argument("--mib", type=int, default=4, help="newlines: MiB of newlines")
    p.add_argument("--image-mib", type=float, default=18, help="fetch: MiB per image")
    p.add_argument("--distinct", type=int, default=4, help="fetch: distinct images")
    p.add_argument("--delay-ms", type=float, default=0, help="fetch: the server's latency per image")
    p.add_argument("--cap-gib", type=float, default=3.0, help="stop the process past this RSS")
    p.add_argument("--settings", default="{}", help="ImportSettings overrides (JSON)")
    args = p.parse_args()
    sampler = Sampler(int(args.cap_gib * 1024 * MiB))
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        source = root / "in" / "src.jsonl.gz"
        fetches = None
        if args.kind == "bomb":
            inflated = write_bomb(source, args.lines, args.line_mib * MiB)
        elif args.kind == "newlines":
            inflated = write_newlines(source, args.mib * MiB)
        else:
            size = int(args.image_mib * MiB)
            base = serve_images([padded_png(k, size) for k in range(args.distinct)], args.delay_ms / 1000)
            source = root / "in" / "src.jsonl"
            lines = [{"image_id": f"i{i}", "image_uri": f"{base}/{i}.png"} for i in range(args.lines)]
            source.write_text("".join(json.dumps(x) + "\n" for x in lines))
            inflated = source.stat().st_size
            fetches = Fetches()
            fetches.install()
        out = {"kind": args.kind, "gzip_bytes": source.stat().st_size, "inflated_bytes": inflated}
        out |= {"settings": json.loads(args.settings)}
        out |= asyncio.run(run(str(source), root, json.loads(args.settings), sampler, fetches))
    sampler.running = False
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
