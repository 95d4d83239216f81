"""Durable state of import tasks in embedded mode, ``<storage_root>/tasks.sqlite``, written only by the
import runner: a task's definition, state, counters and resume point (``lines_done``), its per-line errors
keyed by (task, line), and the runners' heartbeats; every progress commit checks the task's owner
(:class:`~index.storage.tasks.LostOwnership`). The record types and the rules both backends share are in
index/storage/tasks.py. Why: docs/ARCHITECTURE.md, "Bulk import". The schema carries its version in
``PRAGMA user_version`` (``SCHEMA``; the rule is in index/storage/schema.py).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from index.errors import TaskNotFound
from index.storage.schema import SQLITE_HISTORY, SqliteSchema, open_sqlite_schema
from index.storage.tasks import (
    CANCELLED,
    PENDING,
    RUNNING,
    TASK_COLS,
    UNFINISHED,
    LineError,
    Task,
    check_final_state,
    check_owner_row,
    task_from_row,
    task_object,
)

DB_NAME = "tasks.sqlite"

#: Version 1 is the schema from before versions existed (0) plus the migration history.
SCHEMA = SqliteSchema(
    "task store",
    (
        """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    library_name TEXT NOT NULL,
    library_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    save_image INTEGER NOT NULL,
    state TEXT NOT NULL,
    total INTEGER,
    lines_done INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    owner TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, created_at);
CREATE TABLE IF NOT EXISTS task_errors (
    task_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    image_id TEXT,
    image_uri TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (task_id, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runners (
    owner TEXT PRIMARY KEY,
    heartbeat_at REAL NOT NULL
);
"""
        + SQLITE_HISTORY,
    ),
)


class TaskStore:
    """SQLite access to ``tasks.sqlite``. One connection guarded by a lock (used from worker threads).

    Args:
        root: the storage root (the database is ``root/tasks.sqlite``).
        max_errors: the most error rows kept per task; further failed lines are only counted.
    """

    def __init__(self, root: str | Path, *, max_errors: int = 10_000) -> None:
        self.path = Path(root) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_errors = max_errors
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        try:
            open_sqlite_schema(self._conn, SCHEMA, f"at {self.path}")
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- creation and reads ----------------------------------------------------------------------

    def create(
        self, *, library_name: str, library_uid: str, source: str, save_image: bool, owner: str | None
    ) -> Task:
        """A new PENDING task owned by ``owner``."""
        now = time.time()
        task_id = uuid.uuid4().hex
        with self._txn() as conn:
            conn.execute(
                "INSERT INTO tasks (task_id, library_name, library_uid, source, save_image, state, owner,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (task_id, library_name, library_uid, source, int(save_image), PENDING, owner, now, now),
            )
        return self.get(task_id)

    def get(self, task_id: str) -> Task:
        """The task row. Raises TaskNotFound."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
        if row is None:
            raise TaskNotFound(task_id)
        return task_from_row(row)

    def errors(self, task_id: str, *, limit: int | None = None) -> list[LineError]:
        """The task's recorded line errors in line order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT line, reason, image_id, image_uri FROM task_errors WHERE task_id = ? ORDER BY line"
                " LIMIT ?",
                (task_id, -1 if limit is None else limit),
            ).fetchall()
        return [LineError(*r) for r in rows]

    def count_unfinished(self) -> int:
        with self._lock:
            return int(
                self._conn.execute("SELECT COUNT(*) FROM tasks WHERE state IN (?, ?)", UNFINISHED).fetchone()[
                    0
                ]
            )

    def describe(self, task_id: str) -> dict[str, Any]:
        """The API's task object (``GET /image/tasks/results/{task_id}``)."""
        return task_object(self.get(task_id), self.errors(task_id))

    # -- ownership -------------------------------------------------------------------------------

    def heartbeat(self, owner: str) -> None:
        with self._txn() as conn:
            conn.execute(
                "INSERT INTO runners (owner, heartbeat_at) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (owner, time.time()),
            )

    def claim(self, owner: str, *, all_unfinished: bool, stale_after_s: float = 60.0) -> list[Task]:
        """Take over unfinished tasks; return every unfinished task ``owner`` now holds, oldest first.

        ``all_unfinished``: take every one (a runner that just started: any other runner is a dying
        replica). Otherwise only those whose owner has not heartbeated for ``stale_after_s``.
        """
        now = time.time()
        with self._txn() as conn:
            conn.execute(
                "INSERT INTO runners (owner, heartbeat_at) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (owner, now),
            )
            if all_unfinished:
                conn.execute(
                    "UPDATE tasks SET owner = ?, updated_at = ? WHERE state IN (?, ?)",
                    (owner, now, *UNFINISHED),
                )
            else:
                conn.execute(
                    "UPDATE tasks SET owner = ?, updated_at = ? WHERE state IN (?, ?) AND (owner IS NULL OR"
                    " owner NOT IN (SELECT owner FROM runners WHERE heartbeat_at >= ?))",
                    (owner, now, *UNFINISHED, now - stale_after_s),
                )
            conn.execute("DELETE FROM runners WHERE heartbeat_at < ?", (now - 10 * stale_after_s,))
            rows = conn.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE state IN (?, ?) AND owner = ?"
                " ORDER BY state DESC, created_at",  # RUNNING before PENDING, then oldest first
                (*UNFINISHED, owner),
            ).fetchall()
        return [task_from_row(r) for r in rows]

    # -- progress --------------------------------------------------------------------------------

    def start(self, task_id: str, owner: str) -> Task:
        """PENDING -> RUNNING (a RUNNING task being resumed stays RUNNING)."""
        now = time.time()
        with self._txn() as conn:
            self._check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET state = ?, started_at = COALESCE(started_at, ?), updated_at = ?"
                " WHERE task_id = ?",
                (RUNNING, now, now, task_id),
            )
        return self.get(task_id)

    def set_total(self, task_id: str, owner: str, total: int) -> None:
        with self._txn() as conn:
            self._check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET total = ?, updated_at = ? WHERE task_id = ?", (total, time.time(), task_id)
            )

    def commit_chunk(
        self, task_id: str, owner: str, *, lines_done: int, succeeded: int, errors: Sequence[LineError]
    ) -> None:
        """Record one chunk's outcome atomically: the new resume point, counters and its line errors.

        Raises:
            LostOwnership: another runner owns the task now (nothing is written).
        """
        with self._txn() as conn:
            self._check_owner(conn, task_id, owner)
            kept = int(
                conn.execute("SELECT COUNT(*) FROM task_errors WHERE task_id = ?", (task_id,)).fetchone()[0]
            )
            room = max(0, self.max_errors - kept)
            conn.executemany(
                "INSERT OR REPLACE INTO task_errors (task_id, line, image_id, image_uri, reason)"
                " VALUES (?,?,?,?,?)",
                [(task_id, e.line, e.image_id, e.image_uri, e.reason) for e in errors[:room]],
            )
            conn.execute(
                "UPDATE tasks SET lines_done = ?, succeeded = succeeded + ?, failed = failed + ?,"
                " updated_at = ? WHERE task_id = ?",
                (lines_done, succeeded, len(errors), time.time(), task_id),
            )

    def finish(self, task_id: str, owner: str | None, state: str, *, error: str | None = None) -> None:
        """Set a final state (``owner`` None: regardless of the owner, e.g. at creation time)."""
        check_final_state(state)
        now = time.time()
        with self._txn() as conn:
            if owner is not None:
                self._check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET state = ?, error = ?, finished_at = ?, updated_at = ? WHERE task_id = ?",
                (state, error, now, now, task_id),
            )

    def cancel(self, task_id: str) -> Task:
        """End a PENDING or RUNNING task as CANCELLED, whoever owns it (its counters stay as committed;
        the owner's next commit raises LostOwnership); a finished task is left unchanged. Returns the
        task. Raises TaskNotFound."""
        now = time.time()
        with self._txn() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            if row[0] in UNFINISHED:
                conn.execute(
                    "UPDATE tasks SET state = ?, finished_at = ?, updated_at = ? WHERE task_id = ?",
                    (CANCELLED, now, now, task_id),
                )
        return self.get(task_id)

    def prune_finished(self, *, finished_before: float) -> int:
        """Delete finished tasks (and their error rows) that finished before ``finished_before``.

        Unfinished tasks are never deleted, whatever their age. Returns how many tasks were deleted.
        """
        with self._txn() as conn:
            conn.execute(
                "DELETE FROM task_errors WHERE task_id IN (SELECT task_id FROM tasks"
                " WHERE state NOT IN (?, ?) AND finished_at < ?)",
                (*UNFINISHED, finished_before),
            )
            deleted = conn.execute(
                "DELETE FROM tasks WHERE state NOT IN (?, ?) AND finished_at < ?",
                (*UNFINISHED, finished_before),
            ).rowcount
        return int(deleted)

    @staticmethod
    def _check_owner(conn: sqlite3.Connection, task_id: str, owner: str) -> None:
        row = conn.execute("SELECT owner, state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        check_owner_row(task_id, owner, row)
