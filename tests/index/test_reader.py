"""LibraryReader + LibraryWriter + snapshots: read-your-writes, restart, snapshot + replay."""

from __future__ import annotations

import numpy as np
import pytest

from index.ann import IndexConfig
from index.errors import LibraryAlreadyExists, LibraryNotFound
from index.reader import LibraryReader
from index.snapshot import load_snapshot, snapshot_seq
from index.store import NewRecord
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
    from filters import parse_filter

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
    assert writer.catalog.describe(info2)["image_count"] == 0


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
    from index import reader as reader_mod
    from index.store import LibraryStore

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
