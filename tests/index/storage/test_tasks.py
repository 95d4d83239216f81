"""TaskStore and PgTaskStore: durable task rows, chunk commits, error rows, ownership and take-over.

Every test runs on both backends (the ``backend`` fixture of tests/index/conftest.py).
"""

from __future__ import annotations

import pytest

from index.errors import TaskNotFound
from index.storage.interfaces import TaskStorage
from index.storage.tasks import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    LineError,
    LostOwnership,
)


@pytest.fixture
def store(backend):
    s = backend.tasks(max_errors=3)
    assert isinstance(s, TaskStorage)
    yield s
    s.close()


def new(store, owner="A"):
    return store.create(library_name="lib", library_uid="u1", source="/x.jsonl", save_image=True, owner=owner)


def test_create_get_describe(store):
    task = new(store)
    assert task.state == PENDING and task.total is None and task.lines_done == 0
    assert len(task.task_id) == 32
    d = store.describe(task.task_id)
    assert d["state"] == PENDING and d["errors"] == [] and d["finished_at"] is None
    assert d["library_name"] == "lib" and d["succeeded"] == 0 and d["failed"] == 0
    with pytest.raises(TaskNotFound):
        store.get("0" * 32)


def test_chunk_commits_accumulate_and_errors_are_per_line(store):
    t = new(store).task_id
    store.start(t, "A")
    store.commit_chunk(t, "A", lines_done=4, succeeded=3, errors=[LineError(2, "bad", "i2", "u2")])
    store.commit_chunk(t, "A", lines_done=9, succeeded=4, errors=[LineError(7, "worse")])
    task = store.get(t)
    assert (task.state, task.lines_done, task.succeeded, task.failed) == (RUNNING, 9, 7, 2)
    assert [(e["line"], e["image_id"], e["reason"]) for e in store.describe(t)["errors"]] == [
        (2, "i2", "bad"),
        (7, None, "worse"),
    ]


def test_errors_beyond_the_cap_are_counted_not_kept(store):
    t = new(store).task_id
    store.commit_chunk(t, "A", lines_done=5, succeeded=0, errors=[LineError(i, "x") for i in range(1, 6)])
    d = store.describe(t)
    assert d["failed"] == 5 and len(d["errors"]) == 3 and d["errors_truncated"] is True


def test_state_survives_reopening(backend):
    s = backend.tasks()
    t = new(s).task_id
    s.start(t, "A")
    s.commit_chunk(t, "A", lines_done=3, succeeded=2, errors=[LineError(1, "x")])
    s.close()
    s = backend.tasks()
    task = s.get(t)
    assert (task.state, task.lines_done, task.succeeded, task.failed) == (RUNNING, 3, 2, 1)
    s.close()


def test_a_new_runner_takes_every_unfinished_task_and_the_old_one_stops(store):
    running = new(store, "A").task_id
    store.start(running, "A")
    pending = new(store, "A").task_id
    done = new(store, "A").task_id
    store.finish(done, "A", SUCCEEDED)
    claimed = store.claim("B", all_unfinished=True)
    assert [t.task_id for t in claimed] == [running, pending]  # RUNNING first, then oldest
    with pytest.raises(LostOwnership):
        store.commit_chunk(running, "A", lines_done=1, succeeded=1, errors=[])
    with pytest.raises(LostOwnership):
        store.finish(running, "A", FAILED, error="x")
    assert store.get(running).lines_done == 0  # nothing was written by the loser
    store.commit_chunk(running, "B", lines_done=1, succeeded=1, errors=[])


def test_only_tasks_of_silent_runners_are_taken_over(store):
    t = new(store, "A").task_id
    store.heartbeat("A")
    assert store.claim("B", all_unfinished=False, stale_after_s=60) == []
    assert [x.task_id for x in store.claim("B", all_unfinished=False, stale_after_s=0)] == [t]


def test_finished_tasks_cannot_be_committed_to(store):
    t = new(store).task_id
    store.finish(t, "A", FAILED, error="library deleted")
    with pytest.raises(LostOwnership):
        store.commit_chunk(t, "A", lines_done=1, succeeded=1, errors=[])
    with pytest.raises(ValueError):
        store.finish(t, "A", RUNNING)
    assert store.describe(t)["error"] == "library deleted"
    assert store.count_unfinished() == 0


def test_cancel_ends_unfinished_tasks_with_their_counters_and_leaves_finished_ones(
    store: TaskStorage,
) -> None:
    running, pending, done = (new(store).task_id for _ in range(3))
    store.start(running, "A")
    store.commit_chunk(running, "A", lines_done=4, succeeded=3, errors=[LineError(2, "bad")])
    store.finish(done, "A", SUCCEEDED)
    finished_at = store.get(done).finished_at

    t = store.cancel(running)
    assert (t.state, t.succeeded, t.failed, t.lines_done, t.error) == (CANCELLED, 3, 1, 4, None)
    assert t.finished_at is not None and store.describe(running)["errors"][0]["reason"] == "bad"
    assert store.cancel(pending).state == CANCELLED
    assert store.count_unfinished() == 0
    # the owner's next step sees the cancel: it cannot commit or finish any more
    with pytest.raises(LostOwnership):
        store.commit_chunk(running, "A", lines_done=8, succeeded=4, errors=[])
    with pytest.raises(LostOwnership):
        store.finish(running, "A", SUCCEEDED)
    assert store.get(running).succeeded == 3
    # idempotent: a finished or already cancelled task is answered unchanged
    assert store.cancel(done).state == SUCCEEDED and store.get(done).finished_at == finished_at
    again = store.cancel(running)
    assert again.state == CANCELLED and again.finished_at == t.finished_at
    assert not store.claim("B", all_unfinished=True)
    with pytest.raises(TaskNotFound):
        store.cancel("0" * 32)


def test_prune_deletes_only_finished_tasks_that_finished_before_the_cutoff(store, monkeypatch):
    clock = [1_000.0]
    monkeypatch.setattr("index.storage.embedded.tasks.time.time", lambda: clock[0])
    old_done, old_failed, old_running = new(store), new(store), new(store)
    store.start(old_done.task_id, "A")
    store.commit_chunk(old_done.task_id, "A", lines_done=2, succeeded=1, errors=[LineError(2, "bad")])
    store.finish(old_done.task_id, "A", SUCCEEDED)
    store.finish(old_failed.task_id, "A", FAILED, error="x")
    store.start(old_running.task_id, "A")  # unfinished: kept whatever its age
    clock[0] = 5_000.0
    recent = new(store)
    store.finish(recent.task_id, "A", SUCCEEDED)

    assert store.prune_finished(finished_before=4_000.0) == 2
    for gone in (old_done, old_failed):
        with pytest.raises(TaskNotFound):
            store.get(gone.task_id)
        assert store.errors(gone.task_id) == []  # its error rows went with it
    assert store.get(old_running.task_id).state == RUNNING
    assert store.get(recent.task_id).state == SUCCEEDED
    assert store.prune_finished(finished_before=4_000.0) == 0
