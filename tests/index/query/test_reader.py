"""LibraryReader + LibraryWriter + snapshots: read-your-writes, restart, snapshot + replay."""

from __future__ import annotations

import numpy as np
import pytest

from filters import parse_filter
from index.errors import LibraryAlreadyExists, LibraryNotFound
from index.query.reader import LibraryReader
from index.search.ann import IndexConfig
from index.storage.embedded.snapshot import load_snapshot, snapshot_seq
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter

DIM = 8
MODEL = {"model": "m", "pretrained": "p", "identity": "m/p", "dim": DIM}


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def writer(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(snapshot_min_rows=10**9))
    yield w
    w.close()


def make(writer, name="lib"):
    writer.create_library(name, "general_search", None, MODEL)
    info = writer.catalog.get(name)
    return info, writer.catalog.library_dir(name)


def add(writer, info, i, **kw):
    return writer.add_images(info.name, info.uid, [NewRecord(f"id{i}", f"u{i}", unit(i), **kw)])


def test_two_readers_see_every_write_immediately(writer):
    info, d = make(writer)
    r1 = LibraryReader(d, model_identity="m/p")
    r2 = LibraryReader(d, model_identity="m/p")
    for i in range(20):
        add(writer, info, i, tags={"i": i})
        for r in (r1, r2):
            assert r.search(unit(i), 1).row_ids.tolist() == [i + 1]
    writer.delete_images(info.name, info.uid, "id5", None)
    for r in (r1, r2):
        assert 6 not in r.search(unit(5), 20).row_ids.tolist()
    writer.update_tags(info.name, info.uid, "id7", None, {"flag": True})

    node = parse_filter({"field": "flag", "op": "=", "value": True})
    for r in (r1, r2):
        assert r.search(unit(0), 20, node).row_ids.tolist() == [8]


def test_snapshot_then_replay_equals_full_load(writer):
    info, d = make(writer)
    for i in range(30):
        add(writer, info, i)
    writer.snapshot_now(info.name)
    assert snapshot_seq(d) == 30
    for i in range(30, 40):
        add(writer, info, i)
    writer.delete_images(info.name, info.uid, "id3", None)
    loaded = load_snapshot(d, model_identity="m/p", dim=DIM)
    assert loaded is not None and loaded[0].live_count == 30
    r = LibraryReader(d, model_identity="m/p")
    assert r.live_count == 39
    assert r.applied_seq == 41
    got = r.search(unit(35), 5).row_ids.tolist()
    assert got[0] == 36


def test_snapshot_of_other_model_is_ignored(writer):
    info, d = make(writer)
    add(writer, info, 1)
    writer.snapshot_now(info.name)
    assert load_snapshot(d, model_identity="other", dim=DIM) is None


def test_background_snapshot_policy(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(snapshot_min_rows=5, snapshot_fraction=0.0))
    try:
        info, d = make(w)
        for i in range(6):
            add(w, info, i)
        w._snapshots.submit(lambda: None).result()  # wait for the queued snapshot
        assert snapshot_seq(d) >= 5
    finally:
        w.close()


def test_create_delete_recreate(writer):
    info, _ = make(writer)
    with pytest.raises(LibraryAlreadyExists):
        make(writer)
    writer.delete_library("lib")
    with pytest.raises(LibraryNotFound):
        writer.catalog.get("lib")
    with pytest.raises(LibraryNotFound):  # a stale uid never writes into the new library
        add(writer, info, 1)
    info2, _ = make(writer)
    assert info2.uid != info.uid
    assert writer.storage.describe(info2)["image_count"] == 0


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "x" * 65, "é"])
def test_bad_library_names(writer, bad):
    with pytest.raises(ValueError, match="library_name"):
        writer.create_library(bad, "general_search", None, MODEL)


def test_library_limit(tmp_path):
    from index.errors import LibraryLimitReached

    w = LibraryWriter(tmp_path, max_libraries=1)
    try:
        make(w, "one")
        with pytest.raises(LibraryLimitReached):
            make(w, "two")
    finally:
        w.close()


def test_commit_during_load_is_not_skipped(writer, monkeypatch):
    """A write committed while a table is being loaded must still reach the table (regression: the
    loader used to read last_seq after replaying, claiming a seq whose row it never saw)."""
    from index.query import reader as reader_mod
    from index.storage.embedded.store import LibraryStore

    info, d = make(writer)
    add(writer, info, 0)
    original = LibraryStore.changes_since

    def changes_then_commit(self, seq, **kw):
        yield from original(self, seq, **kw)
        add(writer, info, 1)  # lands after the replay's read transaction

    monkeypatch.setattr(LibraryStore, "changes_since", changes_then_commit)
    with LibraryStore(d, readonly=True) as store:
        table, _ = reader_mod.load_table(store, d, model_identity="m/p")
    monkeypatch.setattr(LibraryStore, "changes_since", original)
    assert table.live_count == 1
    assert table.applied_seq == 1  # not 2: row id1 was never applied
    r = LibraryReader(d, model_identity="m/p")
    assert r.live_count == 2


# -- index kinds, background rebuilds, snapshot pickup ------------------------------------------------

SMALL = dict(hnsw_min_rows=120, snapshot_min_rows=10**9, hnsw_ef_search=128, search_threads=1)


def add_many(writer, info, ids, **kw):
    writer.add_images(
        info.name, info.uid, [NewRecord(f"id{i}", f"u{i}", unit(i), tags={"i": i}) for i in ids]
    )


def top(reader, seed, k=10, **kw):
    return reader.search(unit(seed), k, **kw).row_ids.tolist()


def test_library_switches_from_flat_to_hnsw_when_it_crosses_the_threshold(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(**SMALL))
    try:
        info, d = make(w)
        add_many(w, info, range(100))
        assert w.snapshot_now("lib").index_kind == "flat"
        assert w.storage.describe(info, w.config)["index"] == {"kind": "flat", "configured": "auto"}
        reader = LibraryReader(d, model_identity="m/p", config=w.config, background_pickup=False)
        add_many(w, info, range(100, 200))  # now over hnsw_min_rows
        before = [top(reader, s) for s in range(5)]
        manifest = w.snapshot_now("lib")
        assert (manifest.index_kind, manifest.count) == ("hnsw", 200)
        described = w.storage.describe(info, w.config)["index"]
        assert (described["kind"], described["configured"]) == ("hnsw", "auto")
        # what the writer measured on the library's own vectors (index.search.calibration)
        assert described["search_calibration"]["recall_target"] == w.config.recall_target
        assert described["search_calibration"]["queries"] == 20  # a tenth of the 200 rows held out
        assert [top(reader, s) for s in range(5)] == before  # the search picked up the new snapshot
        assert (reader.kind, reader.table.tail_count) == ("hnsw", 0)
    finally:
        w.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_configured_kind_is_kept_and_rows_after_the_snapshot_are_searchable_at_once(tmp_path, kind):
    config = IndexConfig(**{**SMALL, "ivfpq_min_rows": 100, "ivf_nlist": 4, "pq_m": 4, "pq_nbits": 4})
    w = LibraryWriter(tmp_path, config=config)
    try:
        w.create_library("lib", "general_search", None, MODEL, index_kind=kind)
        info, d = w.catalog.get("lib"), w.catalog.library_dir("lib")
        add_many(w, info, range(300))
        assert w.snapshot_now("lib").index_kind == kind
        reader = LibraryReader(d, model_identity="m/p", config=config, background_pickup=False)
        assert reader.kind == kind
        add(w, info, 1000)  # read-your-writes: a row newer than the snapshot is found by the next search
        assert top(reader, 1000, 1) == [301]
        # tags came back from the snapshot's pickled columns, aligned with the index's slots
        node = parse_filter({"field": "i", "op": "in", "value": [7, 250, 299]})
        assert sorted(top(reader, 7, 10, node=node)) == [8, 251, 300]
        w.delete_images(info.name, info.uid, "id5", None)  # a delete hits a base slot
        assert 6 not in top(reader, 5, 300)
    finally:
        w.close()


def test_unknown_index_kind_is_refused(writer):
    with pytest.raises(ValueError, match="index_kind"):
        writer.create_library("lib", "general_search", None, MODEL, index_kind="annoy")


def test_snapshot_compacts_when_too_many_rows_are_dead(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(**SMALL))
    try:
        info, d = make(w)
        add_many(w, info, range(200))
        w.snapshot_now("lib")
        for i in range(30):  # 15% dead: the next snapshot folds the tail in and keeps the dead slots
            w.delete_images(info.name, info.uid, f"id{i}", None)
        assert (m := w.snapshot_now("lib")).count == 200 and m.live == 170
        for i in range(30, 60):  # 30% dead: rebuilt from the live rows
            w.delete_images(info.name, info.uid, f"id{i}", None)
        assert (m := w.snapshot_now("lib")).count == m.live == 140
        reader = LibraryReader(d, model_identity="m/p", config=w.config)
        assert reader.live_count == 140
        assert top(reader, 100, 1) == [101] and 31 not in top(reader, 30, 200)
    finally:
        w.close()


def test_background_pickup_never_blocks_and_swaps_in_the_new_snapshot(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(**SMALL))
    try:
        info, d = make(w)
        add_many(w, info, range(150))
        w.snapshot_now("lib")
        reader = LibraryReader(d, model_identity="m/p", config=w.config)  # background pickup
        first = reader.snapshot
        add_many(w, info, range(150, 200))
        w.snapshot_now("lib")
        assert top(reader, 170, 1) == [171]  # answered by the old table + tail meanwhile
        reader.wait_for_pickup(timeout=60)
        assert reader.snapshot not in (None, first) and reader.table.tail_count == 0
        assert top(reader, 170, 1) == [171]
    finally:
        w.close()


def test_catching_up_a_few_thousand_rows_does_not_reload(tmp_path):
    w = LibraryWriter(tmp_path, config=IndexConfig(**SMALL))
    try:
        info, d = make(w)
        add_many(w, info, range(8000))
        w.snapshot_now("lib")
        reader = LibraryReader(d, model_identity="m/p", config=w.config)
        base = reader.table.base
        add_many(w, info, range(8000, 11000))
        assert reader.catch_up() == 3000
        assert reader.table.base is base and reader.table.tail_count == 3000  # applied, not reloaded
        assert top(reader, 10500, 1) == [10501]
    finally:
        w.close()


def test_writer_snapshots_in_the_background_when_the_tail_grows(tmp_path):
    config = IndexConfig(
        hnsw_min_rows=10**9, snapshot_min_rows=20, snapshot_fraction=10.0, snapshot_max_tail_rows=50
    )
    w = LibraryWriter(tmp_path, config=config)
    try:
        info, d = make(w)
        add_many(w, info, range(40))
        w._snapshots.submit(lambda: None).result()
        assert snapshot_seq(d) == 0  # 40 rows: over snapshot_min_rows, under the tail bound and the fraction
        add_many(w, info, range(40, 60))
        w._snapshots.submit(lambda: None).result()
        assert snapshot_seq(d) > 0
    finally:
        w.close()


def test_eviction_closes_the_store(writer):
    """Serve's multiplex LRU calls ``__del__`` on an evicted library: the connection must be released."""
    import sqlite3

    info, d = make(writer)
    add(writer, info, 0)
    r = LibraryReader(d, model_identity="m/p")
    r.__del__()
    with pytest.raises(sqlite3.ProgrammingError):
        r._store.count()
    r.close()  # idempotent
