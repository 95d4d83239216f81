"""index.storage.migrate: an embedded store copied into cluster storage (the real PostgreSQL fixture and an
object store: a file:// directory, and S3 on a moto server) holds the same libraries and records, field for
field and vector bit for bit; re-running writes nothing; an interrupted run is finished by the next."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from index.storage import migrate as migrate_module
from index.storage.backends import ClusterStorage, StorageSettings
from index.storage.embedded.catalog import Catalog, LibraryInfo
from index.storage.embedded.store import LibraryStore, NewRecord
from index.storage.migrate import MigrationRefused, main, migrate

DIM = 8
MODEL = {"model": "tiny-random", "pretrained": "random", "model_identity": "tiny-random/random", "dim": DIM}


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """An embedded store with two libraries:

    - ``photos`` (general_search): frames (two records share one), nested tags, one image id under two
      URIs, tags updated later, records deleted (one that held a frame) and one re-added after delete;
    - ``items`` (item_search): detection extras, vector kind ``item``, no frames.
    """
    root = tmp_path / "data"
    catalog = Catalog(root)
    rng = np.random.default_rng(7)
    photos = catalog.create("photos", "general_search", "holiday photos", **MODEL)
    shared = rng.bytes(3000)
    with LibraryStore(catalog.library_dir("photos")) as store:
        store.upsert(
            [
                NewRecord(
                    f"p{i}",
                    f"s3://pics/p{i}.jpg",
                    unit(rng),
                    tags={"n": i, "place": ["rome", "paris"][i % 2], "meta": {"iso": 100 * i, "f": 1.8}},
                    frame=shared if i in (3, 4) else (rng.bytes(1000 + 50 * i) if i % 3 == 0 else None),
                )
                for i in range(30)
            ]
        )
        store.upsert([NewRecord("p1", "s3://pics/p1-copy.jpg", unit(rng), tags={"copy": True})])
        time.sleep(0.01)  # updated_at differs from created_at
        store.update_tags("p2", None, {"n": 2, "edited": "yes"})
        store.delete("p6", None)  # held a frame
        store.delete("p7", "s3://pics/p7.jpg")
        store.delete("p8", None)
        store.upsert(
            [NewRecord("p8", "s3://pics/p8.jpg", unit(rng), tags={"again": 1}, frame=rng.bytes(500))]
        )
    catalog.create("items", "item_search", None, index_kind="flat", **MODEL)
    with LibraryStore(catalog.library_dir("items")) as store:
        store.upsert(
            [
                NewRecord(
                    f"i{i}",
                    f"https://shop.example/i{i}.png",
                    unit(rng),
                    tags={"sku": f"A{i:03d}"},
                    vector_kind="item",
                    extra={"detection": {"kind": "saliency", "box": [0.1, 0.2, 0.7, 0.9], "score": i / 100}},
                )
                for i in range(20)
            ]
        )
        store.delete("i5", None)
    assert photos.uid != catalog.get("items").uid
    return root


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> StorageSettings:
    """Cluster storage: this test's PostgreSQL schema and a file:// object store."""
    return StorageSettings(
        database_url=pg_url,
        object_store_url=(tmp_path / "objects").as_uri(),
        cache_dir=str(tmp_path / "cache"),
    )


def dump(store: Any) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Every live record of a store (either backend) with every field a copy must keep: vectors and
    frames as bytes, so equality is bit for bit. Row ids and seqs belong to each store and are left out."""
    out = {}
    for change in store.changes_since(0, live_only=True):
        (rec,) = store.fetch([change.row_id]).values()
        frame = store.read_frame(rec.frame) if rec.frame is not None else None
        out[(rec.image_id, rec.image_uri)] = (
            rec.tags,
            rec.vector_kind,
            rec.extra,
            rec.frame,
            rec.created_at,
            rec.updated_at,
            change.vector.tobytes(),
            frame,
        )
    return out


def assert_same(source_root: Path, settings: StorageSettings) -> dict[str, int]:
    """The target holds exactly the source's libraries and live records; returns each library's
    last_seq in the target."""
    catalog = Catalog(source_root)
    target = ClusterStorage(settings)
    try:
        assert sorted(target.catalog.list(), key=lambda i: i.name) == catalog.list()
        seqs = {}
        for info in catalog.list():
            with LibraryStore(catalog.library_dir(info.name), readonly=True) as src:
                expected = dump(src)
            with target.library(info).open_store(True) as dst:
                got = dump(dst)
                seqs[info.name] = dst.last_seq()
                assert dst.count() == len(expected)
            assert got.keys() == expected.keys()
            for key, fields in expected.items():
                assert got[key] == fields, key
        return seqs
    finally:
        target.close()


@pytest.mark.parametrize("object_store", ["file", "s3"])
def test_every_library_and_record_is_copied_exactly(
    source: Path, settings: StorageSettings, object_store: str, request: pytest.FixtureRequest
) -> None:
    if object_store == "s3":
        s3 = request.getfixturevalue("s3_server")
        settings = settings.model_copy(
            update={
                "object_store_url": f"s3://{s3.new_bucket()}/prod",
                "object_store_options": s3.storage_options,
            }
        )
    results = migrate(source, settings)
    assert [(r.name, r.written, r.source_records, r.target_records) for r in results] == [
        ("items", 19, 19, 19),
        ("photos", 29, 29, 29),
    ]
    seqs = assert_same(source, settings)
    assert all(seq > 0 for seq in seqs.values())
    with LibraryStore(source / "libraries" / "photos", readonly=True) as src:
        (shared,) = src.get("p3")
        assert shared.frame is not None and shared.frame == src.get("p4")[0].frame
        assert src.get("p2")[0].updated_at > src.get("p2")[0].created_at  # timestamps really were kept


def test_a_rerun_writes_nothing(source: Path, settings: StorageSettings) -> None:
    migrate(source, settings)
    seqs = assert_same(source, settings)
    again = migrate(source, settings)
    assert [(r.written, r.retimed, r.unchanged) for r in again] == [(0, 0, 19), (0, 0, 29)]
    assert assert_same(source, settings) == seqs  # not one sequence number taken


def test_an_interrupted_run_is_finished_by_the_next(source: Path, settings: StorageSettings) -> None:
    class Crash(Exception):
        pass

    def crash_after_two_batches(name: str, done: int) -> None:
        if name == "photos" and done >= 8:
            raise Crash

    # Small batches, and frames written one upsert each (batch_bytes below one frame's size).
    with pytest.raises(Crash):
        migrate(source, settings, batch_records=4, batch_bytes=100, on_batch=crash_after_two_batches)
    results = migrate(source, settings, batch_records=4, batch_bytes=100)
    by_name = {r.name: r for r in results}
    assert (by_name["items"].written, by_name["items"].unchanged) == (0, 19)  # finished in the first run
    assert (by_name["photos"].written, by_name["photos"].unchanged) == (29 - 8, 8)
    assert_same(source, settings)


def test_a_crash_before_the_timestamps_are_set_is_repaired(
    source: Path, settings: StorageSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lost(*args: object, **kwargs: object) -> int:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(migrate_module, "set_timestamps", lost)
    with pytest.raises(ConnectionError):
        migrate(source, settings, libraries=["items"], batch_records=5)
    monkeypatch.undo()
    results = migrate(source, settings)
    by_name = {r.name: r for r in results}
    # the first batch's records are there but for their times; the rest was never reached
    assert (by_name["items"].retimed, by_name["items"].written) == (5, 14)
    assert_same(source, settings)


def test_a_library_of_the_same_name_from_elsewhere_is_refused(
    source: Path, settings: StorageSettings
) -> None:
    target = ClusterStorage(settings)
    try:
        other = target.catalog.create("photos", "general_search", None, **MODEL)
    finally:
        target.close()
    with pytest.raises(MigrationRefused) as err:
        migrate(source, settings)
    message = str(err.value)
    assert "'photos'" in message and other.uid in message and Catalog(source).get("photos").uid in message
    assert "nothing was written" in message
    target = ClusterStorage(settings)
    try:
        assert target.catalog.names() == ["photos"]  # items was not copied either
    finally:
        target.close()


def test_a_dry_run_lists_the_plan_and_writes_nothing(source: Path, settings: StorageSettings) -> None:
    lines: list[str] = []
    assert migrate(source, settings, dry_run=True, out=lines.append) == []
    assert lines[0].startswith("items: 19 records, mode item_search") and lines[0].endswith("create")
    assert lines[1].startswith("photos: 29 records, mode general_search")
    assert "nothing written" in lines[-1]
    target = ClusterStorage(settings)
    try:
        assert target.catalog.names() == []
    finally:
        target.close()
    # a library left half-copied is listed as continued, with what the target holds
    with pytest.raises(RuntimeError):
        migrate(source, settings, libraries=["photos"], batch_records=10, on_batch=_stop)
    lines.clear()
    migrate(source, settings, dry_run=True, out=lines.append)
    assert lines[1].endswith("continue (the target holds 10 of its records)")


def _stop(name: str, done: int) -> None:
    raise RuntimeError("stopped")


def test_the_command(source: Path, pg_url: str, pg_server: Any, tmp_path: Path, capsys: Any) -> None:
    secret = tmp_path / "db-password"
    secret.write_text(pg_server.password + "\n")
    url = pg_url.replace(f":{quote(pg_server.password, safe='')}@", "@")
    assert pg_server.password not in url
    objects = (tmp_path / "objects").as_uri()
    argv = [
        "--from", str(source), "--database-url", url, "--database-password-file", str(secret),
        "--object-store-url", objects, "--object-store-options", "{}", "--no-progress",
    ]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    assert "photos: 29 records" in capsys.readouterr().out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "photos: 29 records written" in out and "the target holds 29 live records, the source 29" in out
    assert main(argv) == 0
    assert "photos: 0 records written, 0 timestamps restored, 29 already there" in capsys.readouterr().out
    settings = StorageSettings(database_url=url, database_password_file=str(secret), object_store_url=objects)
    assert_same(source, settings)

    assert main([*argv[:1], str(tmp_path / "nowhere"), *argv[2:]]) == 1
    assert "no embedded store" in capsys.readouterr().err
    secret.write_text("wrong\n")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err and "wrong" not in err and pg_server.password not in err


def test_the_help_says_what_is_not_copied(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "import tasks" in text and "snapshots" in text


def test_library_info_is_kept_whole(source: Path, settings: StorageSettings) -> None:
    migrate(source, settings, libraries=["items"])
    target = ClusterStorage(settings)
    try:
        got = target.catalog.get("items")
    finally:
        target.close()
    want: LibraryInfo = Catalog(source).get("items")
    assert got == want and got.index_kind == "flat" and got.created_at == want.created_at


def test_a_sharded_library_is_copied_shard_by_shard(tmp_path: Path, settings: StorageSettings) -> None:
    from index.search.sharding import shard_of
    from index.storage.embedded.catalog import shard_dirs
    from index.writer import LibraryWriter

    root = tmp_path / "sharded"
    writer = LibraryWriter(root)
    model = {"model": "tiny-random", "pretrained": "random", "identity": "tiny-random/random", "dim": DIM}
    writer.create_library("big", "general_search", None, model, shards=3)
    uid = writer.catalog.get("big").uid
    rng = np.random.default_rng(3)
    writer.add_images(
        "big",
        uid,
        [NewRecord(f"b{i}", f"u{i}", unit(rng), tags={"n": i}, frame=rng.bytes(100)) for i in range(40)],
    )
    writer.delete_images("big", uid, "b5", None)
    writer.close()
    results = migrate(root, settings)
    assert [(r.name, r.written, r.source_records, r.target_records) for r in results] == [("big", 39, 39, 39)]
    info = Catalog(root).get("big")
    target = ClusterStorage(settings)
    try:
        assert target.catalog.get("big") == info
        for k, shard_dir in enumerate(shard_dirs(root / "libraries" / "big", 3)):
            with (
                LibraryStore(shard_dir, readonly=True) as src,
                target.library(info, k).open_store(True) as dst,
            ):
                expected, got = dump(src), dump(dst)
                assert got == expected and expected
                assert all(shard_of(image_id, 3) == k for image_id, _ in got)
    finally:
        target.close()
    assert [(r.written, r.unchanged) for r in migrate(root, settings)] == [(0, 39)]
