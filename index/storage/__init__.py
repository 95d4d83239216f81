"""Storage, floor 4: where a deployment keeps libraries, records, snapshots and import tasks.

- ``interfaces``: the three protocols every backend implements (``LibraryCatalog``, ``RecordStore``,
  ``TaskStorage``); ``tasks``: the task records and rules both task stores share.
- ``backends``: ``StorageSettings`` -> ``open_storage`` -> an ``EmbeddedStorage`` or a ``ClusterStorage``,
  the one object the deployments ask for a library's data (``LibraryData``) and the task store.
- ``schema``: schema versions of every database; ``migrate``: embedded -> cluster (``image-search-migrate``).
- ``embedded/``: SQLite and files under one directory; ``cluster/``: PostgreSQL and an object store.

Names load on first use (``index.lazy_export``): embedded mode never imports psycopg or fsspec's backends.
"""

from __future__ import annotations

from typing import Any

from index import lazy_export

_EXPORTS = {
    "LibraryCatalog": "interfaces",
    "RecordStore": "interfaces",
    "TaskStorage": "interfaces",
    "LineError": "tasks",
    "LostOwnership": "tasks",
    "Task": "tasks",
    "ClusterStorage": "backends",
    "EmbeddedStorage": "backends",
    "LibraryData": "backends",
    "Storage": "backends",
    "StorageSettings": "backends",
    "describe_library": "backends",
    "local_library": "backends",
    "open_storage": "backends",
    "SERVICE_VERSION": "schema",
    "SchemaTooNew": "schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
