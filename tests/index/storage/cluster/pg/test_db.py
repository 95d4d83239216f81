"""index.storage.cluster.pg.db: clear errors at start (unreachable, wrong password, missing database, newer
schema), migrations, and URLs that never show their password."""

from __future__ import annotations

import socket
import threading

import psycopg
import pytest

from index.storage.cluster.pg.db import (
    MISTYPED,
    STEPS,
    UNPARSABLE,
    DatabaseUnavailable,
    connect,
    migrate,
    read_password,
    redact_url,
)
from index.storage.schema import SERVICE_VERSION, SchemaTooNew
from tests.pg_server import free_port


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("postgresql://app:p%40ss@db/x?sslmode=require", "postgresql://app:***@db/x?sslmode=require"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("postgresql://db/x?user=app&password=s3cret", "postgresql://app:***@db/x"),
        ("host=db user=app password=s3cret dbname=x", "postgresql://app:***@db/x"),
        ("host=db password='s3 cret' dbname=x", "postgresql://:***@db/x"),
        # issue 26: libpq ends a password only at '@' (urlsplit stopped at '#' and '?')
        ("postgresql://svc:s3cr#t@db/images", "postgresql://svc:***@db/images"),
        ("postgresql://svc:pa?ss@db/images", "postgresql://svc:***@db/images"),
        ("postgresql://svc:50%25off@db/images", "postgresql://svc:***@db/images"),
        ("postgresql://svc:a%40b%2Fc@db/images", "postgresql://svc:***@db/images"),
        # ... and reads query parameters with percent-encoded names
        ("postgresql://svc@db/images?passwor%64=s3cret", "postgresql://svc:***@db/images"),
        (
            "postgresql://db/images?%70assword=s3cret&sslpassword=k3y",
            "postgresql://:***@db/images?sslpassword=***",
        ),
        (
            "postgresql://svc@h1:5432,h2:5433/x?application_name=a%20b",
            "postgresql://svc@h1:5432,h2:5433/x?application_name=a%20b",
        ),
        ("postgresql://svc@%2Fvar%2Frun%2Fpostgresql/x", "postgresql://svc@%2Fvar%2Frun%2Fpostgresql/x"),
        ("postgresql://svc:s3cret@[::1]:5432/x", "postgresql://svc:***@[::1]:5432/x"),
        # an unencoded '@' or '/' in the password: libpq reads its rest as host, port or database name
        ("postgresql://svc:s3@cret@db/x", MISTYPED),
        ("postgresql://svc:s3/cret@db/x", MISTYPED),
        ("postgresql://svc:123/456@db/x", MISTYPED),
        # what libpq cannot parse is not shown at all
        ("mysql://app:s3cret@db/x", UNPARSABLE),
        ("postgresql://db/x?password=s3cret%zz", UNPARSABLE),
        ("host=db password=s3 cret", UNPARSABLE),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for piece in ("s3", "cret", "k3y", "456"):
        assert piece not in redact_url(url)


def test_a_password_with_an_unencoded_at_sign_is_refused_before_libpq_quotes_it() -> None:
    with pytest.raises(ValueError, match="percent-encode") as caught:
        connect("postgresql://svc:top/secret@db/x")
    assert "top" not in str(caught.value) and "secret" not in str(caught.value)


def in_thread(fn, limit_s: float = 60.0) -> BaseException | None:
    """Run ``fn`` in a thread and return what it raised; fail if it is still running after ``limit_s``
    (a hang, not a slow call: the calls below are bounded by a 2 s connect timeout)."""
    caught: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            caught[0] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), "connect() hung"
    return caught[0]


def test_nothing_listening_is_a_clear_error(pg_server) -> None:
    url = f"postgresql://app:topsecret@127.0.0.1:{free_port()}/app"
    exc = in_thread(lambda: connect(url, connect_timeout=2))
    assert isinstance(exc, DatabaseUnavailable)
    assert "cannot use PostgreSQL database postgresql://app:***@127.0.0.1" in str(exc)
    assert "refused" in str(exc) and "topsecret" not in str(exc)


@pytest.mark.parametrize("url", ["mysql://app:topsecret@db/x", "host=db password=top secret"])
def test_a_malformed_url_is_refused_without_repeating_its_password(url: str) -> None:
    with pytest.raises(
        ValueError, match="is neither a postgresql://user@host:port/db URL nor a key=value"
    ) as caught:
        connect(url)
    assert "top" not in str(caught.value) and "secret" not in str(caught.value)


def test_a_server_that_never_answers_times_out(pg_server) -> None:
    with socket.socket() as silent:  # accepts connections into its backlog, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"postgresql://app:topsecret@127.0.0.1:{silent.getsockname()[1]}/app"
        exc = in_thread(lambda: connect(url, connect_timeout=2))
    assert isinstance(exc, DatabaseUnavailable) and "timeout" in str(exc).lower()


def test_wrong_password_and_missing_database_are_named(pg_server) -> None:
    exc = in_thread(lambda: connect(pg_server.url(password="not-the-password"), connect_timeout=2))
    assert isinstance(exc, DatabaseUnavailable)
    assert 'password authentication failed for user "app"' in str(exc)
    assert "not-the-password" not in str(exc) and pg_server.password not in str(exc)
    missing = pg_server.url().rsplit("/", 1)[0] + "/nosuchdb"
    exc = in_thread(lambda: connect(missing, connect_timeout=2))
    assert isinstance(exc, DatabaseUnavailable) and 'database "nosuchdb" does not exist' in str(exc)


def test_read_password_from_a_file_or_a_variable(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3 cret\n")
    assert read_password(password_file=str(secret)) == "s3 cret"
    monkeypatch.setenv("DB_PW", "from-env")
    assert read_password(password_env="DB_PW") == "from-env"
    assert read_password() is None
    with pytest.raises(ValueError, match="not both"):
        read_password(password_file=str(secret), password_env="DB_PW")
    with pytest.raises(ValueError, match=f"cannot read the database password file {tmp_path}/nope"):
        read_password(password_file=str(tmp_path / "nope"))
    secret.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_password(password_file=str(secret))
    monkeypatch.delenv("DB_PW")
    with pytest.raises(ValueError, match="DB_PW"):
        read_password(password_env="DB_PW")


def test_password_can_come_apart_from_the_url(pg_server, pg_url, tmp_path) -> None:
    bare = pg_url.replace(f":{pg_server.password}@", "@")
    secret = tmp_path / "pw"
    secret.write_text(pg_server.password + "\n")
    password = read_password(password_file=str(secret))
    with connect(bare, password=password) as db, db.transaction() as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (len(STEPS),)
    assert pg_server.password not in db.url


def test_a_newer_database_is_refused_naming_the_release_it_needs(pg_server, pg_url) -> None:
    connect(pg_url).close()  # creates the current schema
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, '9.9.9', 0)", (len(STEPS) + 1,))
    with pytest.raises(SchemaTooNew) as caught:
        connect(pg_url)
    message = str(caught.value)
    assert f"has schema version {len(STEPS) + 1}, written by image-search 9.9.9" in message
    assert f"knows versions up to {len(STEPS)}" in message and "run image-search 9.9.9 or newer" in message
    assert "PostgreSQL database postgresql://app:***@127.0.0.1" in message
    assert pg_server.password not in message


def test_migration_applies_the_missing_steps_in_one_transaction(pg_url) -> None:
    with psycopg.connect(pg_url) as conn:
        assert migrate(conn, "db") == 0
        assert migrate(conn, "db") == len(STEPS)  # current: nothing to do
        broken = (*STEPS, "ALTER TABLE libraries ADD COLUMN note TEXT; ALTER TABLE nope ADD COLUMN x INT")
        with pytest.raises(psycopg.errors.UndefinedTable):
            migrate(conn, "db", broken)
        conn.rollback()
        columns = "SELECT column_name FROM information_schema.columns WHERE table_name = 'libraries'"
        assert "note" not in {r[0] for r in conn.execute(columns)}  # the half-done step left nothing
        fixed = (*STEPS, "ALTER TABLE libraries ADD COLUMN note TEXT")
        assert migrate(conn, "db", fixed) == len(STEPS)
        assert "note" in {r[0] for r in conn.execute(columns)}
        history = conn.execute("SELECT version, service FROM schema_version ORDER BY version").fetchall()
        assert history == [(v, SERVICE_VERSION) for v in range(1, len(STEPS) + 2)]
        with pytest.raises(SchemaTooNew, match=f"knows versions up to {len(STEPS)}"):
            migrate(conn, "db")


def test_version_2_drops_the_frames_table(pg_url) -> None:
    """Frames moved to the object store (index.storage.cluster.pg.store): a version-1 database loses its
    table."""
    tables = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    with psycopg.connect(pg_url) as conn:
        assert migrate(conn, "db", STEPS[:1]) == 0
        assert "frames" in {r[0] for r in conn.execute(tables)}
        assert migrate(conn, "db", STEPS[:2]) == 1
        assert {r[0] for r in conn.execute(tables)} == {
            "schema_version", "libraries", "records", "tasks", "task_errors", "runners",
        }  # fmt: skip


def test_version_3_adds_shards_and_keeps_existing_libraries_as_they_were(pg_url, tmp_path) -> None:
    """A library written at version 2 is shard 0 of a 1-shard library after step 3: its rows, seq and
    lock row are untouched, and it reads and writes as before."""
    import numpy as np

    from index.storage.cluster.blobs import BlobStore, library_blobs
    from index.storage.cluster.pg import PgLibraryStore
    from index.storage.embedded.store import NewRecord

    with psycopg.connect(pg_url) as conn:
        migrate(conn, "db", STEPS[:2])
        conn.execute(
            "INSERT INTO libraries (uid, name, info, dim, last_seq) VALUES ('u1', 'old', '{}', 2, 7)"
        )
        conn.execute(
            "INSERT INTO records (library_uid, image_id, image_uri, tags, vector, vector_kind, seq,"
            " created_at, updated_at) VALUES ('u1', 'a', 'x', '{}', %s, 'whole', 7, 0, 0)",
            (np.array([1, 0], np.float32).tobytes(),),
        )
        conn.commit()
        assert migrate(conn, "db") == 2
        assert conn.execute("SELECT shard FROM records").fetchall() == [(0,)]
        assert conn.execute("SELECT COUNT(*) FROM library_shards").fetchone() == (0,)
    db = connect(pg_url)
    try:
        store = PgLibraryStore(db, "u1", frames=library_blobs(BlobStore.open(f"file://{tmp_path}"), "u1"))
        assert (store.last_seq(), store.count(), store.get("a")[0].image_uri) == (7, 1, "x")
        store.upsert([NewRecord("b", "y", np.array([0, 1], np.float32))])
        assert [c.seq for c in store.changes_since(0)] == [7, 8]
    finally:
        db.close()


def test_a_database_that_goes_down_is_unavailable_503_not_a_30s_hang() -> None:
    """A server stopped under a running pool: the next transaction is refused with ``Unavailable``
    (503 for clients) within the pool wait, and the client's message names no host; once the server is
    back, the pool reconnects by itself."""
    import time

    from index.errors import Unavailable
    from tests.pg_server import PgServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's binaries are not installed")
    server = PgServer(bindir)
    server.start()
    try:
        db = connect(server.url(), connect_timeout=2)
        with db.transaction() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        server._run("pg_ctl", "-D", str(server.data), "-m", "immediate", "-w", "stop")
        started = time.monotonic()
        with pytest.raises(Unavailable) as info, db.transaction() as conn:
            conn.execute("SELECT 1")
        assert time.monotonic() - started < 20
        assert info.value.message == "the database is unavailable; retry later"
        assert str(server.port) not in str(info.value)
        db.close()
    finally:
        server.stop()
