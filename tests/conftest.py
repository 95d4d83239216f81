"""Fixtures shared by every test package: a throwaway PostgreSQL server (tests/pg_server.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.pg_server import PgServer, find_bindir


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session, stopped (and its files removed) at the end.

    Skips, loudly, only when Debian's ``postgresql`` package is not installed (``.ci/run`` installs it).
    """
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL tests SKIPPED: no /usr/lib/postgresql/*/bin/initdb; install Debian's postgresql "
            "package (apt-get install postgresql) to run them"
        )
    server = PgServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A URL whose connections see an empty schema of their own (dropped after the test)."""
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield pg_server.url(options=f"-csearch_path={schema}")
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
