"""Import tasks as both task stores keep them (SQLite: index/storage/embedded/tasks.py; PostgreSQL:
index/storage/cluster/pg/tasks.py): the states, the records (:class:`Task`, :class:`LineError`), the
columns they are read from, the API's task object, and the owner rule every progress commit checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from index.clock import iso_time
from index.errors import TaskNotFound

PENDING, RUNNING = "PENDING", "RUNNING"
SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED = "SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED"
CANCELLED = "CANCELLED"
UNFINISHED = (PENDING, RUNNING)
STATES = (PENDING, RUNNING, SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED)


class LostOwnership(RuntimeError):
    """Another runner took the task over; this runner must stop working on it."""


@dataclass(frozen=True)
class LineError:
    """Why one line of a source was not imported. ``line`` is the 1-based physical line number."""

    line: int
    reason: str
    image_id: str | None = None
    image_uri: str | None = None


@dataclass(frozen=True)
class Task:
    task_id: str
    library_name: str
    library_uid: str
    source: str
    save_image: bool
    state: str
    total: int | None
    lines_done: int
    succeeded: int
    failed: int
    error: str | None
    owner: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED


TASK_COLS = (
    "task_id, library_name, library_uid, source, save_image, state, total, lines_done, succeeded, failed,"
    " error, owner, created_at, started_at, finished_at"
)


def task_from_row(row: Sequence[Any]) -> Task:
    values = list(row)
    values[4] = bool(values[4])
    return Task(*values)


def task_object(task: Task, errors: Sequence[LineError]) -> dict[str, Any]:
    """The API's task object (``GET /image/tasks/results/{task_id}``) of a task and its kept errors."""
    return {
        "task_id": task.task_id,
        "library_name": task.library_name,
        "source": task.source,
        "state": task.state,
        "total": task.total,
        "succeeded": task.succeeded,
        "failed": task.failed,
        "errors": [
            {"line": e.line, "image_id": e.image_id, "image_uri": e.image_uri, "reason": e.reason}
            for e in errors
        ],
        "errors_truncated": task.failed > len(errors),
        "error": task.error,
        "created_at": iso_time(task.created_at),
        "started_at": iso_time(task.started_at) if task.started_at is not None else None,
        "finished_at": iso_time(task.finished_at) if task.finished_at is not None else None,
    }


def check_final_state(state: str) -> None:
    """Raise ValueError unless ``state`` is a final state."""
    if state in UNFINISHED or state not in STATES:
        raise ValueError(f"{state!r} is not a final state")


def check_owner_row(task_id: str, owner: str, row: Sequence[Any] | None) -> None:
    """Check a task's (owner, state) row before a progress commit.

    Raises:
        TaskNotFound: no row.
        LostOwnership: another runner owns the task, or it has finished.
    """
    if row is None:
        raise TaskNotFound(task_id)
    if row[0] != owner or row[1] not in UNFINISHED:
        raise LostOwnership(f"task {task_id} is now owned by {row[0]} in state {row[1]}")
