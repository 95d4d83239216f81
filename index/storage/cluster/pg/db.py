"""The PostgreSQL connection pool and schema: one database holds the catalog, every library's records
and the import tasks (frames and snapshots are blobs on the object store: `index.storage.cluster.blobs`).

:func:`connect` checks the server first with one plain connection, so a bad configuration fails at
start with the server's own reason (refused, unknown host, wrong password, missing database) within
``connect_timeout`` instead of leaving a replica waiting on a pool that never fills; it then migrates
the schema (or refuses a newer one) and opens the pool. URLs are logged and put into errors only through
:func:`redact_url`: a password never reaches a log line.

Schema versions: the ``schema_version`` table has one row per migration step applied, with the release
of the service that applied it. Version 0 is an empty database. Migrations run under a transaction-level
advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from index.errors import Unavailable
from index.storage.schema import SERVICE_VERSION, check_not_newer

logger = logging.getLogger(__name__)

#: Keys of ``pg_advisory_xact_lock``: arbitrary constants, the same in every process of the service.
MIGRATION_LOCK = 0x1A6E5EA1
CATALOG_LOCK = 0x1A6E5EA2
CLAIM_LOCK = 0x1A6E5EA3

#: ``STEPS[i]`` takes the database from version ``i`` to ``i + 1`` (one script, no parameters).
STEPS: tuple[str, ...] = (
    """
CREATE TABLE libraries (
    uid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    info JSONB NOT NULL,
    dim INTEGER NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE records (
    row_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    library_uid TEXT NOT NULL REFERENCES libraries (uid) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    image_uri TEXT NOT NULL,
    tags JSONB NOT NULL,
    vector BYTEA,
    vector_kind TEXT NOT NULL,
    frame TEXT,
    extra JSONB,
    seq BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (library_uid, image_id, image_uri)
);
CREATE INDEX records_by_seq ON records (library_uid, seq);
CREATE INDEX records_by_frame ON records (library_uid, frame) WHERE frame IS NOT NULL;
CREATE TABLE frames (
    library_uid TEXT NOT NULL REFERENCES libraries (uid) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (library_uid, sha256)
);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    library_name TEXT NOT NULL,
    library_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    save_image BOOLEAN NOT NULL,
    state TEXT NOT NULL,
    total BIGINT,
    lines_done BIGINT NOT NULL DEFAULT 0,
    succeeded BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    owner TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX tasks_by_state ON tasks (state, created_at);
CREATE TABLE task_errors (
    task_id TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    line BIGINT NOT NULL,
    image_id TEXT,
    image_uri TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (task_id, line)
);
CREATE TABLE runners (
    owner TEXT PRIMARY KEY,
    heartbeat_at DOUBLE PRECISION NOT NULL
);
""",
    # 2: frames moved to the object store (index.storage.cluster.pg.store); no deployment ever stored one in
    # the table
    """
DROP TABLE frames;
""",
    # 3: sharded libraries. Shard 0 of every library keeps the library's row as its lock
    # and seq (so existing libraries need no data change); shard k >= 1 locks its row here. Records say
    # their shard; the catch-up index leads with it.
    """
CREATE TABLE library_shards (
    library_uid TEXT NOT NULL REFERENCES libraries (uid) ON DELETE CASCADE,
    shard INTEGER NOT NULL CHECK (shard >= 1),
    last_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (library_uid, shard)
);
ALTER TABLE records ADD COLUMN shard INTEGER NOT NULL DEFAULT 0;
DROP INDEX records_by_seq;
CREATE INDEX records_by_seq ON records (library_uid, shard, seq);
""",
)
SCHEMA_VERSION = len(STEPS)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used: unreachable, refused the credentials, or no such database."""


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """A failure of the connection or the server (SQLSTATE class 08, an administrator's shutdown, a
    server starting up), not of the statement (a serialization failure, a cancelled query)."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


#: Connection parameters (libpq's names) whose values are secrets: shown as ``***``.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
#: What :func:`redact_url` shows for a string libpq cannot parse (any part of it could be the password).
UNPARSABLE = "(a connection string that libpq cannot parse)"
#: ... and for one whose host, port or database name holds what looks like the rest of a password.
MISTYPED = (
    "(a postgresql:// URL with '@' or '/' in its host, port or database name: percent-encode them in the "
    "password)"
)


def redact_url(url: str) -> str:
    """``url`` (a ``postgresql://`` URI or a ``key=value`` string) as logs, messages and /health show it.

    The shown form is rebuilt as a URI from what libpq itself parses out of ``url`` (psycopg's
    ``conninfo_to_dict``), with the password and the other :data:`SECRET_PARAMETERS` replaced by
    ``***``: a password is hidden wherever libpq finds one, in the userinfo (where it ends only at
    ``@``, so ``#``, ``?`` and ``%`` belong to it) or in a query parameter, whose name may itself be
    percent-encoded (``?passwor%64=``). A string libpq cannot parse is not shown at all (:data:`UNPARSABLE`),
    nor one where libpq's reading puts an ``@`` into a host or the database name or a non-number into a
    port (:data:`MISTYPED`): that is a password with an unencoded ``@`` or ``/`` (``svc:pa/ss@db``, which
    libpq reads as host ``svc``, port ``pa``), and its rest would be shown as the host.
    """
    try:
        parsed = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return UNPARSABLE
    params = {k: str(v) for k, v in parsed.items() if v is not None}  # libpq's values are all text
    user = params.pop("user", None)
    password = params.pop("password", None)
    hosts = params.pop("host", "").split(",")
    ports = params.pop("port", "").split(",")
    dbname = params.pop("dbname", None)
    if any("@" in h for h in hosts) or "@" in (dbname or "") or not all(p.isdigit() for p in ports if p):
        return MISTYPED
    userinfo = ""
    if user is not None or password is not None:
        userinfo = quote(user or "", safe="") + (":***" if password is not None else "") + "@"
    if len(ports) == 1 and ports[0]:
        ports *= len(hosts)  # libpq: one port applies to every host
    if len(ports) != len(hosts):  # libpq refuses this when connecting; show what was given
        params["port"] = ",".join(ports)
        ports = [""] * len(hosts)
    netloc = ",".join(
        _shown_host(h) + (f":{quote(p, safe='')}" if p else "") for h, p in zip(hosts, ports, strict=True)
    )
    path = "" if dbname is None else "/" + quote(dbname, safe="")
    query = "&".join(
        f"{quote(k, safe='')}={'***' if k in SECRET_PARAMETERS else quote(v, safe='')}"
        for k, v in params.items()
    )
    return f"postgresql://{userinfo}{netloc}{path}" + (f"?{query}" if query else "")


def _shown_host(host: str) -> str:
    return f"[{host}]" if ":" in host else quote(host, safe="")


def read_password(*, password_file: str | None = None, password_env: str | None = None) -> str | None:
    """The database password kept out of the URL: the content of ``password_file`` (e.g. a mounted
    Kubernetes Secret; one trailing newline dropped) or of the environment variable named ``password_env``.

    Returns:
        None when neither is given (the URL carries the password, or the server needs none).
    Raises:
        ValueError: both are given, or the file or variable is missing or empty; the message names the
            file or variable, never its content.
    """
    if password_file is not None and password_env is not None:
        raise ValueError("give the database password in a file or in an environment variable, not both")
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise ValueError(
                f"cannot read the database password file {password_file}: {exc.strerror}"
            ) from None
        if not password:
            raise ValueError(f"the database password file {password_file} is empty")
        return password
    if password_env is not None:
        password = os.environ.get(password_env, "")
        if not password:
            raise ValueError(f"the environment variable {password_env} (the database password) is not set")
        return password
    return None


class Database:
    """A connection pool to one PostgreSQL database whose schema is current. Made by :func:`connect`.

    ``transaction()`` lends a pooled connection inside one transaction: committed when the block ends,
    rolled back when it raises.
    """

    def __init__(self, pool: ConnectionPool, url: str, *, wait_s: float = 10.0) -> None:
        self.pool = pool
        #: The URL without its password (for logs and messages).
        self.url = redact_url(url)
        #: How long a caller waits for a pooled connection before the database counts as unavailable.
        self.wait_s = wait_s

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in one transaction.

        Raises:
            index.errors.Unavailable: (503 for clients) no connection within ``wait_s``, or the
                connection broke (server down or restarting); details go to the log, not the client.
        """
        try:
            with self.pool.connection(timeout=self.wait_s) as conn, conn.transaction():
                yield conn
        except PoolTimeout:
            logger.error("no connection to PostgreSQL %s within %.0fs", self.url, self.wait_s)
            raise Unavailable("the database is unavailable; retry later") from None
        except psycopg.OperationalError as exc:
            if not _connection_lost(exc):
                raise
            logger.error("PostgreSQL %s: connection lost: %s", self.url, exc)
            raise Unavailable("the database is unavailable; retry later") from None

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    database_url: str,
    *,
    password: str | None = None,
    min_size: int = 1,
    max_size: int = 8,
    connect_timeout: float = 10.0,
) -> Database:
    """Open a pool to ``database_url`` after checking the server and bringing the schema up to date.

    Args:
        database_url: ``postgresql://user[:password]@host:port/db`` or a libpq ``key=value`` string.
        password: the password, when it is kept out of the URL (a secret file or variable).
        min_size, max_size: connections the pool keeps open at least and opens at most.
        connect_timeout: seconds allowed to reach the server (libpq counts whole seconds, at least 2).

    Raises:
        DatabaseUnavailable: the server cannot be reached in time, refuses the credentials, or lacks
            the database; the message carries the server's reason and the URL without its password.
        ValueError: ``database_url`` cannot be parsed, or holds an unencoded ``@`` or ``/`` in its
            password (see :func:`redact_url`); the message does not repeat it.
        SchemaTooNew: the database was migrated by a newer release of the service.
    """
    kwargs: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "application_name": "image-search",
    }
    if password is not None:
        kwargs["password"] = password
    shown = redact_url(database_url)
    if shown == MISTYPED:  # libpq would fail on it with a message quoting the password's pieces
        raise ValueError(f"database_url is {MISTYPED[1:-1]}")
    started = time.monotonic()
    try:
        with psycopg.connect(database_url, **kwargs) as conn:
            migrate(conn, f"PostgreSQL database {shown}")
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot use PostgreSQL database {shown}: {exc}".strip()) from None
    except psycopg.ProgrammingError:  # libpq's message (and a redaction of what it cannot parse) may
        # still show the password: name no part of the string
        raise ValueError(
            "database_url is neither a postgresql://user@host:port/db URL nor a key=value connection string"
        ) from None
    pool = ConnectionPool(
        database_url,
        kwargs=kwargs,
        min_size=min_size,
        max_size=max_size,
        open=False,
        check=ConnectionPool.check_connection,  # a connection broken by a server restart is replaced
        name="image-search",
    )
    pool.open(wait=True, timeout=max(connect_timeout, 2.0))
    logger.info(
        "connected to PostgreSQL %s (schema version %d) in %.2fs",
        shown,
        SCHEMA_VERSION,
        time.monotonic() - started,
    )
    return Database(pool, database_url, wait_s=max(connect_timeout, 2.0))


def migrate(conn: psycopg.Connection[Any], what: str, steps: tuple[str, ...] = STEPS) -> int:
    """Bring the database behind ``conn`` to ``len(steps)``, or refuse it when it is newer.

    Returns:
        The version the database was at.
    Raises:
        SchemaTooNew: nothing was changed.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, service TEXT NOT NULL,"
            " applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute(
            "SELECT version, service FROM schema_version ORDER BY version DESC LIMIT 1"
        ).fetchone()
        found = 0 if row is None else int(row[0])
        check_not_newer(what, found, len(steps), None if row is None else str(row[1]))
        for version in range(found, len(steps)):
            conn.execute(steps[version].encode())  # bytes: a script of several statements, no parameters
            conn.execute(
                "INSERT INTO schema_version (version, service, applied_at) VALUES (%s, %s, %s)",
                (version + 1, SERVICE_VERSION, time.time()),
            )
    if found < len(steps):
        logger.info("migrated %s from schema version %d to %d", what, found, len(steps))
    return found
