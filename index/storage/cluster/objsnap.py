"""Snapshots on an object store (cluster mode), copied into a node-local cache before being mapped.

Layout under one library's snapshot prefix (a :class:`~index.storage.cluster.blobs.BlobStore`)::

    CURRENT                       the current snapshot's name (the only object ever overwritten)
    <name>/STARTED                {"started_at": t}: written first, dates an upload that never finished
    <name>/index.faiss, ...       the files of `index.storage.embedded.snapshot.write_snapshot_files`
    <name>/manifest.json          written last: a snapshot without it is incomplete and never loaded

Names are ``<applied_seq:012d>-<8 hex>`` as in embedded mode. Publishing is: every file, then the
manifest, then ``CURRENT``; a writer that dies midway leaves an unreferenced, incomplete prefix.

Loading copies the current snapshot into ``cache_dir/<name>/`` (downloaded into a temporary directory,
then renamed: a crashed or concurrent download never leaves a partial directory under the final name;
several replicas on one node share ``cache_dir`` and reuse each other's copies), then memory-maps the
copy as `index.storage.embedded.snapshot.LocalSnapshots` does. Memory-mapping a file on the object store
itself, or on a shared filesystem, is what DESIGN.md rules out.

Garbage collection runs after each publish. A snapshot is deleted when it is not among the newest
``KEEP`` (by applied seq, then write time), is not the one ``CURRENT`` names, and the snapshot after it
was written more than ``grace_s`` ago: a reader that read the old ``CURRENT`` just before it changed has
``grace_s`` to finish its download. Incomplete uploads older than ``grace_s`` are deleted too (a younger
one may be another writer's upload in progress, during a failover).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from index.search.ann import DEFAULT_CONFIG, IndexConfig
from index.search.table import VectorTable
from index.storage.cluster.blobs import BlobStore
from index.storage.embedded.snapshot import (
    KEEP,
    MANIFEST,
    Manifest,
    build_manifest,
    load_snapshot_dir,
    log_loaded,
    log_written,
    parse_manifest,
    snapshot_name,
    usable,
    write_snapshot_files,
)

logger = logging.getLogger(__name__)

POINTER = "CURRENT"
STARTED = "STARTED"
#: Seconds a read of ``CURRENT`` is reused: the reader asks before every search, and one GET per
#: search would cost more than the search. A new snapshot is noticed at most this much later.
POINTER_TTL_S = 0.5
_NAME = re.compile(r"^\d{12}-[0-9a-f]{8}$")
_TMP = ".tmp-"  # cache_dir entries being written or downloaded


class ObjectSnapshots:
    """One library's snapshots on an object store; implements `index.storage.embedded.snapshot.Snapshots`.

    Args:
        blobs: rooted at the library's snapshot prefix (e.g. ``.../libraries/<uid>/snapshots``).
        cache_dir: a node-local directory for this library's copies (created when missing; may be
            shared by several processes of one node).
        label: the library's name for logs.
        grace_s: seconds a superseded snapshot (and an incomplete upload, and an unused local copy) is
            kept for readers still loading it.
        clock: the time (tests move it forward).
    """

    def __init__(
        self,
        blobs: BlobStore,
        cache_dir: Path,
        *,
        label: str,
        grace_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.blobs = blobs
        self.cache_dir = Path(cache_dir)
        self.label = label
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pointer: tuple[float, str | None] | None = None  # (monotonic time read, name)
        self._loaded: list[str] = []  # names this instance loaded or wrote, newest last

    # -- the Snapshots protocol ------------------------------------------------------------------

    def current_name(self) -> str | None:
        """The current snapshot's name: one small GET, reused for :data:`POINTER_TTL_S` seconds."""
        with self._lock:
            if self._pointer is not None and time.monotonic() - self._pointer[0] < POINTER_TTL_S:
                return self._pointer[1]
        return self._read_pointer()

    def seq(self) -> int:
        name = self.current_name()
        try:
            return 0 if name is None else int(name.split("-", 1)[0])
        except ValueError:  # not a name this code wrote: no usable snapshot
            return 0

    def read_manifest(self) -> Manifest | None:
        name = self.current_name()
        return None if name is None else self._manifest(name)

    def load(
        self, *, model_identity: str, dim: int, config: IndexConfig = DEFAULT_CONFIG, writable: bool = False
    ) -> tuple[VectorTable, str] | None:
        """The current snapshot's table and name, or None when there is none or it is unusable (another
        format, model or dimension; incomplete; deleted while being copied).

        Raises:
            OSError: the object store failed (other than a missing object), or the cache is unwritable.
        """
        started = time.perf_counter()
        name = self._read_pointer()
        if name is None:
            return None
        manifest = self._manifest(name)
        if manifest is None:
            logger.warning("%s: ignoring snapshot %s: it has no readable manifest", self.label, name)
            return None
        if not usable(manifest, model_identity=model_identity, dim=dim):
            logger.warning("%s: ignoring snapshot %s: made by another format or model", self.label, name)
            return None
        try:
            local = self._local_copy(name, manifest)
            table = load_snapshot_dir(local, manifest, config=config, writable=writable)
        except FileNotFoundError as exc:  # collected meanwhile (a reader slower than grace_s)
            logger.warning("%s: snapshot %s vanished while loading it: %s", self.label, name, exc)
            return None
        self._remember(name)
        log_loaded(name, table, started)
        return table, name

    def write(self, table: VectorTable, *, model_identity: str) -> Manifest:
        """Publish ``table`` as the newest snapshot, then collect old ones.

        Raises:
            ValueError: the table has a tail or no base.
            OSError: the upload failed (nothing was published; the partial upload is collected later).
        """
        manifest = build_manifest(table, model_identity=model_identity, written_at=self._clock())
        name = snapshot_name(manifest)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = write_snapshot_files(tmp, table, manifest)
            self.blobs.put_bytes(f"{name}/{STARTED}", json.dumps({"started_at": self._clock()}).encode())
            for path in files:  # the manifest is the last of them
                self.blobs.put_file(f"{name}/{path.name}", path)
            self.blobs.put_bytes(POINTER, name.encode())
            with self._lock:
                self._pointer = (time.monotonic(), name)
            self._install(tmp, self.cache_dir / name)  # the writer's next load needs no download
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log_written(name, table)
        self._remember(name)
        try:
            self.collect()
        except Exception:  # published already: a failed collection is retried after the next write
            logger.exception("%s: collecting old snapshots on %s failed", self.label, self.blobs.url)
        return manifest

    # -- collection ------------------------------------------------------------------------------

    def collect(self) -> list[str]:
        """Delete the snapshots (and incomplete uploads) that no reader can need any more.

        Returns:
            The names deleted.
        """
        now = self._clock()
        current = self._read_pointer()
        published: list[tuple[int, float, str]] = []
        doomed: list[str] = []
        for name in self.blobs.list():
            if not _NAME.match(name):
                continue
            manifest = self._manifest(name)
            if manifest is not None:
                published.append((manifest.applied_seq, manifest.written_at, name))
            elif name != current and now - self._started_at(name) > self.grace_s:
                doomed.append(name)  # an upload that never finished
        published.sort()
        for i, (_, _, name) in enumerate(published[: max(0, len(published) - KEEP)]):
            superseded_at = published[i + 1][1]
            if name != current and now - superseded_at > self.grace_s:
                doomed.append(name)
        for name in doomed:
            self.blobs.delete(f"{name}/{MANIFEST}")  # first: a half-deleted snapshot is never loaded
            self.blobs.delete_prefix(name)
        if doomed:
            logger.info("%s: collected snapshots %s", self.label, ", ".join(sorted(doomed)))
        self._prune_cache()
        return doomed

    # -- internals -------------------------------------------------------------------------------

    def _read_pointer(self) -> str | None:
        data = self.blobs.get_bytes(POINTER)
        name = None if data is None else (data.decode().strip() or None)
        with self._lock:
            self._pointer = (time.monotonic(), name)
        return name

    def _manifest(self, name: str) -> Manifest | None:
        data = self.blobs.get_bytes(f"{name}/{MANIFEST}")
        if data is None:
            return None
        try:
            return parse_manifest(data)
        except ValueError:
            logger.warning("%s: snapshot %s has an unreadable manifest", self.label, name)
            return None

    def _started_at(self, name: str) -> float:
        """When the upload of ``name`` started (0: unknown, e.g. a deletion that stopped midway)."""
        data = self.blobs.get_bytes(f"{name}/{STARTED}")
        try:
            return float(json.loads(data)["started_at"]) if data is not None else 0.0
        except (ValueError, KeyError, TypeError):
            return 0.0

    def _local_copy(self, name: str, manifest: Manifest) -> Path:
        """``cache_dir/<name>``, downloaded unless present; its mtime marks it as in use."""
        final = self.cache_dir / name
        try:
            os.utime(final)  # in use: another process's pruning leaves it alone
            return final
        except FileNotFoundError:
            pass
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for key in self.blobs.list(name):
                file = key.rsplit("/", 1)[-1]
                if file not in (MANIFEST, STARTED):
                    self.blobs.get_file(key, tmp / file)
            # the manifest as read: the copy is complete exactly when it has one
            (tmp / MANIFEST).write_text(json.dumps(manifest.__dict__))
            self._install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final`` unless another process got there first (same content: keep it)."""
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        os.utime(final)

    def _remember(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self._loaded.remove(name)
            self._loaded.append(name)
            del self._loaded[:-2]
        self._prune_cache()

    def _prune_cache(self) -> None:
        """Remove local copies that are neither this instance's last two nor used by anyone within
        ``grace_s`` (unlinking files another process has memory-mapped is safe on a local disk)."""
        with self._lock:
            keep = set(self._loaded)
        now = time.time()  # mtimes are wall-clock times of this node
        try:
            entries = list(self.cache_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name in keep or not entry.is_dir():
                continue
            try:
                idle = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if idle > self.grace_s:
                shutil.rmtree(entry, ignore_errors=True)
