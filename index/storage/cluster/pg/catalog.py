"""The library catalog in PostgreSQL: the ``libraries`` table, one row per library.

The same interface as ``index.storage.embedded.catalog.Catalog``
(``index.storage.interfaces.LibraryCatalog``). A library's row holds its descriptor (``info``, what
``library.json`` holds on disk), its dim and its ``last_seq``, the row that every write to the library's shard
0 locks (``index/storage/cluster/pg/store.py``); shards 1..S-1 of a sharded library lock their rows of
``library_shards``. Create and delete are single transactions, so there is no staging or trash to clean up;
deleting the row deletes the library's records with it (``ON DELETE CASCADE``); its blobs on the object store
(frames, snapshots) are the caller's to delete once that has committed (:meth:`PgCatalog.delete_library`
returns the uid).
"""

from __future__ import annotations

import json
import logging

import psycopg

from index.errors import LibraryAlreadyExists, LibraryLimitReached, LibraryNotFound
from index.storage.cluster.pg.db import CATALOG_LOCK, Database
from index.storage.embedded.catalog import CatalogBase, LibraryInfo, check_library_name, descriptor

logger = logging.getLogger(__name__)


class PgCatalog(CatalogBase):
    """Creates, lists, describes and deletes libraries in one PostgreSQL database.

    Args:
        db: the pool (``index.storage.cluster.pg.db.connect``); the catalog does not own it.
        max_libraries: the most libraries this deployment holds.
    """

    def __init__(self, db: Database, *, max_libraries: int = 1000) -> None:
        self.db = db
        self.max_libraries = max_libraries

    def _add(self, info: LibraryInfo) -> None:
        try:
            with self.db.transaction() as conn:
                # Creates one at a time: the count below stays true until this one commits.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CATALOG_LOCK,))
                if conn.execute("SELECT 1 FROM libraries WHERE name = %s", (info.name,)).fetchone():
                    raise LibraryAlreadyExists(info.name)
                row = conn.execute("SELECT COUNT(*) FROM libraries").fetchone()
                if row is not None and row[0] >= self.max_libraries:
                    raise LibraryLimitReached(self.max_libraries)
                conn.execute(
                    "INSERT INTO libraries (uid, name, info, dim) VALUES (%s, %s, %s::jsonb, %s)",
                    (info.uid, info.name, json.dumps(descriptor(info)), info.dim),
                )
                # The lock row of each shard past the first (shard 0 locks the library's row, as every
                # library did before shards existed: index/storage/cluster/pg/store.py).
                conn.execute(
                    "INSERT INTO library_shards (library_uid, shard) SELECT %s, generate_series(1, %s)",
                    (info.uid, info.shards - 1),
                )
        except psycopg.errors.UniqueViolation:  # a uid collision: 48 random bits, but say so plainly
            raise LibraryAlreadyExists(info.name) from None

    def add_existing(self, info: LibraryInfo) -> None:
        """Add a library that already exists elsewhere, keeping its descriptor as it is (uid,
        created_at, model, index kind): what ``index.storage.migrate`` copies from an embedded store.

        Raises:
            LibraryAlreadyExists: a library of that name (or with that uid) exists here.
            LibraryLimitReached: this deployment already holds ``max_libraries`` libraries.
        """
        check_library_name(info.name)
        self._add(info)
        logger.info("added library %s (uid %s) as copied", info.name, info.uid)

    def get(self, name: str) -> LibraryInfo:
        """Read a library's descriptor. Raises LibraryNotFound (InvalidParameter for a bad name)."""
        check_library_name(name)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT info::text FROM libraries WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise LibraryNotFound(name)
        return LibraryInfo(**json.loads(row[0]))

    def names(self) -> list[str]:
        with self.db.transaction() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM libraries ORDER BY name")]

    def list(self) -> list[LibraryInfo]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT info::text FROM libraries ORDER BY name").fetchall()
        return [LibraryInfo(**json.loads(r[0])) for r in rows]

    def delete(self, name: str) -> None:
        """Delete a library with every record. Raises LibraryNotFound."""
        self.delete_library(name)

    def delete_library(self, name: str) -> str:
        """Delete a library with every record and return its uid, whose blobs the caller then deletes
        (``index.storage.cluster.blobs.library_blobs(root, uid).delete_prefix("")``): the uid of the row this
        deleted, not of a library looked up before, which may have been replaced meanwhile.

        Raises:
            LibraryNotFound: no library has that name.
        """
        check_library_name(name)
        with self.db.transaction() as conn:
            row = conn.execute("DELETE FROM libraries WHERE name = %s RETURNING uid", (name,)).fetchone()
        if row is None:
            raise LibraryNotFound(name)
        logger.info("deleted library %s", name)
        return str(row[0])

    def empty_trash(self) -> None:
        """Nothing to finish: create and delete are single transactions here."""
