"""Fixtures shared by every test package: a throwaway PostgreSQL server (tests/pg_server.py) and an
S3-compatible server (tests/s3_server.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.pg_server import PgServer, find_bindir
from tests.s3_server import S3, running_s3


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    """One moto S3 server for the session (bucket ``image-search``; tests that need an empty one take
    ``S3.new_bucket()``). Skips, loudly, only when moto or s3fs is not installed (the ``test`` extra)."""
    for module in ("moto.server", "s3fs"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"S3 tests SKIPPED: {module} is not installed; install the test extra to run them")
    with running_s3() as server:
        yield server
