"""Every acknowledged write survives a kill -9 of the writing process (SQLite WAL, synchronous=FULL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from index.query.reader import LibraryReader
from index.writer import LibraryWriter

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from index.storage.embedded.store import NewRecord
    from index.search.ann import IndexConfig
    from index.writer import LibraryWriter
    w = LibraryWriter(sys.argv[1], config=IndexConfig(snapshot_min_rows=50, snapshot_fraction=0.0))
    info = w.catalog.get("lib")
    i = 0
    while True:
        v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
        rec = NewRecord(f"id{i}", "u", v / np.linalg.norm(v), tags={"i": i}, frame=b"x%d" % i)
        w.add_images("lib", info.uid, [rec])
        print(i, flush=True)  # acknowledged only after the commit returned
        i += 1
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path):
    w = LibraryWriter(tmp_path)
    w.create_library(
        "lib", "general_search", None, {"model": "m", "pretrained": "p", "identity": "m/p", "dim": 8}
    )
    w.close()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    acked = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(acked) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 150, "writer did not get going"

    w2 = LibraryWriter(tmp_path)  # restart: finishes interrupted work, opens the same storage
    d = w2.catalog.library_dir("lib")
    reader = LibraryReader(d, model_identity="m/p")
    assert reader.live_count >= len(acked)
    for i in acked:
        [rec] = reader.get(f"id{i}", None)
        assert reader.read_frame(rec.frame) == b"x%d" % i
        v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
        assert reader.search(v / np.linalg.norm(v), 1).row_ids.tolist() == [rec.row_id]
    w2.close()
