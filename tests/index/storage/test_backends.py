"""index.storage.backends end to end, without Ray: a writer and a reader that share nothing but the storage
settings (as two replicas on two nodes do), in embedded mode and in cluster mode (PostgreSQL + an object
store, file:// and S3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.errors import LibraryNotFound
from index.query.reader import LibraryReader
from index.search.ann import IndexConfig
from index.storage.backends import ClusterStorage, EmbeddedStorage, StorageSettings, open_storage
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter

MODEL = {"model": "m", "pretrained": "p", "identity": "m/p", "dim": 16}
#: Snapshots after a few rows, so that readers load one from the store.
CONFIG = IndexConfig(snapshot_min_rows=4, snapshot_max_tail_rows=4)


@pytest.fixture(params=["embedded", "cluster-file", "cluster-s3"])
def settings(request: Any, tmp_path: Path) -> StorageSettings:
    if request.param == "embedded":
        return StorageSettings(storage_root=str(tmp_path / "root"))
    pg_url = request.getfixturevalue("pg_url")
    if request.param == "cluster-file":
        url, options = f"file://{tmp_path}/bucket", {}
    else:
        s3 = request.getfixturevalue("s3_server")
        url, options = f"s3://{s3.new_bucket()}/svc", s3.storage_options
    return StorageSettings(
        database_url=pg_url, object_store_url=url, object_store_options=options, cache_dir=str(tmp_path / "w")
    )


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_reader_elsewhere_sees_the_writers_data(settings: StorageSettings, tmp_path: Path) -> None:
    vecs = vectors(30)
    writer = LibraryWriter(open_storage(settings), config=CONFIG)
    info_obj = writer.create_library("lib", "general_search", None, MODEL)
    assert info_obj["image_count"] == 0
    uid = writer.catalog.get("lib").uid
    for i in range(0, 20, 5):
        writer.add_images(
            "lib",
            uid,
            [NewRecord(f"i{j}", f"u{j}", vecs[j], tags={"n": j}, frame=b"f%d" % j) for j in range(i, i + 5)],
        )
    writer.snapshot_now("lib")
    # "another node": its own storage object and, in cluster mode, its own cache directory
    other = open_storage(settings.model_copy(update={"cache_dir": str(tmp_path / "r")}))
    info = other.catalog.get("lib")
    reader = LibraryReader(other.library(info), model_identity="m/p", config=CONFIG, background_pickup=False)
    assert reader.snapshot is not None  # loaded from the snapshot, then caught up
    hits = reader.search(vecs[7], 3)
    assert reader.records(hits.row_ids)[int(hits.row_ids[0])].image_id == "i7"
    assert reader.read_frame(reader.get("i7", None)[0].frame) == b"f7"
    # writes after the load are seen by the next search (catch-up through the store)
    writer.add_images("lib", uid, [NewRecord("late", "u", vecs[25])])
    hits = reader.search(vecs[25], 1)
    assert reader.records(hits.row_ids)[int(hits.row_ids[0])].image_id == "late"
    assert writer.delete_images("lib", uid, "i3", None) == 1
    assert "i3" not in {r.image_id for r in reader.records(reader.search(vecs[3], 30).row_ids).values()}
    described = other.describe(info, CONFIG)
    assert described["image_count"] == 20 and described["index"]["kind"] == "flat"
    reader.close()
    other.close()
    writer.close()


def test_delete_takes_every_blob_and_a_recreated_library_starts_empty(settings: StorageSettings) -> None:
    storage = open_storage(settings)
    writer = LibraryWriter(storage, config=CONFIG)
    writer.create_library("lib", "general_search", None, MODEL)
    uid = writer.catalog.get("lib").uid
    writer.add_images("lib", uid, [NewRecord(f"i{j}", "u", v, frame=b"x") for j, v in enumerate(vectors(8))])
    writer.snapshot_now("lib")
    writer.delete_library("lib")
    with pytest.raises(LibraryNotFound):
        writer.catalog.get("lib")
    if isinstance(storage, ClusterStorage):
        assert storage.blobs.child("libraries").list() == []  # frames and snapshots went with it
    writer.create_library("lib", "general_search", None, MODEL)
    again = writer.catalog.get("lib")
    assert again.uid != uid
    assert storage.describe(again)["image_count"] == 0
    writer.close()


@pytest.mark.parametrize("settings", ["cluster-file", "cluster-s3"], indirect=True)
def test_the_writer_removes_blobs_of_libraries_deleted_halfway(settings: StorageSettings) -> None:
    storage = open_storage(settings)
    assert isinstance(storage, ClusterStorage)
    orphan = storage.blobs.child("libraries/0123456789ab/frames")
    orphan.put_bytes("deadbeef", b"left by a crash between the database and the object store")
    LibraryWriter(storage, config=CONFIG).close()  # a Writer starting up
    assert open_storage(settings).blobs.child("libraries").list() == []


def test_settings_pick_the_backend_and_refuse_half_a_cluster() -> None:
    assert isinstance(open_storage(StorageSettings(storage_root="/tmp/x-embedded-test")), EmbeddedStorage)
    with pytest.raises(ValueError, match="object_store_url is not set"):
        StorageSettings(database_url="postgresql://u@h/db")
    with pytest.raises(ValueError, match="database_url is not set"):
        StorageSettings(object_store_url="s3://b/p")
    with pytest.raises(ValueError, match="database_url is not"):
        StorageSettings(database_password_env="PW")
    described = StorageSettings(
        database_url="postgresql://u:secret@h/db", object_store_url="s3://b/p"
    ).describe()
    assert described == {"mode": "cluster", "database": "postgresql://u:***@h/db", "object_store": "s3://b/p"}
    # issue 26: what /health shows for passwords that urlsplit misread, and credentials in the store URL
    described = StorageSettings(
        database_url="postgresql://u:s3cr#t@h/db?passwor%64=x", object_store_url="s3://AKID:s3cr?t@b/p"
    ).describe()
    assert described == {
        "mode": "cluster",
        "database": "postgresql://u:***@h/db",
        "object_store": "s3://***@b/p",
    }


def test_snapshots_written_at_once_by_two_threads_leave_a_loadable_current(settings: StorageSettings) -> None:
    """The background snapshot thread and ``snapshot_now`` used to race: one pruned the other's
    temporary directory while it was being written, and CURRENT then named a snapshot without its index
    file (found by the embedded case of the first test above)."""
    import threading

    eager = IndexConfig(snapshot_min_rows=1, snapshot_max_tail_rows=1)
    writer = LibraryWriter(open_storage(settings), config=eager)
    writer.create_library("lib", "general_search", None, MODEL)
    uid = writer.catalog.get("lib").uid
    vecs = vectors(40, seed=3)
    stop = threading.Event()

    def snapshot_often() -> None:
        while not stop.is_set():
            writer.snapshot_now("lib")

    thread = threading.Thread(target=snapshot_often)
    thread.start()
    try:
        for i, v in enumerate(vecs):
            writer.add_images("lib", uid, [NewRecord(f"i{i}", "u", v)])
    finally:
        stop.set()
        thread.join()
    writer.close()
    storage = open_storage(settings)
    data = storage.library(storage.catalog.get("lib"))
    loaded = data.snapshots.load(model_identity="m/p", dim=16, config=eager)
    assert loaded is not None, "CURRENT names a snapshot that cannot be loaded"
    assert loaded[0].live_count >= 1


def test_prune_keeps_a_young_temporary_snapshot_and_removes_an_abandoned_one(tmp_path: Path) -> None:
    import os
    import time

    from index.storage.embedded.snapshot import ABANDONED_TMP_S, _prune

    root = tmp_path / "snapshots"
    young, old = root / ".tmp-000000000002-aaaa", root / ".tmp-000000000001-bbbb"
    for d in (young, old, root / "000000000001-cccc"):
        d.mkdir(parents=True)
    (young / "index.faiss").write_bytes(b"being written")
    past = time.time() - ABANDONED_TMP_S - 10
    os.utime(old, (past, past))
    _prune(root, current="000000000001-cccc", keep_newest=2)
    assert young.exists() and (young / "index.faiss").exists()
    assert not old.exists()
