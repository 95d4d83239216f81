"""Import hardening figures: the import runner's peak RSS on a gzip bomb, and its CPU time on a gzip of
newlines. Plain Python (no Ray): the runner with the tiny model, a real writer and task store.

    python bench/import_bomb.py bomb --lines 64 --line-mib 32 --cap-gib 3
    python bench/import_bomb.py newlines --mib 4
    python bench/import_bomb.py bomb --settings '{"max_bytes_in_flight": 268435456}'

``bomb``: a ``.gz`` source of ``--lines`` lines of ``--line-mib`` MiB each (a base64 field of ``A``s, so
each is a line error once parsed), about 1000:1. ``newlines``: a ``.gz`` of ``--mib`` MiB of ``\\n``.
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

    def run(self) -> None:
        while self.running:
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
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


def write_newlines(path: Path, size: int) -> int:
    with gzip.open(path, "wb", compresslevel=9) as f:
        block = b"\n" * MiB
        for _ in range(size // MiB):
            f.write(block)
    return size


async def run(source: str, root: Path, settings: dict[str, Any], sampler: Sampler) -> dict[str, Any]:
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
        return await asyncio.to_thread(writer.add_images, name, uid, records)

    runner = ImportRunner(
        tasks=tasks,
        catalog=Catalog(root / "root"),
        encode=encode,
        write=write,
        preprocess=embedder.spec.preprocess,
        settings=ImportSettings(**settings),
        image_limits=ImageLimits(),
        tag_limits=TagLimits(),
        policy=FetchPolicy(import_roots=(str(Path(source).parent),)),
    )
    baseline = rss_bytes()
    sampler.peak = baseline
    await runner.start()
    wall, cpu = time.monotonic(), time.process_time()
    try:
        task = await runner.create("lib", uid, source, False)
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
    return {
        "state": d["state"],
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
    p.add_argument("kind", choices=["bomb", "newlines"])
    p.add_argument("--lines", type=int, default=64, help="bomb: lines")
    p.add_argument("--line-mib", type=int, default=32, help="bomb: MiB per line")
    p.add_argument("--mib", type=int, default=4, help="newlines: MiB of newlines")
    p.add_argument("--cap-gib", type=float, default=3.0, help="stop the process past this RSS")
    p.add_argument("--settings", default="{}", help="ImportSettings overrides (JSON)")
    args = p.parse_args()
    sampler = Sampler(int(args.cap_gib * 1024 * MiB))
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        source = root / "in" / "src.jsonl.gz"
        if args.kind == "bomb":
            inflated = write_bomb(source, args.lines, args.line_mib * MiB)
        else:
            inflated = write_newlines(source, args.mib * MiB)
        out = {"kind": args.kind, "gzip_bytes": source.stat().st_size, "inflated_bytes": inflated}
        out |= {"settings": json.loads(args.settings)}
        out |= asyncio.run(run(str(source), root, json.loads(args.settings), sampler))
    sampler.running = False
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
