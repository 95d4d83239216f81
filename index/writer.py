"""The single writer: every mutation of every library goes through one ``LibraryWriter``.

It owns the catalog's create/delete and each library's ``LibraryStore`` write connection, and keeps the
snapshot cache fresh in a background thread so that replicas load fast (snapshots are an optimisation:
readers replay whatever a snapshot lacks).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from index.catalog import Catalog, LibraryInfo
from index.errors import LibraryNotFound
from index.reader import load_table
from index.snapshot import snapshot_seq, write_snapshot
from index.store import LibraryStore, NewRecord

logger = logging.getLogger(__name__)


class LibraryWriter:
    """Mutations of libraries. Thread-safe; each library's store serialises its own transactions.

    Args:
        root: the storage root.
        max_libraries: the most libraries this deployment holds.
        snapshot_min_rows: rows changed since the last snapshot before a new one is written ...
        snapshot_fraction: ... and at least this fraction of the library's live rows.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_libraries: int = 1000,
        snapshot_min_rows: int = 2000,
        snapshot_fraction: float = 0.1,
    ) -> None:
        self.catalog = Catalog(root, max_libraries=max_libraries)
        self.catalog.empty_trash()
        self.snapshot_min_rows = snapshot_min_rows
        self.snapshot_fraction = snapshot_fraction
        self._stores: dict[str, tuple[str, LibraryStore]] = {}
        self._lock = threading.Lock()
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._snapshot_pending: set[str] = set()

    # -- libraries -------------------------------------------------------------------------------

    def create_library(
        self, name: str, mode: str, description: str | None, model: dict[str, Any]
    ) -> dict[str, Any]:
        """Create a library for the model described by ``model`` (the encoder's info)."""
        info = self.catalog.create(
            name,
            mode,
            description,
            model=model["model"],
            pretrained=model["pretrained"],
            model_identity=model["identity"],
            dim=int(model["dim"]),
            face_model_identity=model.get("face_identity"),
        )
        return self.catalog.describe(info)

    def delete_library(self, name: str) -> None:
        with self._lock:
            entry = self._stores.pop(name, None)
        if entry is not None:
            entry[1].close()
        self.catalog.delete(name)

    # -- images ----------------------------------------------------------------------------------

    def add_images(self, name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        """Upsert records into library ``name`` (whose uid must still be ``uid``)."""
        info, store = self._store(name, uid)
        created = store.upsert(records)
        self._maybe_snapshot(info, store)
        return created

    def update_tags(
        self, name: str, uid: str, image_id: str, image_uri: str | None, tags: dict[str, Any]
    ) -> int:
        info, store = self._store(name, uid)
        n = store.update_tags(image_id, image_uri, tags)
        self._maybe_snapshot(info, store)
        return n

    def delete_images(self, name: str, uid: str, image_id: str, image_uri: str | None) -> int:
        info, store = self._store(name, uid)
        n = store.delete(image_id, image_uri)
        self._maybe_snapshot(info, store)
        return n

    def close(self) -> None:
        self._snapshots.shutdown(wait=True)
        with self._lock:
            for _, store in self._stores.values():
                store.close()
            self._stores.clear()

    # -- internals -------------------------------------------------------------------------------

    def _store(self, name: str, uid: str) -> tuple[LibraryInfo, LibraryStore]:
        info = self.catalog.get(name)
        if info.uid != uid:  # deleted and re-created since the caller looked it up
            raise LibraryNotFound(name)
        with self._lock:
            entry = self._stores.get(name)
            if entry is None or entry[0] != uid:
                if entry is not None:
                    entry[1].close()
                entry = (uid, LibraryStore(self.catalog.library_dir(name)))
                self._stores[name] = entry
            return info, entry[1]

    def _maybe_snapshot(self, info: LibraryInfo, store: LibraryStore) -> None:
        library_dir = self.catalog.library_dir(info.name)
        changed = store.count_changed_since(snapshot_seq(library_dir))
        if changed < self.snapshot_min_rows or changed < self.snapshot_fraction * store.count():
            return
        with self._lock:
            if info.key in self._snapshot_pending:
                return
            self._snapshot_pending.add(info.key)
        self._snapshots.submit(self._snapshot, info, library_dir)

    def snapshot_now(self, name: str) -> None:
        """Write a snapshot of library ``name`` synchronously (tests, maintenance)."""
        info = self.catalog.get(name)
        self._snapshot(info, self.catalog.library_dir(name), pending=False)

    def _snapshot(self, info: LibraryInfo, library_dir: Path, pending: bool = True) -> None:
        try:
            with LibraryStore(library_dir, readonly=True) as store:
                table = load_table(store, library_dir, model_identity=info.model_identity)
            write_snapshot(library_dir, table, model_identity=info.model_identity)
        except FileNotFoundError:
            logger.info("library %s was deleted before its snapshot was written", info.name)
        except Exception:
            logger.exception(
                "snapshot of library %s failed (searches replay from SQLite meanwhile)", info.name
            )
        finally:
            if pending:
                with self._lock:
                    self._snapshot_pending.discard(info.key)
