"""Cluster mode with a bad configuration fails ``build_app`` (the deploy), at once, with the reason, and
never shows the database password. No Ray: ``build_app`` only binds the graph, and opens the storage
once in cluster mode to fail fast."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import ValidationError

from deployments.app import build_app
from deployments.config import AppArgs
from index.storage.cluster.blobs import StorageUnavailable
from index.storage.cluster.pg import DatabaseUnavailable
from index.storage.schema import SchemaTooNew
from tests.pg_server import PgServer, free_port
from tests.s3_server import S3

SECRET = "s3cr3t-Pa55word"  # a password no message may show


@pytest.fixture
def object_store(tmp_path: Path) -> str:
    """A usable object store (a file:// directory) for the tests about the database."""
    return (tmp_path / "objects").as_uri()


def cluster_args(database_url: str, object_store_url: str, **more: Any) -> dict[str, Any]:
    return {
        "model": "tiny-random",
        "database_url": database_url,
        "object_store_url": object_store_url,
        "database_connect_timeout_s": 2,
        **more,
    }


def without_password(pg_server: PgServer, url: str) -> str:
    return url.replace(f":{quote(pg_server.password, safe='')}@", "@")


def test_an_unreachable_database_is_named_within_the_timeout(object_store: str) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://app:{SECRET}@127.0.0.1:{port}/app"
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as err:
        build_app(cluster_args(url, object_store))
    assert time.monotonic() - started < 30  # database_connect_timeout_s: 2, not a hang
    message = str(err.value)
    assert f"127.0.0.1:{port}/app" in message and SECRET not in message


@pytest.mark.parametrize("where", ["url", "file", "env"])
def test_a_wrong_password_is_named_as_such_and_never_shown(
    where: str, pg_server: PgServer, object_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_server.url(password=SECRET)
    more: dict[str, Any] = {}
    if where == "file":
        (tmp_path / "pw").write_text(SECRET + "\n")
        url, more = (
            without_password(pg_server, pg_server.url()),
            {"database_password_file": str(tmp_path / "pw")},
        )
    elif where == "env":
        monkeypatch.setenv("TEST_DB_PASSWORD", SECRET)
        url, more = (
            without_password(pg_server, pg_server.url()),
            {"database_password_env": "TEST_DB_PASSWORD"},
        )
    with pytest.raises(DatabaseUnavailable) as err:
        build_app(cluster_args(url, object_store, **more))
    message = str(err.value)
    assert "password authentication failed" in message
    assert SECRET not in message and pg_server.password not in message


def test_a_missing_password_file_is_named(pg_server: PgServer, object_store: str, tmp_path: Path) -> None:
    missing = tmp_path / "secrets" / "db-password"
    url = without_password(pg_server, pg_server.url())
    with pytest.raises(ValueError, match="password file") as err:
        build_app(cluster_args(url, object_store, database_password_file=str(missing)))
    assert str(missing) in str(err.value)


def test_a_missing_bucket_is_named(pg_url: str, s3_server: S3) -> None:
    args = cluster_args(pg_url, "s3://no-such-bucket/prod", object_store_options=s3_server.storage_options)
    with pytest.raises(StorageUnavailable, match="no-such-bucket"):
        build_app(args)


def test_a_database_of_a_newer_schema_is_refused(pg_url: str, object_store: str) -> None:
    from index.storage.cluster.pg import connect

    with connect(pg_url) as db, db.transaction() as conn:
        conn.execute("INSERT INTO schema_version (version, service, applied_at) VALUES (99, '9.9.0', 0)")
    with pytest.raises(SchemaTooNew) as err:
        build_app(cluster_args(pg_url, object_store))
    assert err.value.found == 99
    assert "schema version 99" in str(err.value) and "9.9.0" in str(err.value)


def test_database_url_without_object_store_url_names_the_missing_field(pg_server: PgServer) -> None:
    with pytest.raises(ValueError, match="object_store_url is not set") as err:
        build_app({"model": "tiny-random", "database_url": pg_server.url(password=SECRET)})
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="database_url is not set"):
        build_app({"model": "tiny-random", "object_store_url": "s3://bucket/prefix"})


@pytest.mark.parametrize(
    "bad",
    [
        {"database_pool_size": 0},
        {"database_connect_timeout_s": -1},
        {"database_url": ["not", "a", "string"], "database_password_file": SECRET},
        {"unknown_field": SECRET},
        {"object_store_url": None},
    ],
)
def test_argument_errors_never_show_the_password(bad: dict[str, Any]) -> None:
    args = {
        "model": "tiny-random",
        "database_url": f"postgresql://app:{SECRET}@db:5432/app",
        "object_store_url": "s3://bucket/prefix",
        "object_store_options": {"secret": SECRET},
        **bad,
    }
    try:
        AppArgs.model_validate(args)
    except ValidationError as exc:
        assert SECRET not in str(exc) and SECRET not in repr(exc.errors(include_input=False))
    else:
        pytest.fail(f"{bad} was accepted")
