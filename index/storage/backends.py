"""Where a deployment keeps its data, chosen by configuration: one object the deployments ask for the
catalog, a library's records and snapshots, and the import tasks.

- **Embedded** (``storage_root``, the default): SQLite databases and files under one directory of one
  machine (``index.storage.embedded.catalog.Catalog``, ``index.storage.embedded.store.LibraryStore``,
  ``index.storage.embedded.snapshot.LocalSnapshots``).
- **Cluster** (``database_url`` + ``object_store_url``): PostgreSQL holds the catalog, the records and
  the tasks (``index.storage.cluster.pg``); an object store holds snapshots and stored frames
  (``index.storage.cluster.blobs``, ``index.storage.cluster.objsnap``); each replica copies the snapshots it
  loads into its node's ``cache_dir``. No process reads a path another node writes, so any replica can restart
  on any node.

Every replica opens its own ``Storage`` from the same ``StorageSettings`` (they travel with the
deployment's arguments); nothing here is shared between processes but the database and the bucket.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.search.ann import DEFAULT_CONFIG, IndexConfig
from index.search.calibration import Calibration
from index.storage.embedded.catalog import Catalog, LibraryInfo, library_object, shard_dirs
from index.storage.embedded.snapshot import LocalSnapshots, Snapshots
from index.storage.embedded.store import LibraryStore
from index.storage.interfaces import LibraryCatalog, RecordStore, TaskStorage

if TYPE_CHECKING:  # imported on use at run time: embedded mode needs neither fsspec backends nor psycopg
    from index.storage.cluster.blobs import BlobStore

logger = logging.getLogger(__name__)


class StorageSettings(BaseModel):
    """The storage half of the builder's arguments (``deployments.config.AppArgs`` carries these fields
    at its top level; docs/operations.md: "Running on a Ray cluster")."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    storage_root: str = Field(
        "./data", description="embedded mode: the directory of every library (SQLite and files: one machine)"
    )
    database_url: str | None = Field(
        None,
        description="cluster mode: postgresql://user@host:5432/db (the password here, or better in "
        "database_password_file / database_password_env); with object_store_url (both or neither)",
    )
    database_password_file: str | None = Field(
        None,
        description="cluster mode: a file holding the database password (a mounted Secret), kept out of the "
        "URL; this or database_password_env",
    )
    database_password_env: str | None = Field(
        None,
        description="cluster mode: an environment variable holding the database password (set on every "
        "node), kept out of the URL; this or database_password_file",
    )
    database_pool_size: int = Field(
        4,
        ge=1,
        le=64,
        description="cluster mode: connections each replica opens at most; size PostgreSQL's max_connections "
        "for it (docs/operations.md, 'Running on a Ray cluster')",
    )
    database_connect_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="cluster mode: how long a replica (and the deploy) tries to reach the database, and a "
        "request waits for a pooled connection, before failing with the reason",
    )
    object_store_url: str | None = Field(
        None,
        description="cluster mode: fsspec URL of snapshots and frames (s3://bucket/prefix, gs://, az://)",
    )
    object_store_options: dict[str, Any] = Field(
        default_factory=dict,
        description='cluster mode: fsspec options of the object store, e.g. {"endpoint_url": '
        '"http://minio:9000"} for MinIO or Ceph; credentials come from the environment',
    )
    cache_dir: str | None = Field(
        None,
        description="cluster mode: node-local directory for the snapshot copies index replicas memory-map "
        "(default: <system temp dir>/image-search-cache)",
    )
    snapshot_grace_s: float = Field(
        600.0,
        ge=0,
        description="cluster mode: a replaced snapshot is deleted this long after it was replaced (so a "
        "replica that read the old pointer finishes its download)",
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> StorageSettings:
        if (self.database_url is None) != (self.object_store_url is None):
            missing = "object_store_url" if self.object_store_url is None else "database_url"
            raise ValueError(
                f"cluster mode needs both database_url and object_store_url; {missing} is not set"
            )
        if not self.cluster and (self.database_password_file or self.database_password_env):
            raise ValueError("database_password_file/database_password_env are set but database_url is not")
        return self

    @property
    def cluster(self) -> bool:
        return self.database_url is not None

    def describe(self) -> dict[str, Any]:
        """What /health reports: the mode and where the data lives, without credentials."""
        if not self.cluster:
            return {"mode": "embedded", "storage_root": self.storage_root}
        from index.storage.cluster.blobs import redact_store_url
        from index.storage.cluster.pg.db import redact_url

        assert self.database_url is not None and self.object_store_url is not None
        return {
            "mode": "cluster",
            "database": redact_url(self.database_url),
            "object_store": redact_store_url(self.object_store_url),
        }


@dataclass(frozen=True)
class LibraryData:
    """How to reach one library's data, whichever the backend."""

    label: str
    #: Opens the library's record store (``readonly``: what readers open). The caller closes it.
    open_store: Callable[[bool], RecordStore]
    snapshots: Snapshots


def local_library(library_dir: str | Path, label: str | None = None) -> LibraryData:
    """An embedded library's (or shard's) data, by its directory."""
    path = Path(library_dir)
    return LibraryData(
        label=label or path.name,
        open_store=lambda readonly: LibraryStore(path, readonly=readonly),
        snapshots=LocalSnapshots(path, label),
    )


def _shard_state(data: LibraryData, config: IndexConfig) -> tuple[int, str, dict[str, Any] | None]:
    """One shard's live count, index kind now and recall calibration (no snapshot: replicas replay every
    row into an exact table, which is a flat index)."""
    store = data.open_store(True)
    try:
        count = store.count()
    finally:
        store.close()
    manifest = data.snapshots.read_manifest()
    calibration = None
    if manifest is not None and manifest.calibration is not None:
        calibration = Calibration.from_dict(manifest.calibration).describe(config.recall_target, config)
    return count, "flat" if manifest is None else manifest.index_kind, calibration


def describe_library(
    info: LibraryInfo, shards: list[LibraryData], config: IndexConfig = DEFAULT_CONFIG
) -> dict[str, Any]:
    """The API's library object: the image count from the stores, the index kind and its recall
    calibration from the current snapshots' manifests.

    A sharded library reports the sum of its shards' counts, the kind they share (``mixed`` when they
    differ, e.g. one shard crossed ``hnsw_min_rows`` before the others) and each shard's own state under
    ``index.search.sharding``."""
    states = [_shard_state(data, config) for data in shards]
    if len(states) == 1:
        count, kind, calibration = states[0]
        return library_object(info, count, kind, calibration)
    kinds = {kind for _, kind, _ in states}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    described = library_object(info, sum(c for c, _, _ in states), kind)
    described["index"]["shards"] = [
        {"shard": k, "image_count": count, "kind": kind}
        | ({"search_calibration": calibration} if calibration is not None else {})
        for k, (count, kind, calibration) in enumerate(states)
    ]
    return described


class Storage:
    """The data of one deployment. Open with :func:`open_storage`; close when the replica stops."""

    catalog: LibraryCatalog
    settings: StorageSettings

    def library(self, info: LibraryInfo, shard: int = 0) -> LibraryData:
        """One shard's data (shard 0 of a 1-shard library is the whole library).

        Raises:
            ValueError: ``shard`` is not one of the library's shards.
        """
        raise NotImplementedError

    def shards(self, info: LibraryInfo) -> list[LibraryData]:
        """Every shard's data, in shard order."""
        return [self.library(info, k) for k in range(info.shards)]

    def task_store(self, *, max_errors: int) -> TaskStorage:
        raise NotImplementedError

    def delete_library(self, name: str) -> None:
        """Delete a library with its records, frames and snapshots. Raises LibraryNotFound."""
        self.catalog.delete(name)

    def describe(self, info: LibraryInfo, config: IndexConfig = DEFAULT_CONFIG) -> dict[str, Any]:
        return describe_library(info, self.shards(info), config)

    def close(self) -> None:
        """Release connections (idempotent)."""


class EmbeddedStorage(Storage):
    """SQLite and files under ``storage_root``: one machine (or one node's local disk)."""

    def __init__(self, settings: StorageSettings, *, max_libraries: int = 1000) -> None:
        self.settings = settings
        self.root = Path(settings.storage_root)
        self.catalog = self._catalog = Catalog(self.root, max_libraries=max_libraries)

    def library(self, info: LibraryInfo, shard: int = 0) -> LibraryData:
        _check_shard(info, shard)
        path = shard_dirs(self._catalog.library_dir(info.name), info.shards)[shard]
        return local_library(path, None if info.shards == 1 else f"{info.name}/shard-{shard}")

    def task_store(self, *, max_errors: int) -> TaskStorage:
        from index.storage.embedded.tasks import TaskStore

        return TaskStore(self.root, max_errors=max_errors)


class ClusterStorage(Storage):
    """PostgreSQL (catalog, records, tasks) + an object store (snapshots, frames) + a node-local cache.

    Opening it checks both ends (``BlobStore.check``, ``index.storage.cluster.pg.connect``): a replica with a
    wrong password or a missing bucket fails at once with the reason, instead of serving errors later.
    """

    def __init__(self, settings: StorageSettings, *, max_libraries: int = 1000) -> None:
        from index.storage.cluster.blobs import BlobStore
        from index.storage.cluster.pg import PgCatalog, connect, read_password

        assert settings.database_url is not None and settings.object_store_url is not None
        self.settings = settings
        password = read_password(
            password_file=settings.database_password_file, password_env=settings.database_password_env
        )
        self.blobs = BlobStore.open(settings.object_store_url, settings.object_store_options)
        self.blobs.check()
        self.db = connect(
            settings.database_url,
            password=password,
            max_size=settings.database_pool_size,
            connect_timeout=settings.database_connect_timeout_s,
        )
        self.catalog = self._catalog = PgCatalog(self.db, max_libraries=max_libraries)
        self.cache_dir = Path(settings.cache_dir or os.path.join(tempfile.gettempdir(), "image-search-cache"))

    def _library_blobs(self, uid: str) -> BlobStore:
        from index.storage.cluster.blobs import library_blobs

        return library_blobs(self.blobs, uid)

    def library(self, info: LibraryInfo, shard: int = 0) -> LibraryData:
        from index.storage.cluster.objsnap import ObjectSnapshots
        from index.storage.cluster.pg import PgLibraryStore

        _check_shard(info, shard)
        # PgLibraryStore keeps its frames under frames/ of these blobs, the snapshots are snapshots/:
        # libraries/<uid>/ for a 1-shard library (as before shards existed), .../shards/<k>/ otherwise.
        blobs = self._library_blobs(info.uid)
        cache = self.cache_dir / info.uid
        if info.shards > 1:
            blobs = blobs.child(f"shards/{shard}")
            cache = cache / "shards" / str(shard)
        label = info.shard_key(shard)
        return LibraryData(
            label=label,
            open_store=lambda readonly: PgLibraryStore(
                self.db, info.uid, shard, readonly=readonly, frames=blobs
            ),
            snapshots=ObjectSnapshots(
                blobs.child("snapshots"), cache, label=label, grace_s=self.settings.snapshot_grace_s
            ),
        )

    def task_store(self, *, max_errors: int) -> TaskStorage:
        from index.storage.cluster.pg import PgTaskStore

        return PgTaskStore(self.db, max_errors=max_errors)

    def delete_library(self, name: str) -> None:
        uid = self._catalog.delete_library(name)  # records and tasks go with the row (ON DELETE CASCADE)
        # Then the blobs: a crash here leaves a prefix no library names, removed by collect_orphans.
        self._library_blobs(uid).delete_prefix("")

    def collect_orphans(self) -> int:
        """Delete the blobs of libraries that no longer exist (a delete interrupted between the database
        and the object store). Returns the prefixes removed; the Writer calls it when it starts."""
        live = {info.uid for info in self._catalog.list()}
        libraries = self.blobs.child("libraries")
        removed = 0
        for uid in libraries.list():
            uid = uid.rstrip("/").rsplit("/", 1)[-1]
            if uid and uid not in live:
                libraries.child(uid).delete_prefix("")
                removed += 1
        if removed:
            logger.info("removed the blobs of %d deleted libraries", removed)
        return removed

    def close(self) -> None:
        self.db.close()


def _check_shard(info: LibraryInfo, shard: int) -> None:
    if not 0 <= shard < info.shards:
        raise ValueError(f"shard {shard} is not a shard of library {info.name!r} (it has {info.shards})")


def open_storage(settings: StorageSettings, *, max_libraries: int = 1000) -> Storage:
    """The storage the settings describe (``ClusterStorage`` when ``database_url`` is set).

    Raises:
        index.storage.cluster.pg.DatabaseUnavailable, index.storage.cluster.blobs.StorageUnavailable,
        index.storage.schema.SchemaTooNew, ValueError: cluster storage that cannot be used, with the reason
        (credentials never shown).
    """
    if settings.cluster:
        return ClusterStorage(settings, max_libraries=max_libraries)
    return EmbeddedStorage(settings, max_libraries=max_libraries)
