"""LibraryStore and PgLibraryStore: upsert semantics, sequence numbers, tombstones, frames.

Every test runs on both backends (the ``backend`` fixture); ``tests/index/storage/cluster/pg/`` has the
PostgreSQL-only ones (concurrent writers, connection errors).
"""

from __future__ import annotations

import numpy as np
import pytest

from index.storage.embedded.store import NewRecord
from index.storage.interfaces import RecordStore

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def library(backend):
    return backend.catalog().create(
        "lib", "general_search", None, model="m", pretrained="p", model_identity="m/p", dim=DIM
    )


@pytest.fixture
def store(backend, library):
    with backend.store(library) as s:
        assert isinstance(s, RecordStore)
        yield s


def rec(image_id: str, uri: str = "u", seed: int = 0, **kw) -> NewRecord:
    return NewRecord(image_id=image_id, image_uri=uri, vector=unit(seed), **kw)


def test_upsert_creates_then_overwrites(store):
    assert store.upsert([rec("a", tags={"c": "red"})]) == [True]
    assert store.upsert([rec("a", tags={"c": "blue"}, seed=1)]) == [False]
    [r] = store.get("a")
    assert r.tags == {"c": "blue"}
    assert np.allclose(store.vector_of(r.row_id), unit(1))
    assert store.count() == 1


def test_one_id_many_uris(store):
    store.upsert([rec("a", "u1"), rec("a", "u2", seed=1)])
    assert [r.image_uri for r in store.get("a")] == ["u1", "u2"]
    assert len(store.get("a", "u2")) == 1
    assert store.delete("a", "u1") == 1
    assert [r.image_uri for r in store.get("a")] == ["u2"]


def test_each_mutation_gets_next_seq(store):
    assert store.last_seq() == 0
    store.upsert([rec("a"), rec("b")])
    assert store.last_seq() == 1
    store.update_tags("a", None, {"x": 1})
    assert store.last_seq() == 2
    store.delete("b", None)
    assert store.last_seq() == 3
    changes = list(store.changes_since(1))
    assert [(c.row_id, c.seq, c.deleted) for c in changes] == [(1, 2, False), (2, 3, True)]
    assert changes[0].tags == {"x": 1}
    assert changes[1].vector is None


def test_delete_of_missing_is_zero_and_readd_is_created(store):
    assert store.delete("nope", None) == 0
    store.upsert([rec("a")])
    store.delete("a", None)
    assert store.get("a") == []
    assert store.upsert([rec("a")]) == [True]


def test_update_tags_counts_only_live(store):
    store.upsert([rec("a", "1"), rec("a", "2", seed=1)])
    assert store.update_tags("a", None, {"k": True}) == 2
    store.delete("a", "1")
    assert store.update_tags("a", None, {"k": False}) == 1
    assert store.update_tags("zzz", None, {}) == 0


def test_wrong_dim_is_rejected_and_nothing_written(store):
    with pytest.raises(ValueError, match="shape"):
        store.upsert([rec("a"), NewRecord("b", "u", np.zeros(3, np.float32))])
    assert store.count() == 0
    assert store.last_seq() == 0


def test_frames_are_shared_and_collected(store):
    store.upsert([rec("a", frame=b"same bytes"), rec("b", frame=b"same bytes")])
    [a] = store.get("a")
    assert store.read_frame(a.frame) == b"same bytes"
    store.delete("a", None)
    assert store.read_frame(a.frame) == b"same bytes"  # b still names it
    store.upsert([rec("b", frame=b"other bytes")])
    assert store.read_frame(a.frame) is None
    [b] = store.get("b")
    assert store.read_frame(b.frame) == b"other bytes"
    store.delete("b", None)
    assert store.read_frame(b.frame) is None  # the last record naming it is gone


def test_readonly_store_cannot_write(store, backend, library):
    with backend.store(library, readonly=True) as ro:
        with pytest.raises(PermissionError):
            ro.upsert([rec("a")])
        store.upsert([rec("a")])
        assert ro.count() == 1  # a reader sees the writer's commit at once


def test_a_batch_of_frames_written_in_parallel_each_reads_back(store, backend):
    datas = [bytes([i]) * (1000 + i) if i % 5 else None for i in range(40)] + [b"dup", b"dup"]
    store.upsert([rec(f"i{n}", frame=d) for n, d in enumerate(datas)])
    for n, d in enumerate(datas):
        [r] = store.get(f"i{n}")
        assert (store.read_frame(r.frame) if r.frame else None) == d
    if backend.name == "sqlite":
        assert not list((store.dir / "frames").rglob("*.tmp"))  # no temporary file left behind


def test_changes_stream_in_seq_order_across_batches_with_tombstones(store):
    store.upsert([rec("a"), rec("b", seed=1)])
    store.upsert([rec("c", seed=2)])
    store.delete("a", None)
    store.upsert([rec("a", seed=3, tags={"again": True})])  # the tombstone's row comes back to life
    changes = list(store.changes_since(0, batch=1))
    by_id = {r.image_id: r.row_id for r in (*store.get("a"), *store.get("b"), *store.get("c"))}
    assert [(c.row_id, c.seq, c.deleted) for c in changes] == [
        (by_id["b"], 1, False),
        (by_id["c"], 2, False),
        (by_id["a"], 4, False),
    ]
    assert changes[-1].tags == {"again": True} and np.allclose(changes[-1].vector, unit(3))
    store.delete("c", None)
    [tomb] = list(store.changes_since(4))
    assert (tomb.row_id, tomb.seq, tomb.deleted, tomb.vector, tomb.tags) == (by_id["c"], 5, True, None, {})
    assert [c.row_id for c in store.changes_since(0, live_only=True)] == [by_id["b"], by_id["a"]]
    assert store.count_changed_since(3) == 2 and store.count() == 2


def test_fetch_vector_and_extra_round_trip(store):
    store.upsert([rec("a", extra={"box": [0.1, 0.2, 0.9, 1.0]}, vector_kind="item"), rec("b", seed=1)])
    [a], [b] = store.get("a"), store.get("b")
    store.delete("b", None)
    fetched = store.fetch([a.row_id, b.row_id, 10_000])
    assert list(fetched) == [a.row_id]  # deleted and unknown rows are simply absent
    assert fetched[a.row_id].extra == {"box": [0.1, 0.2, 0.9, 1.0]}
    assert fetched[a.row_id].vector_kind == "item" and fetched[a.row_id].created_at > 0
    assert store.vector_of(b.row_id) is None
    assert store.vector_of(a.row_id).dtype == np.float32


def test_unknown_vector_kind_and_nan_tags_write_nothing(store):
    with pytest.raises(ValueError, match="vector_kind"):
        store.upsert([rec("a", vector_kind="elbow")])
    with pytest.raises(ValueError):
        store.upsert([rec("a", tags={"x": float("nan")})])
    assert store.count() == 0 and store.last_seq() == 0  # a failed write takes no seq
    store.upsert([rec("a")])
    assert store.last_seq() == 1
