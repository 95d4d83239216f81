"""index.storage.cluster.pg.store: seqs stay gap-free in commit order with two writers alive, readers see one
state.

Each writer has its own pool (its own connections), as two Writer replicas would during a failover.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import nullcontext

import numpy as np
import pytest

from index.errors import LibraryNotFound
from index.storage.cluster.blobs import BlobStore, library_blobs
from index.storage.cluster.pg import PgCatalog, PgLibraryStore, connect
from index.storage.embedded.store import NewRecord

DIM = 8


def rec(image_id: str, **kw) -> NewRecord:
    v = np.random.default_rng(abs(hash(image_id)) % 2**32).standard_normal(DIM).astype(np.float32)
    return NewRecord(image_id=image_id, image_uri="u", vector=v / np.linalg.norm(v), **kw)


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore.open(f"file://{tmp_path}/blobs")


@pytest.fixture
def two_writers(pg_url, blobs):
    with connect(pg_url) as db1, connect(pg_url) as db2:
        info = PgCatalog(db1).create(
            "lib", "general_search", None, model="m", pretrained="p", model_identity="m/p", dim=DIM
        )
        frames = library_blobs(blobs, info.uid)
        yield PgLibraryStore(db1, info.uid, frames=frames), PgLibraryStore(db2, info.uid, frames=frames)


def seq_of(store: PgLibraryStore) -> dict[str, int]:
    """image_id -> seq of its live row."""
    ids = {c.row_id: c.seq for c in store.changes_since(0, live_only=True)}
    return {r.image_id: ids[r.row_id] for r in store.fetch(list(ids)).values()}


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_second_writer_waits_for_the_first_and_takes_the_next_seq(two_writers, first_commits) -> None:
    a, b = two_writers
    a.upsert([rec("x")])
    finished = threading.Event()
    writer_b = threading.Thread(target=lambda: (b.upsert([rec("y")]), finished.set()))
    outcome = nullcontext() if first_commits else pytest.raises(RuntimeError)
    # writer A's transaction, holding the library's row
    with outcome, a._write() as (conn, seq):
        assert seq == 2
        writer_b.start()
        assert not finished.wait(1.0)  # B queues on the row lock instead of interleaving
        conn.execute("SELECT 1")
        if not first_commits:
            raise RuntimeError("writer A fails")  # rolls back: its seq is not used
    writer_b.join(30)
    assert finished.is_set()
    assert b.last_seq() == (3 if first_commits else 2)  # next after A's commit, or A's unused number
    assert seq_of(a) == {"x": 1, "y": b.last_seq()}


def test_many_concurrent_writes_leave_no_gap_and_keep_each_writers_order(two_writers) -> None:
    a, b = two_writers
    n = 40
    failures: list[BaseException] = []

    def write(store: PgLibraryStore, prefix: str) -> None:
        try:
            for i in range(n):
                if i % 7 == 3:  # a write that fails inside its transaction, after taking its seq
                    with pytest.raises(ValueError):
                        store.upsert([rec(f"{prefix}-bad{i}", tags={"x": float("nan")})])
                store.upsert([rec(f"{prefix}{i:02d}")])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(s, p)) for s, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    commits = 2 * n
    assert a.last_seq() == b.last_seq() == commits
    changes = list(a.changes_since(0))
    # every seq from 1 to the last names exactly one commit (each stamped one new row): no gap, no
    # number twice, none left by the failed writes
    assert sorted(c.seq for c in changes) == list(range(1, commits + 1))
    seqs = seq_of(a)
    for prefix in "ab":
        mine = [seqs[f"{prefix}{i:02d}"] for i in range(n)]
        assert mine == sorted(mine)  # one writer's commits keep their order


def test_a_reader_streams_one_state_while_a_writer_commits(two_writers) -> None:
    a, b = two_writers
    a.upsert([rec(f"i{i}") for i in range(5)])
    stream = a.changes_since(0, batch=1)
    first = next(stream)
    b.upsert([rec("late")])
    b.delete("i4", None)
    rest = list(stream)
    assert [c.seq for c in (first, *rest)] == [1] * 5 and not any(c.deleted for c in rest)
    assert [(c.seq, c.deleted) for c in a.changes_since(1)] == [(2, False), (3, True)]


def test_a_deleted_library_refuses_writes_and_its_rows_and_blobs_are_gone(two_writers, blobs) -> None:
    a, b = two_writers
    a.upsert([rec("x", frame=b"bytes")])
    [x] = a.get("x")
    assert b.read_frame(x.frame) == b"bytes"
    uid = PgCatalog(a.db).delete_library("lib")
    assert uid == a.uid
    with pytest.raises(LibraryNotFound):
        b.upsert([rec("y", frame=b"more bytes")])
    assert not a.frames.exists(f"frames/{hashlib.sha256(b'more bytes').hexdigest()}")  # not uploaded
    with pytest.raises(LibraryNotFound):
        b.last_seq()
    assert b.count() == 0
    library_blobs(blobs, uid).delete_prefix("")  # what the storage layer does after the commit
    assert b.read_frame(x.frame) is None and blobs.list("libraries") == []
    with pytest.raises(LibraryNotFound):
        PgLibraryStore(a.db, a.uid, frames=a.frames)


def test_the_vector_table_loads_and_catches_up_from_postgresql(two_writers, tmp_path) -> None:
    """The read path's table code takes a PgLibraryStore as it takes a LibraryStore (no snapshot yet:
    a full replay, then an incremental catch-up of new rows and a tombstone)."""
    from filters import parse_filter
    from index.query.reader import load_table

    writer, reader_store = two_writers
    writer.upsert([rec(f"i{i}", tags={"n": i}) for i in range(6)])
    table, snapshot = load_table(reader_store, tmp_path, model_identity="m/p")
    assert snapshot is None and table.live_count == 6 and table.applied_seq == 1
    [target] = writer.get("i4")
    query = writer.vector_of(target.row_id)
    assert table.search(query, 1).row_ids.tolist() == [target.row_id]
    writer.delete("i4", None)
    writer.upsert([rec("late", tags={"n": 99})])
    assert table.apply(reader_store.changes_since(table.applied_seq)) == 2
    assert table.applied_seq == reader_store.last_seq() == 3
    assert target.row_id not in table.search(query, 7).row_ids.tolist()
    [late] = writer.get("late")
    hits = table.search(query, 3, parse_filter([{"field": "n", "op": ">", "value": 50}]))
    assert hits.row_ids.tolist() == [late.row_id]


def test_frames_are_objects_named_by_their_sha256(two_writers) -> None:
    a, _ = two_writers
    a.upsert([rec("x", frame=b"x bytes"), rec("y", frame=b"y bytes")])
    sha = hashlib.sha256(b"x bytes").hexdigest()
    assert a.get("x")[0].frame == sha
    assert a.frames.get_bytes(f"frames/{sha}") == b"x bytes"
    assert len(a.frames.list("frames")) == 2
    a.upsert([rec("x", frame=b"new x bytes")])  # overwritten: the old frame is collected
    a.delete("y", None)
    assert a.frames.list("frames") == [f"frames/{hashlib.sha256(b'new x bytes').hexdigest()}"]
    assert a.read_frame("../snapshots/CURRENT") is None and a.read_frame("f" * 63) is None


def test_a_failed_upsert_leaves_only_an_unreferenced_frame(two_writers) -> None:
    a, _ = two_writers
    with pytest.raises(ValueError):  # fails inside the transaction, after the upload
        a.upsert([rec("x", frame=b"orphan", tags={"x": float("nan")})])
    assert a.count() == 0 and a.last_seq() == 0
    assert a.frames.exists(f"frames/{hashlib.sha256(b'orphan').hexdigest()}")
    a.upsert([rec("y", frame=b"orphan")])  # named after all: it reads back
    assert a.read_frame(a.get("y")[0].frame) == b"orphan"


def test_an_upsert_naming_a_frame_never_loses_it_to_a_concurrent_delete(two_writers) -> None:
    """Writer B deletes the only record naming frame F while writer A upserts another record naming F:
    in every interleaving, A's record ends up with its frame."""
    a, b = two_writers
    data = b"shared frame"
    sha = hashlib.sha256(data).hexdigest()
    for i in range(15):
        b.upsert([rec("old", frame=data)])
        start = threading.Barrier(2)
        failures: list[BaseException] = []

        def together(fn, start=start, failures=failures) -> None:
            try:
                start.wait()
                fn()
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=together, args=(lambda: b.delete("old", None),)),
            threading.Thread(target=together, args=(lambda i=i: a.upsert([rec(f"new{i}", frame=data)]),)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures
        assert a.read_frame(sha) == data, f"round {i}: the frame of a live record is gone"
        a.delete(f"new{i}", None)
        assert a.read_frame(sha) is None
