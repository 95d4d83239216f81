"""Embedded storage: one machine, SQLite databases and files under ``storage_root``.

- ``catalog``: ``Catalog`` (``catalog.json``), and the backend-neutral ``LibraryInfo`` and ``CatalogBase``
  that the PostgreSQL catalog derives from.
- ``store``: ``LibraryStore``, a library's records in SQLite (WAL, ``synchronous=FULL``), frames on disk,
  and the record types (``NewRecord``, ``StoredRecord``) every record store takes and returns.
- ``snapshot``: the snapshot format and ``LocalSnapshots`` on local files.
- ``tasks``: ``TaskStore``, import tasks in ``tasks.sqlite``; ``durable``: the fsync helpers.
"""

from __future__ import annotations

from typing import Any

from index import lazy_export

_EXPORTS = {
    "Catalog": "catalog",
    "CatalogBase": "catalog",
    "LibraryInfo": "catalog",
    "LibraryStore": "store",
    "NewRecord": "store",
    "StoredRecord": "store",
    "LocalSnapshots": "snapshot",
    "Manifest": "snapshot",
    "Snapshots": "snapshot",
    "TaskStore": "tasks",
    "fsync_dir": "durable",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
