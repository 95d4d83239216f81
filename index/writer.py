"""The single writer: every mutation of every library goes through one ``LibraryWriter``.

It owns the catalog's create/delete and each library's ``LibraryStore`` write connection, and keeps the
snapshot cache fresh in a background thread so that replicas load fast (snapshots are an optimisation:
readers replay whatever a snapshot lacks).

The snapshot thread is also where index maintenance happens, so that it never blocks a search or a
write: each snapshot loads the previous one (into memory) plus the rows committed since, then either
folds those rows into the index (``add``: cheap, the usual case) or rebuilds the index from the live
rows, when the library should change kind (it crossed ``hnsw_min_rows``, its ``index_kind`` asks for
another) or when more than ``compact_dead_fraction`` of its slots are dead (compaction). Readers pick
the new snapshot up by themselves (`index.query.reader`).

A sharded library (``index.search.sharding``) is S such libraries under one name: each record goes to the
store of its id's shard, and each shard has its own seq and snapshots (so a snapshot, a compaction or a
kind switch is per shard).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from index.errors import LibraryNotFound
from index.query.reader import load_table
from index.search.ann import DEFAULT_CONFIG, IndexConfig, choose_kind
from index.search.sharding import shard_of, split_by_shard
from index.storage.backends import ClusterStorage, LibraryData, Storage, StorageSettings, open_storage
from index.storage.embedded.catalog import LibraryInfo
from index.storage.embedded.snapshot import Manifest, Snapshots
from index.storage.embedded.store import NewRecord
from index.storage.interfaces import RecordStore

logger = logging.getLogger(__name__)


class LibraryWriter:
    """Mutations of libraries. Thread-safe; each library's store serialises its own transactions.

    Args:
        storage: where the data lives (``index.storage.backends``), or an embedded storage root.
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
        #: (name, shard) -> (uid, the shard's data, its write store): one of each per shard, so that the
        #: snapshot pointer an object store caches (index.storage.cluster.objsnap) serves every write.
        self._stores: dict[tuple[str, int], tuple[str, LibraryData, RecordStore]] = {}
        self._lock = threading.Lock()
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._snapshot_pending: set[str] = set()
        # One snapshot at a time: the background thread's and snapshot_now's would otherwise race on
        # the same library's pointer and files.
        self._snapshot_lock = threading.Lock()

    # -- libraries -------------------------------------------------------------------------------

    def create_library(
        self,
        name: str,
        mode: str,
        description: str | None,
        model: dict[str, Any],
        index_kind: str = "auto",
        shards: int = 1,
    ) -> dict[str, Any]:
        """Create a library for the model described by ``model`` (the encoder's info).

        Args:
            index_kind: ``auto`` (by size, from the config's thresholds), ``flat``, ``hnsw`` or ``ivfpq``.
            shards: how many shards hold its records (``index.search.sharding``; fixed for life).
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
            shards=shards,
        )
        return self.storage.describe(info, self.config)

    def delete_library(self, name: str) -> None:
        with self._lock:
            entries = [self._stores.pop(key) for key in [k for k in self._stores if k[0] == name]]
        for entry in entries:
            entry[2].close()
        self.storage.delete_library(name)

    # -- images ----------------------------------------------------------------------------------

    def add_images(self, name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        """Upsert records into library ``name`` (whose uid must still be ``uid``).

        A sharded library's records are split by shard, one upsert (one seq) per shard touched; each is
        atomic on its own, so a failure part-way leaves the earlier shards' records written (a retry of
        the same records is an overwrite, as for any upsert).
        """
        info = self._info(name, uid)
        created = [False] * len(records)
        for shard, positions in sorted(split_by_shard((r.image_id for r in records), info.shards).items()):
            library, store = self._store(info, shard)
            flags = store.upsert([records[i] for i in positions])
            for i, flag in zip(positions, flags, strict=True):
                created[i] = flag
            self._maybe_snapshot(info, shard, library, store)
        return created

    def update_tags(
        self, name: str, uid: str, image_id: str, image_uri: str | None, tags: dict[str, Any]
    ) -> int:
        info = self._info(name, uid)
        shard = shard_of(image_id, info.shards)
        library, store = self._store(info, shard)
        n = store.update_tags(image_id, image_uri, tags)
        self._maybe_snapshot(info, shard, library, store)
        return n

    def delete_images(self, name: str, uid: str, image_id: str, image_uri: str | None) -> int:
        info = self._info(name, uid)
        shard = shard_of(image_id, info.shards)
        library, store = self._store(info, shard)
        n = store.delete(image_id, image_uri)
        self._maybe_snapshot(info, shard, library, store)
        return n

    def close(self) -> None:
        self._snapshots.shutdown(wait=True)
        with self._lock:
            for _, _, store in self._stores.values():
                store.close()
            self._stores.clear()
        self.storage.close()

    # -- internals -------------------------------------------------------------------------------

    def _info(self, name: str, uid: str) -> LibraryInfo:
        info = self.catalog.get(name)
        if info.uid != uid:  # deleted and re-created since the caller looked it up
            raise LibraryNotFound(name)
        return info

    def _store(self, info: LibraryInfo, shard: int) -> tuple[LibraryData, RecordStore]:
        with self._lock:
            entry = self._stores.get((info.name, shard))
            if entry is None or entry[0] != info.uid:
                if entry is not None:
                    entry[2].close()
                library = self.storage.library(info, shard)
                entry = (info.uid, library, library.open_store(False))
                self._stores[(info.name, shard)] = entry
            return entry[1], entry[2]

    def _maybe_snapshot(
        self, info: LibraryInfo, shard: int, library: LibraryData, store: RecordStore
    ) -> None:
        cfg = self.config
        changed = store.count_changed_since(library.snapshots.seq())
        if changed < cfg.snapshot_min_rows:
            return
        # The tail bound comes first: readers scan the tail exactly, so it must stay small even when
        # snapshot_fraction of a big library is many rows. Only then count the library (a full scan).
        if changed < cfg.snapshot_max_tail_rows and changed < cfg.snapshot_fraction * store.count():
            return
        key = info.shard_key(shard)
        with self._lock:
            if key in self._snapshot_pending:
                return
            self._snapshot_pending.add(key)
        self._snapshots.submit(self._snapshot, info, shard, library)

    def snapshot_now(self, name: str, shard: int = 0) -> Manifest:
        """Write a snapshot of one shard of library ``name`` synchronously (tests, maintenance,
        benchmarks); a 1-shard library has only shard 0.

        Raises:
            LibraryNotFound: no such library. ValueError: no such shard. Errors of the snapshot itself
            propagate too.
        """
        info = self.catalog.get(name)
        return self._write_snapshot(info, self.storage.library(info, shard))

    def snapshot_all(self, name: str) -> list[Manifest]:
        """Write a snapshot of every shard of library ``name`` (in shard order), synchronously."""
        info = self.catalog.get(name)
        return [self._write_snapshot(info, data) for data in self.storage.shards(info)]

    def _write_snapshot(self, info: LibraryInfo, library: LibraryData) -> Manifest:
        with self._snapshot_lock:
            store = library.open_store(True)
            try:
                return refresh_snapshot(store, library.snapshots, info, self.config)
            finally:
                store.close()

    def _snapshot(self, info: LibraryInfo, shard: int, library: LibraryData) -> None:
        try:
            self._write_snapshot(info, library)
        except (FileNotFoundError, LibraryNotFound):
            logger.info("library %s was deleted before its snapshot was written", library.label)
        except Exception:
            logger.exception(
                "snapshot of library %s failed (searches replay from the store meanwhile)", library.label
            )
        finally:
            with self._lock:
                self._snapshot_pending.discard(info.shard_key(shard))


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
