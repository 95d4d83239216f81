"""index.storage.cluster.pg.tasks: a take-over waits for a chunk commit in flight, and the loser stops at its
next one."""

from __future__ import annotations

import threading

import pytest

from index.storage.cluster.pg import PgTaskStore, connect
from index.storage.cluster.pg.tasks import _check_owner
from index.storage.tasks import LineError, LostOwnership


def test_a_claim_waits_for_the_chunk_commit_in_flight(pg_url) -> None:
    with connect(pg_url) as db_a, connect(pg_url) as db_b:
        a, b = PgTaskStore(db_a), PgTaskStore(db_b)
        task = a.create(library_name="lib", library_uid="u", source="/x", save_image=False, owner="A")
        a.start(task.task_id, "A")
        claimed = threading.Event()
        taker = threading.Thread(target=lambda: (b.claim("B", all_unfinished=True), claimed.set()))
        with db_a.transaction() as conn:  # runner A's commit_chunk, between its owner check and commit
            _check_owner(conn, task.task_id, "A")
            taker.start()
            assert not claimed.wait(1.0)  # B's take-over queues on the task's row
            conn.execute("UPDATE tasks SET lines_done = 5 WHERE task_id = %s", (task.task_id,))
        taker.join(30)
        assert claimed.is_set() and a.get(task.task_id).owner == "B"
        assert a.get(task.task_id).lines_done == 5  # A's chunk landed whole, before the take-over
        with pytest.raises(LostOwnership):
            a.commit_chunk(task.task_id, "A", lines_done=9, succeeded=1, errors=[LineError(7, "x")])
        assert a.get(task.task_id).lines_done == 5 and a.errors(task.task_id) == []
        b.commit_chunk(task.task_id, "B", lines_done=9, succeeded=1, errors=[LineError(7, "x")])
        assert b.describe(task.task_id)["errors"][0]["line"] == 7
