"""index.storage.cluster.objsnap: snapshots on an object store (file:// and S3 through moto) load into a
node-local cache and search exactly as embedded-mode snapshots do; publication order, pointer, shared cache
and GC."""

from __future__ import annotations

import json

import numpy as np
import pytest

import index.storage.cluster.objsnap as objsnap
from index.search.changes import Change
from index.search.table import VectorTable
from index.storage.cluster.objsnap import ObjectSnapshots
from index.storage.embedded.snapshot import LocalSnapshots, Snapshots, parse_manifest

DIM = 8
MODEL = "m/p"


def make_table(n: int, seq: int, kind: str = "flat") -> VectorTable:
    """``n`` rows with tags, all applied at ``seq``, in a base index of ``kind`` (no tail)."""
    rng = np.random.default_rng(n * 1000 + seq)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = VectorTable(DIM)
    table.apply(Change(i + 1, seq, False, vectors[i], "whole", {"i": i}) for i in range(n))
    return table.rebuilt(kind)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def snaps(blob_root):
    return blob_root.child("libraries/u1/snapshots")


@pytest.fixture(autouse=True)
def no_pointer_cache(monkeypatch):
    """Every current_name() reads CURRENT (the cache is tested on its own)."""
    monkeypatch.setattr(objsnap, "POINTER_TTL_S", 0.0)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_round_trip_searches_as_a_local_snapshot_does(snaps, tmp_path, kind):
    table = make_table(300, 7, kind)
    writer = ObjectSnapshots(snaps, tmp_path / "cache-w", label="lib")
    assert isinstance(writer, Snapshots)
    manifest = writer.write(table, model_identity=MODEL)
    local = LocalSnapshots(tmp_path / "locallib")
    local.library_dir.mkdir()
    local.write(table, model_identity=MODEL)

    reader = ObjectSnapshots(snaps, tmp_path / "cache-r", label="lib")  # another node: empty cache
    loaded = reader.load(model_identity=MODEL, dim=DIM)
    assert loaded is not None
    got, name = loaded
    assert name == reader.current_name() == writer.current_name() and reader.seq() == 7
    assert reader.read_manifest() == parse_manifest(json.dumps(manifest.__dict__))  # as JSON keeps it
    assert manifest.written_at > 0
    assert (tmp_path / "cache-r" / name / "manifest.json").is_file()
    expected, _ = local.load(model_identity=MODEL, dim=DIM)
    assert got.kind == expected.kind == kind and len(got) == len(expected) == 300
    queries = make_table(5, 99).gather(np.arange(5))
    for q in queries:
        a, b = got.search(q, 10), expected.search(q, 10)
        assert a.row_ids.tolist() == b.row_ids.tolist()
        np.testing.assert_array_equal(a.cosines, b.cosines)
    writable, _ = reader.load(model_identity=MODEL, dim=DIM, writable=True)
    assert writable.search(queries[0], 10).row_ids.tolist() == got.search(queries[0], 10).row_ids.tolist()


def test_nothing_or_another_model_loads_as_none(snaps, tmp_path):
    s = ObjectSnapshots(snaps, tmp_path / "cache", label="lib")
    assert s.load(model_identity=MODEL, dim=DIM) is None
    assert s.current_name() is None and s.seq() == 0 and s.read_manifest() is None
    s.write(make_table(10, 1), model_identity=MODEL)
    assert s.load(model_identity="other/model", dim=DIM) is None
    assert s.load(model_identity=MODEL, dim=DIM + 1) is None


def test_the_manifest_is_published_last_and_the_pointer_after_it(snaps, tmp_path, monkeypatch):
    s = ObjectSnapshots(snaps, tmp_path / "cache", label="lib")
    s.write(make_table(10, 1), model_identity=MODEL)
    first = s.current_name()
    uploaded: list[str] = []
    put_file = snaps.put_file

    def failing_put_file(key, path):
        uploaded.append(key)
        if key.endswith("/manifest.json"):
            raise OSError("connection lost")
        put_file(key, path)

    monkeypatch.setattr(snaps, "put_file", failing_put_file)
    with pytest.raises(OSError, match="connection lost"):
        s.write(make_table(20, 2), model_identity=MODEL)
    assert uploaded[-1].endswith("/manifest.json") and len(uploaded) > 1  # every other file first
    assert s.current_name() == first  # not published
    incomplete = uploaded[0].split("/")[0]
    assert snaps.exists(incomplete) and snaps.get_bytes(f"{incomplete}/manifest.json") is None
    # a pointer to a snapshot without its manifest (never written so, but checked): ignored
    snaps.put_bytes("CURRENT", incomplete.encode())
    assert s.load(model_identity=MODEL, dim=DIM) is None
    assert not (tmp_path / "cache" / incomplete).exists()


def test_readers_pick_up_a_new_pointer(snaps, tmp_path):
    writer = ObjectSnapshots(snaps, tmp_path / "cache-w", label="lib")
    reader = ObjectSnapshots(snaps, tmp_path / "cache-r", label="lib")
    writer.write(make_table(10, 1), model_identity=MODEL)
    table, first = reader.load(model_identity=MODEL, dim=DIM)
    assert len(table) == 10
    writer.write(make_table(25, 4, "hnsw"), model_identity=MODEL)
    assert reader.current_name() != first and reader.seq() == 4
    table, second = reader.load(model_identity=MODEL, dim=DIM)
    assert second == reader.current_name() and len(table) == 25 and table.kind == "hnsw"


def test_the_pointer_is_cached_briefly(snaps, tmp_path, monkeypatch):
    monkeypatch.setattr(objsnap, "POINTER_TTL_S", 60.0)
    writer = ObjectSnapshots(snaps, tmp_path / "cache-w", label="lib")
    reader = ObjectSnapshots(snaps, tmp_path / "cache-r", label="lib")
    assert reader.current_name() is None
    writer.write(make_table(10, 1), model_identity=MODEL)
    assert reader.current_name() is None  # within the TTL: no request
    assert writer.current_name() is not None  # the writer knows what it published
    monkeypatch.setattr(objsnap, "POINTER_TTL_S", 0.0)
    assert reader.current_name() == writer.current_name()


def test_two_loaders_share_a_cache_dir_and_download_once(snaps, tmp_path, monkeypatch):
    ObjectSnapshots(snaps, tmp_path / "cache-w", label="lib").write(make_table(50, 3), model_identity=MODEL)
    downloads: list[str] = []
    get_file = snaps.get_file
    monkeypatch.setattr(snaps, "get_file", lambda key, path: (downloads.append(key), get_file(key, path)))
    shared = tmp_path / "node-cache"
    a = ObjectSnapshots(snaps, shared, label="lib")
    b = ObjectSnapshots(snaps, shared, label="lib")
    ta, name = a.load(model_identity=MODEL, dim=DIM)
    n = len(downloads)
    tb, name_b = b.load(model_identity=MODEL, dim=DIM)
    assert name_b == name and len(downloads) == n > 0  # b reused a's copy
    q = ta.gather(np.arange(1))[0]
    assert ta.search(q, 5).row_ids.tolist() == tb.search(q, 5).row_ids.tolist()
    assert sorted(p.name for p in shared.iterdir()) == [name]  # no temporary directory left


def test_local_copies_other_than_the_last_two_are_pruned(snaps, tmp_path):
    writer = ObjectSnapshots(snaps, tmp_path / "cache-w", label="lib")
    reader = ObjectSnapshots(snaps, tmp_path / "cache-r", label="lib", grace_s=0.0)
    names = []
    for seq in (1, 2, 3):
        writer.write(make_table(10, seq), model_identity=MODEL)
        names.append(reader.load(model_identity=MODEL, dim=DIM)[1])
    assert sorted(p.name for p in (tmp_path / "cache-r").iterdir()) == names[1:]


def names_on_store(snaps) -> list[str]:
    return [k for k in snaps.list() if k != "CURRENT"]


def test_gc_keeps_the_newest_two_and_waits_out_the_grace_period(snaps, tmp_path):
    clock = Clock()
    s = ObjectSnapshots(snaps, tmp_path / "cache", label="lib", grace_s=100.0, clock=clock)
    written = []
    for seq, dt in ((1, 0), (2, 10), (3, 10)):
        clock.now += dt
        s.write(make_table(10, seq), model_identity=MODEL)
        written.append(s.current_name())
    assert names_on_store(snaps) == written  # the oldest was superseded only 20 s ago
    clock.now += 95  # s1 superseded 105 s ago, s2 95 s ago
    assert s.collect() == [written[0]]
    assert names_on_store(snaps) == written[1:]
    clock.now += 200
    s.write(make_table(10, 4), model_identity=MODEL)
    written.append(s.current_name())
    assert names_on_store(snaps) == written[2:]  # s2 superseded long ago; s3 is among the newest two
    # the current one is never collected, even when a pointer race left it behind newer ones
    patient = ObjectSnapshots(snaps, tmp_path / "cache", label="lib", grace_s=1e9, clock=clock)
    for seq in (5, 6):
        clock.now += 1000
        patient.write(make_table(10, seq), model_identity=MODEL)
        written.append(patient.current_name())
    snaps.put_bytes("CURRENT", written[2].encode())
    clock.now += 1000
    assert s.collect() == [written[3]]
    assert names_on_store(snaps) == [written[2], *written[-2:]]


def test_gc_orders_snapshots_of_one_seq_by_write_time(snaps, tmp_path):
    clock = Clock()
    s = ObjectSnapshots(snaps, tmp_path / "cache", label="lib", grace_s=0.0, clock=clock)
    written = []
    for _ in range(3):  # compactions: the same seq, random name suffixes
        clock.now += 1
        s.write(make_table(10, 5), model_identity=MODEL)
        written.append(s.current_name())
    assert sorted(names_on_store(snaps)) == sorted(written[1:])


def test_gc_removes_incomplete_uploads_after_the_grace_period(snaps, tmp_path):
    clock = Clock()
    s = ObjectSnapshots(snaps, tmp_path / "cache", label="lib", grace_s=100.0, clock=clock)
    s.write(make_table(10, 1), model_identity=MODEL)
    half = "000000000002-0123abcd"
    snaps.put_bytes(f"{half}/STARTED", json.dumps({"started_at": clock.now}).encode())
    snaps.put_bytes(f"{half}/index.faiss", b"partial")
    stray = "000000000001-deadbeef"  # a deletion that stopped midway: no marker, no manifest
    snaps.put_bytes(f"{stray}/row_ids.npy", b"left over")
    clock.now += 50
    assert s.collect() == [stray]  # the upload may still be in progress
    clock.now += 51
    assert s.collect() == [half]
    assert names_on_store(snaps) == [s.current_name()]
    assert s.load(model_identity=MODEL, dim=DIM) is not None
