"""Schema versions of the durable stores, and the one rule every backend applies when it opens one.

Each store carries the version of its schema: a SQLite database in ``PRAGMA user_version`` (0, the
default, is the schema from before versions existed), a PostgreSQL database in its ``schema_version``
table (see ``index/storage/cluster/pg/db.py``), the catalog's directory layout in ``<root>/catalog.json``.
Every migration step also records which release of the service applied it (the ``schema_history`` table of a
SQLite database, the ``service`` column of ``schema_version``), so that an older release refusing a
newer store can say which release it needs.

The rule on open: an older store is migrated, step by step, in one transaction; the current version is
used as it is; a newer one is refused with :class:`SchemaTooNew`, before anything is read or written.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sqlite3
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def _service_version() -> str:
    try:
        return importlib.metadata.version("image-search")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


#: The release of this service, as recorded next to every migration it applies.
SERVICE_VERSION = _service_version()


class SchemaTooNew(RuntimeError):
    """A store was written by a newer release of the service; this one must not touch it.

    Args:
        what: the store and where it is (never a password: see ``index.storage.cluster.pg.db.redact_url``).
        found: the store's schema version.
        supported: the newest version this release knows.
        written_by: the release that migrated the store to ``found``, when the store says.
    """

    def __init__(self, what: str, found: int, supported: int, written_by: str | None) -> None:
        super().__init__(what, found, supported, written_by)
        self.found, self.supported, self.written_by = found, supported, written_by
        need = (
            f"image-search {written_by} or newer"
            if written_by
            else f"the newer image-search that wrote it (one that knows schema version {found})"
        )
        self.message = (
            f"{what} has schema version {found}"
            + (f", written by image-search {written_by}" if written_by else "")
            + f"; this is image-search {SERVICE_VERSION}, which knows versions up to {supported}: run {need}"
        )

    def __str__(self) -> str:
        return self.message


def check_not_newer(what: str, found: int, supported: int, written_by: str | None) -> None:
    """Raise :class:`SchemaTooNew` when ``found > supported``."""
    if found > supported:
        raise SchemaTooNew(what, found, supported, written_by)


#: Version 1's step in every SQLite database: the history of migrations, with the release that ran each.
SQLITE_HISTORY = """
CREATE TABLE IF NOT EXISTS schema_history (
    version INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    applied_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class SqliteSchema:
    """The migration steps of one kind of SQLite database.

    ``steps[i]`` takes a database from version ``i`` to ``i + 1`` (statements separated by ``;``, no
    ``;`` inside one). Step 0 is the schema from before versions existed, written with ``IF NOT EXISTS``
    plus :data:`SQLITE_HISTORY`: it creates a new database and merely stamps an old one.
    """

    what: str
    steps: tuple[str, ...]

    @property
    def version(self) -> int:
        return len(self.steps)


def open_sqlite_schema(conn: sqlite3.Connection, schema: SqliteSchema, where: str) -> int:
    """Bring the database behind ``conn`` (autocommit mode) to ``schema.version``.

    A database at the current version costs one pragma read and takes no lock, so readers may call
    this on every open. An older one is migrated in one ``BEGIN IMMEDIATE`` transaction (the version is
    read again inside it: two processes opening it at once migrate it once).

    Returns:
        The version the database was at when opened.
    Raises:
        SchemaTooNew: the database was written by a newer release; nothing was changed.
    """
    found = _user_version(conn)
    if found == schema.version:
        return found
    what = f"{schema.what} {where}"
    if found > schema.version:
        check_not_newer(what, found, schema.version, _sqlite_written_by(conn, found))
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _user_version(conn)
        check_not_newer(what, found, schema.version, _sqlite_written_by(conn, found))
        for version in range(found, schema.version):
            for statement in schema.steps[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO schema_history (version, service, applied_at) VALUES (?, ?, ?)",
                (version + 1, SERVICE_VERSION, time.time()),
            )
        # user_version lives in the database header, which the transaction covers like any page.
        conn.execute(f"PRAGMA user_version = {int(schema.version)}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    # From 0 is a new database being created or a pre-version one being stamped: routine.
    logger.log(
        logging.DEBUG if found == 0 else logging.INFO,
        "migrated %s from schema version %d to %d",
        what,
        found,
        schema.version,
    )
    return found


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _sqlite_written_by(conn: sqlite3.Connection, version: int) -> str | None:
    try:
        row = conn.execute("SELECT service FROM schema_history WHERE version = ?", (version,)).fetchone()
    except sqlite3.Error:  # a future release may have reshaped its history: the version alone must do
        return None
    return None if row is None else str(row[0])
