"""The single writer: every mutation of every library goes through one ``LibraryWriter``.

It owns the catalog's create/delete and each library's ``LibraryStore`` write connection, and keeps the
snapshot cache fresh in a background thread so that replicas load fast (snapshots are an optimisation:
readers replay whatever a snapshot lacks).

The snapshot thread is also where index maintenance happens, so that it never blocks a search or a
write: each snapshot loads the previous one (into memory) plus the rows committed since, then either
folds those rows into the index (``add``: cheap, the usual case) or rebuilds the index from the live
rows, when the library should change kind (it crossed ``hnsw_min_rows``, its ``index_kind`` asks for
another) or when more than ``compact_dead_fraction`` of its slots are dead (compaction). Readers pick
the new snapshot up by themselves (`index.reader`).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from index.ann import DEFAULT_CONFIG, IndexConfig, choose_kind
from index.backends import RecordStore
from index.catalog import LibraryInfo
from index.errors import LibraryNotFound
from index.reader import load_table
from index.snapshot import Manifest, Snapshots
from index.storage import ClusterStorage, LibraryData, Storage, StorageSettings, open_storage
from index.store import NewRecord

logger = logging.getLogger(__name__)


class LibraryWriter:
    """Mutations of libraries. Thread-safe; each library's store serialises its own transactions.

    Args:
        storage: where the data lives (``index.storage``), or an embedded storage root.
        max_libraries: the most libraries this deployment holds (when ``storage`` is a root).
        config: index kinds, thresholds and the snapshot policy (``snapshot_*`` fields).
    """

    def __init__(
        self,
        storage: Storage | str | Path,
        *,
        max_libraries: int = 1000,
        config: IndexConfig = DEFAULT_CONFIG,
    ) -> None:
        if not isinstance(storage, Storage):
            storage = open_storage(StorageSettings(storage_root=str(storage)), max_libraries=max_libraries)
        self.storage = storage
        self.catalog = storage.catalog
        self.catalog.empty_trash()
        if isinstance(storage, ClusterStorage):
            storage.collect_orphans()
        self.config = config
        #: name -> (uid, the library's data, its write store): one of each per library, so that the
        #: snapshot pointer an object store caches (index.objsnap) serves every write.
        self._stores: dict[str, tuple[str, LibraryData, RecordStore]] = {}
        self._lock = threading.Lock()
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._snapshot_pending: set[str] = set()

    # -- libraries -------------------------------------------------------------------------------

    def create_library(
        self,
        name: str,
        mode: str,
        description: str | None,
        model: dict[str, Any],
        index_kind: str = "auto",
    ) -> dict[str, Any]:
        """Create a library for the model described by ``model`` (the encoder's info).

        Args:
            index_kind: ``auto`` (by size, from the config's thresholds), ``flat``, ``hnsw`` or ``ivfpq``.
        """
        info = self.catalog.create(
            name,
            mode,
            description,
            model=model["model"],
            pretrained=model["pretrained"],
            model_identity=model["identity"],
            dim=int(model["dim"]),
            face_model_identity=model.get("face_identity"),
            index_kind=index_kind,
        )
        return self.storage.describe(info, self.config)

    def delete_library(self, name: str) -> None:
        with self._lock:
            entry = self._stores.pop(name, None)
        if entry is not None:
            entry[2].close()
        self.storage.delete_library(name)

    # -- images ----------------------------------------------------------------------------------

    def add_images(self, name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        """Upsert records into library ``name`` (whose uid must still be ``uid``)."""
        info, library, store = self._store(name, uid)
        created = store.upsert(records)
        self._maybe_snapshot(info, library, store)
        return created

    def update_tags(
        self, name: str, uid: str, image_id: str, image_uri: str | None, tags: dict[str, Any]
    ) -> int:
        info, library, store = self._store(name, uid)
        n = store.update_tags(image_id, image_uri, tags)
        self._maybe_snapshot(info, library, store)
        return n

    def delete_images(self, name: str, uid: str, image_id: str, image_uri: str | None) -> int:
        info, library, store = self._store(name, uid)
        n = store.delete(image_id, image_uri)
        self._maybe_snapshot(info, library, store)
        return n

    def close(self) -> None:
        self._snapshots.shutdown(wait=True)
        with self._lock:
            for _, _, store in self._stores.values():
                store.close()
            self._stores.clear()
        self.storage.close()

    # -- internals -------------------------------------------------------------------------------

    def _store(self, name: str, uid: str) -> tuple[LibraryInfo, LibraryData, RecordStore]:
        info = self.catalog.get(name)
        if info.uid != uid:  # deleted and re-created since the caller looked it up
            raise LibraryNotFound(name)
        with self._lock:
            entry = self._stores.get(name)
            if entry is None or entry[0] != uid:
                if entry is not None:
                    entry[2].close()
                library = self.storage.library(info)
                entry = (uid, library, library.open_store(False))
                self._stores[name] = entry
            return info, entry[1], entry[2]

    def _maybe_snapshot(self, info: LibraryInfo, library: LibraryData, store: RecordStore) -> None:
        cfg = self.config
        changed = store.count_changed_since(library.snapshots.seq())
        if changed < cfg.snapshot_min_rows:
            return
        # The tail bound comes first: readers scan the tail exactly, so it must stay small even when
        # snapshot_fraction of a big library is many rows. Only then count the library (a full scan).
        if changed < cfg.snapshot_max_tail_rows and changed < cfg.snapshot_fraction * store.count():
            return
        with self._lock:
            if info.key in self._snapshot_pending:
                return
            self._snapshot_pending.add(info.key)
        self._snapshots.submit(self._snapshot, info, library)

    def snapshot_now(self, name: str) -> Manifest:
        """Write a snapshot of library ``name`` synchronously (tests, maintenance, benchmarks).

        Raises:
            LibraryNotFound: no such library. Errors of the snapshot itself propagate too.
        """
        info = self.catalog.get(name)
        library = self.storage.library(info)
        store = library.open_store(True)
        try:
            return refresh_snapshot(store, library.snapshots, info, self.config)
        finally:
            store.close()

    def _snapshot(self, info: LibraryInfo, library: LibraryData) -> None:
        try:
            store = library.open_store(True)
            try:
                refresh_snapshot(store, library.snapshots, info, self.config)
            finally:
                store.close()
        except (FileNotFoundError, LibraryNotFound):
            logger.info("library %s was deleted before its snapshot was written", info.name)
        except Exception:
            logger.exception(
                "snapshot of library %s failed (searches replay from SQLite meanwhile)", info.name
            )
        finally:
            with self._lock:
                self._snapshot_pending.discard(info.key)


def refresh_snapshot(
    store: RecordStore, snapshots: Snapshots, info: LibraryInfo, config: IndexConfig = DEFAULT_CONFIG
) -> Manifest:
    """Write a new snapshot of a library: the previous one plus the rows committed since.

    The rows since the last snapshot are folded into its index when it still has the right kind and
    at most ``compact_dead_fraction`` of its slots are dead; otherwise the index is rebuilt from the
    live rows with the kind `choose_kind` picks now.
    """
    table, _ = load_table(store, snapshots, model_identity=info.model_identity, config=config, writable=True)
    target = choose_kind(info.index_kind, table.live_count, table.dim, config)
    dead = len(table) - table.live_count
    if table.base is not None and table.kind == target and dead <= config.compact_dead_fraction * len(table):
        table.absorb_tail()
    else:
        table = table.rebuilt(target)
    return snapshots.write(table, model_identity=info.model_identity)
