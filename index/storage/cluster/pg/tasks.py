"""Import tasks in PostgreSQL: the same interface and semantics as ``index.storage.embedded.tasks.TaskStore``.

Where the SQLite store relies on its one-writer lock (``BEGIN IMMEDIATE``), this one locks rows: every
owner check reads the task's row ``FOR UPDATE``, so a take-over (``claim``, which updates those rows)
waits for a chunk commit in flight and the loser's next commit sees the new owner; claims run one at a
time under a transaction-level advisory lock, as the SQLite store's claims do under its write lock.
Error rows go with their task (``ON DELETE CASCADE``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from index.errors import TaskNotFound
from index.storage.cluster.pg.db import CLAIM_LOCK, Database
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

_HEARTBEAT = (
    "INSERT INTO runners (owner, heartbeat_at) VALUES (%s, %s)"
    " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)


class PgTaskStore:
    """PostgreSQL access to the task tables, through the shared pool (thread-safe).

    Args:
        db: the pool; the store does not own it.
        max_errors: the most error rows kept per task; further failed lines are only counted.
    """

    def __init__(self, db: Database, *, max_errors: int = 10_000) -> None:
        self.db = db
        self.max_errors = max_errors

    def close(self) -> None:
        """Nothing to release: the pool belongs to whoever connected."""

    # -- creation and reads ----------------------------------------------------------------------

    def create(
        self, *, library_name: str, library_uid: str, source: str, save_image: bool, owner: str | None
    ) -> Task:
        """A new PENDING task owned by ``owner``."""
        now = time.time()
        task_id = uuid.uuid4().hex
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO tasks (task_id, library_name, library_uid, source, save_image, state, owner,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (task_id, library_name, library_uid, source, bool(save_image), PENDING, owner, now, now),
            )
        return self.get(task_id)

    def get(self, task_id: str) -> Task:
        """The task row. Raises TaskNotFound."""
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT {TASK_COLS} FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(task_id)
        return task_from_row(row)

    def errors(self, task_id: str, *, limit: int | None = None) -> list[LineError]:
        """The task's recorded line errors in line order."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT line, reason, image_id, image_uri FROM task_errors WHERE task_id = %s ORDER BY line"
                " LIMIT %s",
                (task_id, limit),
            ).fetchall()
        return [LineError(*r) for r in rows]

    def count_unfinished(self) -> int:
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE state = ANY(%s)", (list(UNFINISHED),)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def describe(self, task_id: str) -> dict[str, Any]:
        """The API's task object (``GET /image/tasks/results/{task_id}``)."""
        return task_object(self.get(task_id), self.errors(task_id))

    # -- ownership -------------------------------------------------------------------------------

    def heartbeat(self, owner: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(_HEARTBEAT, (owner, time.time()))

    def claim(self, owner: str, *, all_unfinished: bool, stale_after_s: float = 60.0) -> list[Task]:
        """Take over unfinished tasks; return every unfinished task ``owner`` now holds, oldest first.

        ``all_unfinished``: take every one (a runner that just started: any other runner is a dying
        replica). Otherwise only those whose owner has not heartbeated for ``stale_after_s``.
        """
        now = time.time()
        unfinished = list(UNFINISHED)
        with self.db.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            conn.execute(_HEARTBEAT, (owner, now))
            if all_unfinished:
                conn.execute(
                    "UPDATE tasks SET owner = %s, updated_at = %s WHERE state = ANY(%s)",
                    (owner, now, unfinished),
                )
            else:
                conn.execute(
                    "UPDATE tasks SET owner = %s, updated_at = %s WHERE state = ANY(%s) AND (owner IS NULL OR"
                    " owner NOT IN (SELECT owner FROM runners WHERE heartbeat_at >= %s))",
                    (owner, now, unfinished, now - stale_after_s),
                )
            conn.execute("DELETE FROM runners WHERE heartbeat_at < %s", (now - 10 * stale_after_s,))
            rows = conn.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE state = ANY(%s) AND owner = %s"
                " ORDER BY state DESC, created_at",  # RUNNING before PENDING, then oldest first
                (unfinished, owner),
            ).fetchall()
        return [task_from_row(r) for r in rows]

    # -- progress --------------------------------------------------------------------------------

    def start(self, task_id: str, owner: str) -> Task:
        """PENDING -> RUNNING (a RUNNING task being resumed stays RUNNING)."""
        now = time.time()
        with self.db.transaction() as conn:
            _check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET state = %s, started_at = COALESCE(started_at, %s), updated_at = %s"
                " WHERE task_id = %s",
                (RUNNING, now, now, task_id),
            )
        return self.get(task_id)

    def set_total(self, task_id: str, owner: str, total: int) -> None:
        with self.db.transaction() as conn:
            _check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET total = %s, updated_at = %s WHERE task_id = %s",
                (total, time.time(), task_id),
            )

    def commit_chunk(
        self, task_id: str, owner: str, *, lines_done: int, succeeded: int, errors: Sequence[LineError]
    ) -> None:
        """Record one chunk's outcome atomically: the new resume point, counters and its line errors.

        Raises:
            LostOwnership: another runner owns the task now (nothing is written).
        """
        with self.db.transaction() as conn:
            _check_owner(conn, task_id, owner)  # holds the task's row until the commit
            row = conn.execute("SELECT COUNT(*) FROM task_errors WHERE task_id = %s", (task_id,)).fetchone()
            room = max(0, self.max_errors - (0 if row is None else int(row[0])))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO task_errors (task_id, line, image_id, image_uri, reason)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (task_id, line) DO UPDATE SET"
                    " image_id = excluded.image_id, image_uri = excluded.image_uri, reason = excluded.reason",
                    [(task_id, e.line, e.image_id, e.image_uri, e.reason) for e in errors[:room]],
                )
            conn.execute(
                "UPDATE tasks SET lines_done = %s, succeeded = succeeded + %s, failed = failed + %s,"
                " updated_at = %s WHERE task_id = %s",
                (lines_done, succeeded, len(errors), time.time(), task_id),
            )

    def finish(self, task_id: str, owner: str | None, state: str, *, error: str | None = None) -> None:
        """Set a final state (``owner`` None: regardless of the owner, e.g. at creation time)."""
        check_final_state(state)
        now = time.time()
        with self.db.transaction() as conn:
            if owner is not None:
                _check_owner(conn, task_id, owner)
            conn.execute(
                "UPDATE tasks SET state = %s, error = %s, finished_at = %s, updated_at = %s"
                " WHERE task_id = %s",
                (state, error, now, now, task_id),
            )

    def cancel(self, task_id: str) -> Task:
        """End a PENDING or RUNNING task as CANCELLED, whoever owns it (its counters stay as committed;
        the owner's next commit, which locks the same row, raises LostOwnership); a finished task is left
        unchanged. Returns the task. Raises TaskNotFound."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            if row[0] in UNFINISHED:
                conn.execute(
                    "UPDATE tasks SET state = %s, finished_at = %s, updated_at = %s WHERE task_id = %s",
                    (CANCELLED, now, now, task_id),
                )
        return self.get(task_id)

    def prune_finished(self, *, finished_before: float) -> int:
        """Delete finished tasks (and their error rows) that finished before ``finished_before``.

        Unfinished tasks are never deleted, whatever their age. Returns how many tasks were deleted.
        """
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM tasks WHERE NOT (state = ANY(%s)) AND finished_at < %s",
                (list(UNFINISHED), finished_before),
            )
            return int(cur.rowcount)


def _check_owner(conn: psycopg.Connection[Any], task_id: str, owner: str) -> None:
    row = conn.execute("SELECT owner, state FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,)).fetchone()
    check_owner_row(task_id, owner, row)
