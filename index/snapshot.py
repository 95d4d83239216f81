"""Snapshots: the rebuildable cache that lets a replica load a library without replaying all of SQLite.

A snapshot is a directory ``snapshots/<applied_seq>-<uid>/`` holding the live vectors, row ids,
vector kinds and tag columns as of ``applied_seq``, plus ``manifest.json`` written last. The file
``snapshots/CURRENT`` names the newest complete snapshot and is replaced atomically (temp name, fsync,
``os.replace``). A reader loads CURRENT's snapshot and replays rows with ``seq > applied_seq`` from
SQLite; after a crash the snapshot may lag SQLite, never lead it, because it is only ever built from
committed rows. Anything unreadable or made by another model/format is ignored (and rebuilt).

The tag columns are pickled: the snapshot is a private cache under the service's own storage root,
rebuilt whenever its format version changes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.table import VectorTable

logger = logging.getLogger(__name__)

FORMAT = 1
SNAPSHOT_DIR = "snapshots"
KEEP = 2  # snapshots kept: the current one and the one a slow reader may still be loading


@dataclass(frozen=True)
class Manifest:
    format: int
    applied_seq: int
    model_identity: str
    dim: int
    index_kind: str
    count: int


def write_snapshot(library_dir: Path, table: VectorTable, *, model_identity: str) -> Manifest:
    """Write ``table``'s live rows as the library's newest snapshot and point CURRENT at it."""
    root = library_dir / SNAPSHOT_DIR
    root.mkdir(exist_ok=True)
    vectors, row_ids, kinds, tags = table.live_arrays()
    manifest = Manifest(FORMAT, table.applied_seq, model_identity, table.dim, "flat", len(row_ids))
    name = f"{table.applied_seq:012d}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    _save(tmp / "vectors.npy", lambda f: np.save(f, vectors))
    _save(tmp / "row_ids.npy", lambda f: np.save(f, row_ids))
    _save(tmp / "kinds.npy", lambda f: np.save(f, kinds))
    _save(tmp / "tags.pkl", lambda f: pickle.dump(tags, f, protocol=pickle.HIGHEST_PROTOCOL))
    _save(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest.__dict__).encode()))
    _fsync_path(tmp)
    os.rename(tmp, root / name)
    _save(root / "CURRENT.tmp", lambda f: f.write(name.encode()))
    os.replace(root / "CURRENT.tmp", root / "CURRENT")
    _fsync_path(root)
    _prune(root, current=name, keep_newest=KEEP)
    logger.info("snapshot %s written: %d vectors at seq %d", name, len(row_ids), table.applied_seq)
    return manifest


def load_snapshot(library_dir: Path, *, model_identity: str, dim: int) -> VectorTable | None:
    """The table in the library's current snapshot, or None when there is no usable one."""
    root = library_dir / SNAPSHOT_DIR
    try:
        name = (root / "CURRENT").read_text().strip()
        snap = root / name
        manifest = Manifest(**json.loads((snap / "manifest.json").read_text()))
        if manifest.format != FORMAT or manifest.model_identity != model_identity or manifest.dim != dim:
            logger.warning("ignoring snapshot %s: made by another format or model", name)
            return None
        vectors = np.load(snap / "vectors.npy")
        row_ids = np.load(snap / "row_ids.npy")
        kinds = np.load(snap / "kinds.npy")
        with open(snap / "tags.pkl", "rb") as f:
            tags = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache is not an error: rebuild from SQLite
        logger.exception("ignoring unreadable snapshot in %s", root)
        return None
    if len(tags) != len(row_ids) or vectors.shape != (len(row_ids), dim):
        logger.warning("ignoring inconsistent snapshot %s", name)
        return None
    return VectorTable.from_arrays(dim, vectors, row_ids, kinds, tags, manifest.applied_seq)


def snapshot_seq(library_dir: Path) -> int:
    """The applied seq of the current snapshot (0 when there is none)."""
    try:
        name = (library_dir / SNAPSHOT_DIR / "CURRENT").read_text().strip()
        return int(name.split("-", 1)[0])
    except (FileNotFoundError, ValueError):
        return 0


def _save(path: Path, write: object) -> None:
    with open(path, "wb") as f:
        write(f)  # type: ignore[operator]
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, *, current: str, keep_newest: int) -> None:
    snaps = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))
    for old in snaps[:-keep_newest]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):  # left by a crashed writer
        shutil.rmtree(tmp, ignore_errors=True)
