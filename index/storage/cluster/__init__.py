"""Cluster storage: PostgreSQL (``pg/``: catalog, records, tasks) and an object store (``blobs``: one
fsspec API; ``objsnap``: snapshots published there and cached per node), so that no process reads a path
another node writes. Needs the ``cluster`` extra; nothing here is imported in embedded mode.
"""

from __future__ import annotations

from typing import Any

from index import lazy_export

_EXPORTS = {
    "BlobStore": "blobs",
    "StorageUnavailable": "blobs",
    "library_blobs": "blobs",
    "ObjectSnapshots": "objsnap",
    "PgCatalog": "pg",
    "PgLibraryStore": "pg",
    "PgTaskStore": "pg",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
