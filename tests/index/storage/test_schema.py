"""Schema versions of the SQLite stores and the catalog: older ones are migrated, newer ones refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from index.storage.embedded import store as store_module
from index.storage.embedded import tasks as tasks_module
from index.storage.embedded.catalog import CATALOG_FILE, LAYOUT_VERSION, Catalog
from index.storage.embedded.store import LibraryStore, NewRecord
from index.storage.embedded.tasks import TaskStore
from index.storage.schema import SERVICE_VERSION, SchemaTooNew, SqliteSchema, open_sqlite_schema

# The schemas exactly as they were before versions existed (version 0): no schema_history table.
V0_STORE = """
CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1), last_seq INTEGER NOT NULL, dim INTEGER NOT NULL);
CREATE TABLE records (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT, image_id TEXT NOT NULL, image_uri TEXT NOT NULL,
    tags TEXT NOT NULL, vector BLOB, vector_kind TEXT NOT NULL, frame TEXT, extra TEXT,
    seq INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, UNIQUE (image_id, image_uri));
CREATE INDEX records_seq ON records (seq);
INSERT INTO state VALUES (1, 7, 4);
INSERT INTO records (image_id, image_uri, tags, vector, vector_kind, seq, created_at, updated_at)
    VALUES ('a', 'u', '{"k": 1}', zeroblob(16), 'whole', 7, 1.0, 1.0);
"""
V0_TASKS = """
CREATE TABLE tasks (task_id TEXT PRIMARY KEY, library_name TEXT NOT NULL, library_uid TEXT NOT NULL,
    source TEXT NOT NULL, save_image INTEGER NOT NULL, state TEXT NOT NULL, total INTEGER,
    lines_done INTEGER NOT NULL DEFAULT 0, succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, error TEXT, owner TEXT, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, updated_at REAL NOT NULL);
CREATE TABLE task_errors (task_id TEXT NOT NULL, line INTEGER NOT NULL, image_id TEXT, image_uri TEXT,
    reason TEXT NOT NULL, PRIMARY KEY (task_id, line)) WITHOUT ROWID;
CREATE TABLE runners (owner TEXT PRIMARY KEY, heartbeat_at REAL NOT NULL);
INSERT INTO tasks (task_id, library_name, library_uid, source, save_image, state, created_at, updated_at)
    VALUES ('t1', 'lib', 'u1', '/x.jsonl', 1, 'PENDING', 1.0, 1.0);
"""


def make_db(path: Path, script: str, user_version: int = 0, written_by: str | None = None) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(script)
    if written_by is not None:
        conn.execute(store_module.SQLITE_HISTORY)
        conn.execute("INSERT INTO schema_history VALUES (?, ?, 0)", (user_version, written_by))
    conn.execute(f"PRAGMA user_version = {user_version}")
    conn.commit()
    conn.close()


def versions(path: Path) -> tuple[int, list[tuple[int, str]]]:
    conn = sqlite3.connect(path)
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        history = conn.execute("SELECT version, service FROM schema_history ORDER BY version").fetchall()
        return found, history
    finally:
        conn.close()


def open_store(tmp_path: Path, *, readonly: bool = False) -> None:
    with LibraryStore(tmp_path, readonly=readonly) as s:
        assert s.dim == 4 and s.last_seq() == 7
        [r] = s.get("a")
        assert r.tags == {"k": 1}


def open_tasks(tmp_path: Path) -> None:
    s = TaskStore(tmp_path)
    try:
        assert s.get("t1").state == "PENDING"
    finally:
        s.close()


KINDS = {
    "store": (store_module.DB_NAME, V0_STORE, open_store, "library store"),
    "tasks": (tasks_module.DB_NAME, V0_TASKS, open_tasks, "task store"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_from_before_versions_is_stamped_and_keeps_its_data(tmp_path, kind) -> None:
    name, script, opener, _ = KINDS[kind]
    make_db(tmp_path / name, script)
    opener(tmp_path)
    assert versions(tmp_path / name) == (1, [(1, SERVICE_VERSION)])
    opener(tmp_path)  # and opens again as it is
    assert versions(tmp_path / name) == (1, [(1, SERVICE_VERSION)])


def test_a_reader_opening_an_old_store_migrates_it_too(tmp_path) -> None:
    make_db(tmp_path / store_module.DB_NAME, V0_STORE)
    open_store(tmp_path, readonly=True)
    assert versions(tmp_path / store_module.DB_NAME)[0] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_newer_store_is_refused_naming_the_release_it_needs(tmp_path, kind) -> None:
    name, script, opener, what = KINDS[kind]
    make_db(tmp_path / name, script, user_version=5, written_by="3.1.0")
    with pytest.raises(SchemaTooNew) as caught:
        opener(tmp_path)
    message = str(caught.value)
    assert f"{what} at {tmp_path / name} has schema version 5, written by image-search 3.1.0" in message
    assert "knows versions up to 1" in message and "run image-search 3.1.0 or newer" in message
    assert versions(tmp_path / name) == (5, [(5, "3.1.0")])  # untouched


def test_a_newer_store_without_history_is_refused_by_its_version_alone(tmp_path) -> None:
    make_db(tmp_path / store_module.DB_NAME, V0_STORE, user_version=2)
    with pytest.raises(SchemaTooNew, match="one that knows schema version 2"):
        LibraryStore(tmp_path)


def test_a_new_store_is_created_at_the_current_version(tmp_path) -> None:
    LibraryStore.initialise(tmp_path, dim=4)
    with LibraryStore(tmp_path) as s:
        s.upsert([NewRecord("a", "u", np.ones(4, np.float32) / 2)])
    assert versions(tmp_path / store_module.DB_NAME) == (1, [(1, SERVICE_VERSION)])
    TaskStore(tmp_path).close()
    assert versions(tmp_path / tasks_module.DB_NAME) == (1, [(1, SERVICE_VERSION)])


def test_migration_runs_only_the_missing_steps_in_one_transaction(tmp_path) -> None:
    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    v1 = SqliteSchema("test db", ("CREATE TABLE a (x); " + store_module.SQLITE_HISTORY,))
    assert open_sqlite_schema(conn, v1, "here") == 0
    conn.execute("INSERT INTO a VALUES (1)")
    broken = SqliteSchema("test db", (*v1.steps, "ALTER TABLE a ADD COLUMN y; CREATE TABLE a (z)"))
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        open_sqlite_schema(conn, broken, "here")
    # the failed step left nothing behind: no column y, still version 1
    assert [c[1] for c in conn.execute("PRAGMA table_info(a)")] == ["x"]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    v2 = SqliteSchema("test db", (*v1.steps, "ALTER TABLE a ADD COLUMN y DEFAULT 2"))
    assert open_sqlite_schema(conn, v2, "here") == 1
    assert conn.execute("SELECT x, y FROM a").fetchall() == [(1, 2)]
    assert conn.execute("SELECT version FROM schema_history ORDER BY version").fetchall() == [(1,), (2,)]
    with pytest.raises(
        SchemaTooNew,
        match=rf"test db here has schema version 2, written by image-search "
        rf"{SERVICE_VERSION}; .* knows versions up to 1",
    ):
        open_sqlite_schema(conn, v1, "here")
    conn.close()


def test_the_catalog_layout_is_stamped_then_a_newer_one_refused(tmp_path) -> None:
    (tmp_path / "libraries").mkdir()
    Catalog(tmp_path)  # a root from before versions: no catalog.json
    raw = json.loads((tmp_path / CATALOG_FILE).read_text())
    assert raw == {"schema_version": LAYOUT_VERSION, "written_by": SERVICE_VERSION}
    (tmp_path / CATALOG_FILE).write_text(json.dumps({"schema_version": 4, "written_by": "2.0.0"}))
    with pytest.raises(SchemaTooNew, match=f"catalog at {tmp_path} has schema version 4.*image-search 2.0.0"):
        Catalog(tmp_path)
    assert json.loads((tmp_path / CATALOG_FILE).read_text())["schema_version"] == 4
    assert not list(tmp_path.glob(".*.tmp"))
