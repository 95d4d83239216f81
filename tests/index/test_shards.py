"""Sharded libraries without Ray: a writer that routes by shard, per-shard readers,
and the ingress's merge (``index.shards``) giving exactly the answer of one unsharded library holding the
same records, in embedded and in cluster mode."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from filters import parse_filter
from index.errors import ImageNotFound, InvalidParameter, Unavailable
from index.reader import LibraryReader, result_objects
from index.search.ann import IndexConfig
from index.search.scores import ScoreCalibration
from index.search.sharding import MAX_SHARDS, shard_of
from index.shards import RANK_KEY, gather_shards, merge_results
from index.storage.backends import Storage, StorageSettings, open_storage
from index.storage.embedded.catalog import Catalog, LibraryInfo
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter

MODEL = {"model": "m", "pretrained": "p", "identity": "m/p", "dim": 16}
#: Snapshots after a few rows, so that shards answer from a snapshot plus a tail; flat throughout
#: (hnsw_min_rows above the library), so every search is exact.
CONFIG = IndexConfig(snapshot_min_rows=8, snapshot_max_tail_rows=8, hnsw_min_rows=100_000)
N = 240


# -- merge and fan-out ---------------------------------------------------------------------------


def _hit(image_id: str, cosine: float, uri: str = "u") -> dict[str, Any]:
    return {"image_id": image_id, "image_uri": uri, "score": max(cosine, 0.0), "tags": {}, RANK_KEY: cosine}


def test_merge_ranks_by_cosine_and_breaks_ties_by_id_then_uri() -> None:
    answers = [
        [_hit("c", 0.9), _hit("x", -0.1)],
        [_hit("b", 0.9, "u2"), _hit("b", 0.9, "u1"), _hit("y", -0.05)],
        [],
    ]
    merged = merge_results(answers, 5)
    assert [(r["image_id"], r["image_uri"]) for r in merged] == [
        ("b", "u1"),
        ("b", "u2"),
        ("c", "u"),
        ("y", "u"),  # both score 0; the cosine still ranks them
        ("x", "u"),
    ]
    assert all(RANK_KEY not in r for r in merged)
    assert len(merge_results(answers, 2)) == 2


def test_a_shard_that_fails_fails_the_request_with_503() -> None:
    async def ok(k: int) -> list[int]:
        return [k]

    async def broken() -> list[int]:
        raise RuntimeError("replica lost its node")

    assert asyncio.run(gather_shards([ok(0), ok(1)], library="lib")) == [[0], [1]]
    with pytest.raises(Unavailable, match=r"library 'lib': shard 1 of 3 cannot answer") as err:
        asyncio.run(gather_shards([ok(0), broken(), ok(2)], library="lib"))
    assert err.value.http_status == 503

    async def not_found() -> list[int]:
        raise ImageNotFound("lib", "x")

    # a service error of a shard is the request's answer (the same on every shard)
    with pytest.raises(ImageNotFound):
        asyncio.run(gather_shards([broken(), not_found()], library="lib"))


# -- sharded library == unsharded library --------------------------------------------------------


@pytest.fixture(params=["embedded", "cluster"])
def settings(request: Any, tmp_path: Path) -> StorageSettings:
    if request.param == "embedded":
        return StorageSettings(storage_root=str(tmp_path / "root"))
    return StorageSettings(
        database_url=request.getfixturevalue("pg_url"),
        object_store_url=f"file://{tmp_path}/bucket",
        cache_dir=str(tmp_path / "cache"),
    )


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fill(writer: LibraryWriter, name: str, vecs: np.ndarray) -> None:
    """The same history for every library: adds in batches (two uris for some ids), snapshots midway,
    tag updates and deletes after it (so shards answer from snapshot + tail)."""
    uid = writer.catalog.get(name).uid
    for start in range(0, N, 40):
        batch = [
            NewRecord(f"img{j}", f"u{j}", vecs[j], tags={"n": j, "even": j % 2 == 0, "k": j % 7})
            for j in range(start, start + 40)
        ]
        if start == 0:  # a second uri of a few ids: same id, so same shard
            batch += [
                NewRecord(f"img{j}", f"v{j}", vecs[N + j], tags={"n": j, "even": False}) for j in range(5)
            ]
        created = writer.add_images(name, uid, batch)
        assert created == [True] * len(batch)
        if start == 120:
            writer.snapshot_all(name)
    assert writer.add_images(name, uid, [NewRecord("img3", "u3", vecs[3], tags={"n": 3})]) == [False]
    for j in range(0, N, 9):
        assert writer.update_tags(name, uid, f"img{j}", None, {"n": j, "even": j % 3 == 0}) >= 1
    for j in range(1, N, 11):
        assert writer.delete_images(name, uid, f"img{j}", None) >= 1


def _readers(storage: Storage, info: LibraryInfo) -> list[LibraryReader]:
    return [
        LibraryReader(data, model_identity="m/p", config=CONFIG, background_pickup=False)
        for data in storage.shards(info)
    ]


def _search(
    readers: list[LibraryReader], query: np.ndarray, k: int, node: object, query_kind: str
) -> list[dict[str, Any]]:
    """What LibraryIndex._search answers per shard, merged as the ingress merges."""
    calibration = ScoreCalibration()
    answers = []
    for reader in readers:
        hits = reader.search(query, k, node)
        scores = calibration.for_query(query_kind, hits.cosines)
        answers.append(
            result_objects(reader, hits, scores, min_score=None, return_frame=False, with_rank=True)
        )
    return merge_results(answers, k)


def test_a_sharded_library_answers_as_an_unsharded_one(settings: StorageSettings) -> None:
    vecs = _vectors(N + 5)
    writer = LibraryWriter(open_storage(settings), config=CONFIG)
    writer.create_library("one", "general_search", None, MODEL)
    described = writer.create_library("four", "general_search", None, MODEL, shards=4)
    assert described["shards"] == 4 and described["image_count"] == 0
    _fill(writer, "one", vecs)
    _fill(writer, "four", vecs)

    storage = open_storage(settings)  # "another replica": its own storage object
    one, four = storage.catalog.get("one"), storage.catalog.get("four")
    assert (one.shards, four.shards) == (1, 4)
    flat, sharded = _readers(storage, one), _readers(storage, four)
    assert sharded[0].snapshot is not None  # answered from a snapshot plus a tail
    # each record is in its id's shard, and only there
    for k, reader in enumerate(sharded):
        ids = {r.image_id for r in reader.records(np.arange(1, 10_000)).values()}
        assert ids and all(shard_of(i, 4) == k for i in ids)
    assert sum(r.live_count for r in sharded) == flat[0].live_count

    queries = _vectors(12, seed=1)
    filters = [
        None,
        parse_filter({"field": "even", "op": "=", "value": True}),
        parse_filter([{"field": "k", "op": "in", "value": [1, 3]}, {"field": "n", "op": "<", "value": 200}]),
    ]
    for node in filters:
        for query_kind in ("image", "text"):
            for k in (1, 10, 60):
                for q in queries:
                    expected = _search(flat, q, k, node, query_kind)
                    got = _search(sharded, q, k, node, query_kind)
                    assert [(r["image_id"], r["image_uri"]) for r in got] == [
                        (r["image_id"], r["image_uri"]) for r in expected
                    ]
                    assert [r["score"] for r in got] == [r["score"] for r in expected]
                    assert [r["tags"] for r in got] == [r["tags"] for r in expected]

    # by id: the vector from the id's shard is the stored one
    rec = sharded[shard_of("img4", 4)].get("img4", "u4")[0]
    assert np.array_equal(sharded[shard_of("img4", 4)].vector_of(rec.row_id), vecs[4])
    assert sharded[(shard_of("img4", 4) + 1) % 4].get("img4", None) == []

    described = storage.describe(four, CONFIG)
    assert described["image_count"] == storage.describe(one, CONFIG)["image_count"]
    assert described["shards"] == 4 and [s["shard"] for s in described["index"]["shards"]] == [0, 1, 2, 3]
    assert described["index"]["kind"] == "flat"
    assert "shards" not in storage.describe(one, CONFIG)["index"]

    for reader in flat + sharded:
        reader.close()
    writer.delete_library("four")
    storage.close()
    writer.close()


def test_sharded_seqs_are_per_shard_and_snapshots_per_shard(settings: StorageSettings) -> None:
    writer = LibraryWriter(open_storage(settings), config=CONFIG)
    writer.create_library("lib", "general_search", None, MODEL, shards=3)
    info = writer.catalog.get("lib")
    vecs = _vectors(30)
    # ids of shard 2 only: shards 0 and 1 never move
    ids = [f"x{i}" for i in range(200) if shard_of(f"x{i}", 3) == 2][:10]
    for i, image_id in enumerate(ids):
        writer.add_images("lib", info.uid, [NewRecord(image_id, "u", vecs[i])])
    stores = [data.open_store(True) for data in writer.storage.shards(info)]
    assert [s.last_seq() for s in stores] == [0, 0, 10]
    assert [s.count() for s in stores] == [0, 0, 10]
    manifests = writer.snapshot_all("lib")
    assert [m.live for m in manifests] == [0, 0, 10]
    with pytest.raises(ValueError, match="shard 3 is not a shard of library 'lib'"):
        writer.storage.library(info, 3)
    for s in stores:
        s.close()
    writer.close()


def test_sharded_library_layout_embedded(tmp_path: Path) -> None:
    """A 1-shard library keeps the layout from before shards (no ``shards`` in library.json, the store
    in the library's directory); a sharded one has shards/<k>/ under it; old descriptors load as 1."""
    catalog = Catalog(tmp_path)
    args: dict[str, Any] = {"model": "m", "pretrained": "p", "model_identity": "m/p", "dim": 16}
    catalog.create("one", "general_search", None, **args)
    catalog.create("two", "general_search", None, shards=2, **args)
    one, two = tmp_path / "libraries" / "one", tmp_path / "libraries" / "two"
    assert "shards" not in json.loads((one / "library.json").read_text())
    assert (one / "records.sqlite").exists() and not (one / "shards").exists()
    assert json.loads((two / "library.json").read_text())["shards"] == 2
    assert all((two / "shards" / str(k) / "records.sqlite").exists() for k in range(2))
    assert not (two / "records.sqlite").exists()
    assert catalog.get("one").shards == 1 and catalog.get("two").shards == 2
    assert catalog.get("one").shard_key(0) == catalog.get("one").key
    assert catalog.get("two").shard_key(1) == f"two:{catalog.get('two').uid}:1"


@pytest.mark.parametrize("shards", [0, -1, MAX_SHARDS + 1, True, 2.0, "2"])
def test_catalog_refuses_a_bad_shard_count(tmp_path: Path, shards: Any) -> None:
    catalog = Catalog(tmp_path)
    with pytest.raises(InvalidParameter, match=r"shards .* is invalid; expected an integer from 1 to 64"):
        catalog.create(
            "lib",
            "general_search",
            None,
            model="m",
            pretrained="p",
            model_identity="m/p",
            dim=16,
            shards=shards,
        )
    assert catalog.names() == []
