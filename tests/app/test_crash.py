"""Crash: kill -9 every process of the service during a concurrent import, start it again on the same
storage, and check that nothing acknowledged was lost, nothing is duplicated, and FAISS agrees with SQLite.

The service under test runs as its own process tree (``tests/app/launch.py``: a private local Ray
cluster, its own temp dir and port), so that killing it leaves the test session's cluster alone. Snapshots
are configured to be written every few rows, so the kill lands while the writer's background snapshots
are being written too. The restart runs on the test session's Ray cluster, on the same storage directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from ray import serve

from tests.app.conftest import PREFIX, ZERO_CPU, Client, app_args, deploy, free_port, wait_ready
from tests.images import image_b64

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
LIBRARY = "crash"
WRITERS = 6
MIN_ACKED_BEFORE_KILL = 40


class Service:
    """The service as a child process tree: start it, wait for it, kill -9 all of it."""

    def __init__(self, storage: Path, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # A short path: Ray puts unix sockets under it (108-byte limit on socket paths).
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        args_file = workdir / "args.json"
        args = app_args(str(storage), index={"snapshot_min_rows": 5, "snapshot_fraction": 0.0})
        args["deployment_options"]["LibraryIndex"]["num_replicas"] = 1
        args_file.write_text(json.dumps(args))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of our cluster
        env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
        self.log = (workdir / "service.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.app.launch", str(args_file), str(self.port), self.temp_dir],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )

    def wait_ready(self, deadline_s: float = 300.0) -> None:
        assert self.proc.stdout is not None
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:  # the launcher prints READY after serve.run returned
            line = self.proc.stdout.readline()
            if line.strip() == b"READY":
                return
            if not line and self.proc.poll() is not None:
                break
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"service did not start (exit {self.proc.poll()}):\n{tail}")

    def processes(self) -> list[psutil.Process]:
        """The launcher, its descendants, and any process naming our private temp dir (in case one was
        re-parented away from the tree)."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            found[root.pid] = root
            found.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in part for part in p.info["cmdline"] or ()):
                found[p.pid] = p
        return list(found.values())

    def kill(self) -> int:
        """SIGSTOP everything (so nothing can spawn more), collect again, SIGKILL each pid; returns how
        many processes were killed."""
        victims: dict[int, psutil.Process] = {}
        for _ in range(3):
            batch = [p for p in self.processes() if p.pid not in victims]
            if not batch:
                break
            for p in batch:
                victims[p.pid] = p
                _signal(p, signal.SIGSTOP)
        for p in victims.values():
            _signal(p, signal.SIGKILL)
        _, alive = psutil.wait_procs(list(victims.values()), timeout=30)
        assert not alive, f"still alive after SIGKILL: {alive}"
        self.proc.wait(timeout=30)
        return len(victims)

    def close(self) -> None:
        if self.proc.poll() is None or self.processes():
            self.kill()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.send_signal(sig)


class Importer:
    """WRITERS threads adding images through /image/add until the service goes away.

    Every fourth add repeats an earlier pair of the same thread with the same image and tags (an upsert),
    so a duplicate would show. Acknowledged (HTTP 200) pairs are recorded with their seed.
    """

    def __init__(self, base: str) -> None:
        self.base = base + PREFIX + "/image/add"
        self.acked: dict[tuple[str, str], int] = {}
        self.attempted: dict[tuple[str, str], int] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.threads = [threading.Thread(target=self.run, args=(w,), daemon=True) for w in range(WRITERS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def run(self, worker: int) -> None:
        session = requests.Session()
        mine: list[int] = []
        for n in itertools.count():
            i = mine[n // 4 % len(mine)] if n % 4 == 3 and mine else next(self.counter)
            pair = (f"img{i}", f"https://images.test/{i}.png")
            body = {"library_name": LIBRARY, "image_id": pair[0], "image_uri": pair[1]}
            body |= {"image_base64": image_b64(10_000 + i, size=(48, 48)), "tags": {"seed": i}}
            with self.lock:
                self.attempted[pair] = i
            try:
                r = session.post(self.base, json=body, timeout=60)
            except requests.RequestException as exc:  # the service was killed
                with self.lock:
                    self.errors.append(type(exc).__name__)
                return
            if r.status_code != 200:
                with self.lock:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")
                return
            with self.lock:
                self.acked[pair] = i
            if i not in mine:
                mine.append(i)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=120)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="crash-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_kill_9_during_import_loses_nothing_acknowledged(serve_port, workdir):
    storage = workdir / "storage"
    service = Service(storage, workdir)
    restarted = False
    try:
        service.wait_ready()
        Client(service.base).ok("/library/create", {"library_name": LIBRARY, "mode": "general_search"})
        library_dir = storage / "libraries" / LIBRARY
        importer = Importer(service.base)
        importer.start()
        # Kill once enough adds were acknowledged and the writer has published a snapshot (it keeps
        # writing new ones every few rows, so the kill may well land in the middle of one).
        end = time.monotonic() + 240
        while time.monotonic() < end:
            with importer.lock:
                acked, failed = len(importer.acked), list(importer.errors)
            assert not failed, failed
            if acked >= MIN_ACKED_BEFORE_KILL and (library_dir / "snapshots" / "CURRENT").exists():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"import too slow: {len(importer.acked)} acknowledged adds")
        killed = service.kill()
        importer.join()
        assert killed >= 5, killed  # launcher, GCS, raylet, workers...: the whole tree went
        assert len(importer.errors) == WRITERS, importer.errors  # every writer stopped at the kill
        acked = dict(importer.acked)
        print(f"\ncrash: killed {killed} processes after {len(acked)} acknowledged adds")

        # -- start again on the same storage (on the test session's cluster)
        deploy(
            str(storage),
            name="crash_restart",
            route_prefix="/crash_restart",
            deployment_options={
                k: ZERO_CPU for k in ("Ingress", "Encoder", "LibraryIndex", "Writer", "Importer")
            },
        )
        restarted = True
        base = f"http://127.0.0.1:{serve_port}/crash_restart"
        wait_ready(base)
        c = Client(base)
        present = check_every_acknowledged_add_is_there(c, acked, importer.attempted)
        check_faiss_agrees_with_sqlite(library_dir)
        print(
            f"crash: {len(acked)} acknowledged, {present} present after the restart, "
            f"{len(importer.attempted)} attempted"
        )
    finally:
        service.close()
        if restarted:
            serve.delete("crash_restart")


def check_every_acknowledged_add_is_there(
    c: Client, acked: dict[tuple[str, str], int], attempted: dict[tuple[str, str], int]
) -> int:
    """Returns how many pairs the library holds (the acknowledged ones, and any add that landed
    without its answer reaching the client)."""
    for (image_id, uri), seed in sorted(acked.items()):
        [record] = c.ok("/image/get", {"library_name": LIBRARY, "image_id": image_id})["images"]
        assert (record["image_uri"], record["tags"]) == (uri, {"seed": seed})
        hits = c.ok(
            "/search/by-image",
            {
                "library_name": LIBRARY,
                "image_base64": image_b64(10_000 + seed, size=(48, 48)),
                "top_k": 3,
                "return_frame": False,
            },
        )["results"]
        top = {h["image_id"]: h["score"] for h in hits}
        assert top.get(image_id, 0) >= 0.99, (image_id, hits)
    # everything in the library was at least attempted (an add in flight at the kill may have landed),
    # and a search over the whole library returns each pair once
    everything = c.ok(
        "/search/by-id",
        {"library_name": LIBRARY, "image_id": next(iter(acked))[0], "top_k": 1000, "return_frame": False},
    )["results"]
    pairs = [(h["image_id"], h["image_uri"]) for h in everything]
    assert len(pairs) == len(set(pairs)), "a record is duplicated"
    assert set(acked) <= set(pairs) <= set(attempted)
    assert c.get(f"/library/{LIBRARY}")[1]["data"]["image_count"] == len(pairs)
    return len(pairs)


def check_faiss_agrees_with_sqlite(library_dir: Path) -> None:
    from index.query.reader import LibraryReader
    from index.storage.embedded.catalog import Catalog
    from index.storage.embedded.snapshot import load_snapshot, snapshot_seq

    info = Catalog(library_dir.parents[1]).get(LIBRARY)
    with sqlite3.connect(f"file:{library_dir / 'records.sqlite'}?mode=ro", uri=True) as db:
        rows = {
            row_id: np.frombuffer(blob, dtype=np.float32)
            for row_id, blob in db.execute("SELECT row_id, vector FROM records WHERE deleted = 0")
        }
        last_seq = db.execute("SELECT last_seq FROM state").fetchone()[0]
    # the snapshot may lag SQLite, never lead it, and holds no row SQLite does not have
    assert 0 < snapshot_seq(library_dir) <= last_seq
    loaded = load_snapshot(library_dir, model_identity=info.model_identity, dim=info.dim)
    assert loaded is not None
    snap, _ = loaded
    assert set(snap.row_ids[snap.live].tolist()) <= set(rows)
    # what a replica loads (snapshot + replay) is exactly SQLite: same rows, same vectors, each once
    reader = LibraryReader(library_dir, model_identity=info.model_identity)
    try:
        assert reader.applied_seq == last_seq
        assert reader.live_count == len(rows)
        for row_id, vector in rows.items():
            got = reader.vector_of(row_id)
            assert got is not None and np.array_equal(got, vector), row_id
    finally:
        reader.close()
