"""Snapshots: the rebuildable cache that lets a replica load a library without replaying all of SQLite.

A snapshot is a directory ``snapshots/<applied_seq>-<uid>/`` holding, as of ``applied_seq``:

- ``index.faiss``: the base index of the table's kind (`index.search.ann`), the raw vectors included for
  ``flat``/``hnsw`` (in FAISS's flat storage), plus ``vectors.npy`` for ``ivfpq`` (raw vectors for the
  refine and for exact search);
- ``row_ids.npy``, ``kinds.npy``, ``live.npy``: per slot; dead slots stay (HNSW cannot remove a vector)
  until a rebuild drops them;
- ``tags.pkl``: the pickled `TagColumns`, i.e. its numpy arrays and string dictionaries as they are in
  memory: loading them rebuilds nothing (1M rows load in a fraction of a second, against seconds for
  re-parsing the tags);
- ``manifest.json``, written last; it also records the index's recall calibration (`index.search.calibration`:
  the search settings measured to reach each recall target on this library's own vectors).

The file ``snapshots/CURRENT`` names the newest complete snapshot and is replaced atomically (temp name,
fsync, ``os.replace``). A reader loads CURRENT's snapshot *memory-mapped* (the vectors are not copied: a
1M-vector library is ready in about a second) and replays rows with ``seq > applied_seq`` from SQLite;
after a crash the snapshot may lag SQLite, never lead it, because it is only ever built from committed
rows. Anything unreadable or made by another model/format is ignored (and rebuilt). The tags are pickled:
the snapshot is a private cache under the service's own storage root, rebuilt whenever FORMAT changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from index.search.ann import BASES, DEFAULT_CONFIG, IndexConfig
from index.search.calibration import Calibration
from index.search.table import VectorTable
from index.storage.embedded.durable import fsync_dir

logger = logging.getLogger(__name__)

FORMAT = 2
SNAPSHOT_DIR = "snapshots"
#: A temporary snapshot directory this old was left by a crashed writer (one in progress is younger).
ABANDONED_TMP_S = 3600.0
KEEP = 2  # snapshots kept: the current one and the one a slow reader may still be loading
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    format: int
    applied_seq: int
    model_identity: str
    dim: int
    index_kind: str
    count: int  # slots, live and dead
    live: int = 0
    index_bytes: int = 0  # resident bytes of the index structure (reporting)
    #: Recall ladders measured on this index (`index.search.calibration.Calibration.to_dict`); None: none.
    calibration: dict | None = None
    #: When the snapshot was written (Unix time; 0: before it was recorded). Object stores collect a
    #: snapshot a grace period after the next one was written (`index.storage.cluster.objsnap`).
    written_at: float = 0.0


@runtime_checkable
class Snapshots(Protocol):
    """Where one library's snapshots live: ``LocalSnapshots`` (a directory of the storage root, the
    embedded mode) or ``index.storage.cluster.objsnap.ObjectSnapshots`` (an object store, copied into a
    node-local cache before being memory-mapped: cluster mode). The reader and the writer only use this."""

    @property
    def label(self) -> str:
        """A short name for logs (the library's directory or uid, and shard)."""
        ...

    def current_name(self) -> str | None:
        """The name of the current snapshot (one small read), or None."""
        ...

    def seq(self) -> int:
        """The applied seq of the current snapshot (0 when there is none)."""
        ...

    def read_manifest(self) -> Manifest | None: ...

    def load(
        self, *, model_identity: str, dim: int, config: IndexConfig = DEFAULT_CONFIG, writable: bool = False
    ) -> tuple[VectorTable, str] | None:
        """The current snapshot's table and name, or None when there is no usable one."""
        ...

    def write(self, table: VectorTable, *, model_identity: str) -> Manifest:
        """Publish ``table`` as the newest snapshot (files first, then the manifest, then the pointer)."""
        ...


@dataclass(frozen=True)
class LocalSnapshots:
    """Snapshots under ``<library_dir>/snapshots`` (embedded mode)."""

    library_dir: Path
    #: For logs (default: the directory's name; a shard's directory is only its number).
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.library_dir.name

    def current_name(self) -> str | None:
        return current_name(self.library_dir)

    def seq(self) -> int:
        return snapshot_seq(self.library_dir)

    def read_manifest(self) -> Manifest | None:
        return read_manifest(self.library_dir)

    def load(
        self, *, model_identity: str, dim: int, config: IndexConfig = DEFAULT_CONFIG, writable: bool = False
    ) -> tuple[VectorTable, str] | None:
        return load_snapshot(
            self.library_dir, model_identity=model_identity, dim=dim, config=config, writable=writable
        )

    def write(self, table: VectorTable, *, model_identity: str) -> Manifest:
        return write_snapshot(self.library_dir, table, model_identity=model_identity)


def write_snapshot(library_dir: Path, table: VectorTable, *, model_identity: str) -> Manifest:
    """Write ``table`` as the library's newest snapshot and point CURRENT at it.

    Raises:
        ValueError: the table has a tail or no base (the writer absorbs or rebuilds first).
    """
    manifest = build_manifest(table, model_identity=model_identity)
    root = library_dir / SNAPSHOT_DIR
    root.mkdir(exist_ok=True)
    name = snapshot_name(manifest)
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    write_snapshot_files(tmp, table, manifest)
    fsync_dir(tmp)
    os.rename(tmp, root / name)
    _save(root / "CURRENT.tmp", lambda f: f.write(name.encode()))
    os.replace(root / "CURRENT.tmp", root / "CURRENT")
    fsync_dir(root)
    _prune(root, current=name, keep_newest=KEEP)
    log_written(name, table)
    return manifest


def build_manifest(table: VectorTable, *, model_identity: str, written_at: float | None = None) -> Manifest:
    """The manifest of a snapshot of ``table`` (``written_at``: now unless given).

    Raises:
        ValueError: the table has a tail or no base (only a base index is saved).
    """
    if table.base is None or table.tail_count:
        raise ValueError("only a table whose slots are all in its base index can be snapshotted")
    return Manifest(
        FORMAT,
        table.applied_seq,
        model_identity,
        table.dim,
        table.kind,
        len(table),
        table.live_count,
        table.base.nbytes(),
        None if table.calibration is None else table.calibration.to_dict(),
        time.time() if written_at is None else written_at,
    )


def snapshot_name(manifest: Manifest) -> str:
    """A new snapshot's name: its applied seq first (what ``snapshot_seq`` reads), then a random part so
    that two snapshots of one seq (a compaction, a change of index kind) never collide."""
    return f"{manifest.applied_seq:012d}-{uuid.uuid4().hex[:8]}"


def write_snapshot_files(directory: Path, table: VectorTable, manifest: Manifest) -> list[Path]:
    """Write the files of a snapshot of ``table`` into the existing, empty ``directory``, each fsynced,
    ``manifest.json`` last.

    Returns:
        The files in the order they were written (the manifest last: publish them in that order).
    """
    if table.base is None:
        raise ValueError("only a table whose slots are all in its base index can be snapshotted")
    paths = table.base.save(directory)
    for path in paths:
        _fsync_file(path)
    for name, value in (("row_ids.npy", table.row_ids), ("kinds.npy", table.kinds), ("live.npy", table.live)):
        _save(directory / name, lambda f, v=value: np.save(f, v))
        paths.append(directory / name)
    _save(directory / "tags.pkl", lambda f: pickle.dump(table.tags, f, protocol=pickle.HIGHEST_PROTOCOL))
    _save(directory / MANIFEST, lambda f: f.write(json.dumps(manifest.__dict__).encode()))
    return [*paths, directory / "tags.pkl", directory / MANIFEST]


def log_written(name: str, table: VectorTable) -> None:
    logger.info(
        "snapshot %s written: %s index, %d slots (%d live) at seq %d",
        name,
        table.kind,
        len(table),
        table.live_count,
        table.applied_seq,
    )


def parse_manifest(data: bytes | str) -> Manifest:
    """A manifest from its JSON.

    Raises:
        ValueError: not JSON, or not the fields of a manifest.
    """
    try:
        return Manifest(**json.loads(data))
    except TypeError as exc:
        raise ValueError(f"not a snapshot manifest: {exc}") from None


def usable(manifest: Manifest, *, model_identity: str, dim: int) -> bool:
    """Whether a snapshot can serve this model: same format, model and dimension."""
    return manifest.format == FORMAT and manifest.model_identity == model_identity and manifest.dim == dim


def load_snapshot_dir(
    snap: Path, manifest: Manifest, *, config: IndexConfig = DEFAULT_CONFIG, writable: bool = False
) -> VectorTable:
    """The table in the complete snapshot directory ``snap`` (whose manifest is ``manifest``).

    Args:
        writable: read the index into memory so that it can grow; by default it is memory-mapped.
    Raises:
        OSError, ValueError, ...: missing or unreadable files (callers treat any as "no snapshot").
    """
    kind = BASES[manifest.index_kind]
    base = kind.load_writable(snap) if writable else kind.load(snap)
    row_ids = np.load(snap / "row_ids.npy")
    kinds = np.load(snap / "kinds.npy")
    live = np.load(snap / "live.npy")
    with open(snap / "tags.pkl", "rb") as f:
        tags = pickle.load(f)
    calibration = None if manifest.calibration is None else Calibration.from_dict(manifest.calibration)
    return VectorTable.from_snapshot(
        base, row_ids, kinds, live, tags, manifest.applied_seq, config, calibration
    )


def log_loaded(name: str, table: VectorTable, started: float) -> None:
    logger.info(
        "loaded snapshot %s (%s, %d slots) in %.2fs",
        name,
        table.kind,
        len(table),
        time.perf_counter() - started,
    )


def current_name(library_dir: Path) -> str | None:
    """The name of the library's current snapshot (one small file read), or None."""
    try:
        return (library_dir / SNAPSHOT_DIR / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def read_manifest(library_dir: Path) -> Manifest | None:
    """The current snapshot's manifest, or None when there is no readable one."""
    name = current_name(library_dir)
    if name is None:
        return None
    try:
        return parse_manifest((library_dir / SNAPSHOT_DIR / name / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def load_snapshot(
    library_dir: Path,
    *,
    model_identity: str,
    dim: int,
    config: IndexConfig = DEFAULT_CONFIG,
    writable: bool = False,
) -> tuple[VectorTable, str] | None:
    """The table in the library's current snapshot and the snapshot's name, or None when there is no
    usable one.

    Args:
        writable: read the index into memory so that it can grow (the writer); by default it is
            memory-mapped read-only (readers).
    """
    root = library_dir / SNAPSHOT_DIR
    started = time.perf_counter()
    try:
        name = (root / "CURRENT").read_text().strip()
        snap = root / name
        manifest = parse_manifest((snap / MANIFEST).read_text())
        if not usable(manifest, model_identity=model_identity, dim=dim):
            logger.warning("ignoring snapshot %s: made by another format or model", name)
            return None
        table = load_snapshot_dir(snap, manifest, config=config, writable=writable)
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache is not an error: rebuild from SQLite
        logger.exception("ignoring unreadable snapshot in %s", root)
        return None
    log_loaded(name, table, started)
    return table, name


def snapshot_seq(library_dir: Path) -> int:
    """The applied seq of the current snapshot (0 when there is none)."""
    name = current_name(library_dir)
    try:
        return 0 if name is None else int(name.split("-", 1)[0])
    except ValueError:
        return 0


def _save(path: Path, write: object) -> None:
    with open(path, "wb") as f:
        write(f)  # type: ignore[operator]
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _prune(root: Path, *, current: str, keep_newest: int) -> None:
    snaps = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))
    for old in snaps[:-keep_newest]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):  # left by a crashed writer; a young one may be another's, in progress
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime > ABANDONED_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
