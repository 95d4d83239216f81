"""Search plans without Ray (``index.query.plan``): on in-process readers (``ReaderShards``), a sharded
library answers exactly as an unsharded one holding the same records (several shard counts, filters,
``min_score``, ties, by id), in embedded and in cluster mode; a failing shard fails the plan; a search
by id reads the vector on its shard first, then asks every shard (one call for a 1-shard library)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from filters import parse_filter
from index.errors import ImageNotFound, LibraryNotFound, Unavailable
from index.query import (
    QueryVector,
    ReaderShards,
    Result,
    SearchPlan,
    ShardRequest,
    StoredVector,
    run_plan,
)
from index.query.merge import RANK_KEY
from index.query.reader import LibraryReader
from index.search.ann import IndexConfig
from index.search.sharding import shard_of
from index.storage.backends import Storage, StorageSettings, open_storage
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter
from tests.index.conftest import unit_vectors

MODEL = {"model": "m", "pretrained": "p", "identity": "m/p", "dim": 16}
#: Snapshots after a few rows, so that shards answer from a snapshot plus a tail; flat throughout
#: (hnsw_min_rows above the library), so every search is exact.
CONFIG = IndexConfig(snapshot_min_rows=8, snapshot_max_tail_rows=8, hnsw_min_rows=100_000)
N = 240
SHARD_COUNTS = (2, 3, 4)
#: Ids whose records all hold the same vector (``vecs[TWIN]``): equal cosines for every query.
TWINS = [f"twin{i}" for i in range(6)]
TWIN = 7


# -- sharded library == unsharded library --------------------------------------------------------


def _fill(writer: LibraryWriter, name: str, vecs: np.ndarray) -> None:
    """The same history for every library: adds in batches (two uris for some ids, a few ids sharing
    one vector), snapshots midway, tag updates and deletes after it (so shards answer from snapshot +
    tail)."""
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
            batch += [NewRecord(t, f"t{i}", vecs[TWIN], tags={"twin": True}) for i, t in enumerate(TWINS)]
        created = writer.add_images(name, uid, batch)
        assert created == [True] * len(batch)
        if start == 120:
            writer.snapshot_all(name)
    assert writer.add_images(name, uid, [NewRecord("img3", "u3", vecs[3], tags={"n": 3})]) == [False]
    for j in range(0, N, 9):
        assert writer.update_tags(name, uid, f"img{j}", None, {"n": j, "even": j % 3 == 0}) >= 1
    for j in range(1, N, 11):
        assert writer.delete_images(name, uid, f"img{j}", None) >= 1


def _shards(storage: Storage, name: str) -> ReaderShards:
    info = storage.catalog.get(name)
    readers = [
        LibraryReader(data, model_identity="m/p", config=CONFIG, background_pickup=False)
        for data in storage.shards(info)
    ]
    return ReaderShards(name, readers)


@pytest.fixture
def libraries(settings: StorageSettings) -> Iterator[tuple[ReaderShards, dict[int, ReaderShards]]]:
    """One unsharded library and one of each of SHARD_COUNTS, with the same history, read by another
    storage object than the writer's ("another replica")."""
    vecs = unit_vectors(N + 5)
    writer = LibraryWriter(open_storage(settings), config=CONFIG)
    writer.create_library("one", "general_search", None, MODEL)
    _fill(writer, "one", vecs)
    for s in SHARD_COUNTS:
        writer.create_library(f"lib{s}", "general_search", None, MODEL, shards=s)
        _fill(writer, f"lib{s}", vecs)
    storage = open_storage(settings)
    one = _shards(storage, "one")
    sharded = {s: _shards(storage, f"lib{s}") for s in SHARD_COUNTS}
    yield one, sharded
    for shards in [one, *sharded.values()]:
        for reader in shards.readers:
            reader.close()
    storage.close()
    writer.close()


def _run(plan: SearchPlan, shards: ReaderShards) -> list[Result]:
    return asyncio.run(run_plan(plan, shards))


def _same(got: list[Result], expected: list[Result]) -> None:
    assert [(r["image_id"], r["image_uri"]) for r in got] == [
        (r["image_id"], r["image_uri"]) for r in expected
    ]
    assert [r["score"] for r in got] == [r["score"] for r in expected]
    assert [r["tags"] for r in got] == [r["tags"] for r in expected]
    assert all(RANK_KEY not in r for r in got)


FILTERS = [
    None,
    {"field": "even", "op": "=", "value": True},
    [{"field": "k", "op": "in", "value": [1, 3]}, {"field": "n", "op": "<", "value": 200}],
]


def test_a_sharded_library_answers_as_an_unsharded_one(
    libraries: tuple[ReaderShards, dict[int, ReaderShards]],
) -> None:
    one, sharded = libraries
    assert sharded[4].readers[0].snapshot is not None  # answered from a snapshot plus a tail
    for s, shards in sharded.items():
        assert sum(r.live_count for r in shards.readers) == one.readers[0].live_count, s
    queries = unit_vectors(6, seed=1)
    for raw in FILTERS:
        node = parse_filter(raw)
        for query_kind in ("image", "text"):
            for k in (1, 10, 60):
                for min_score in (None, 0.3):
                    request = ShardRequest(top_k=k, node=node, min_score=min_score)
                    for q in queries:
                        query = QueryVector(q, None, query_kind)
                        expected = _run(SearchPlan.with_vector("one", 1, query, request), one)
                        if min_score is not None:
                            assert all(r["score"] >= min_score for r in expected)
                        for s, shards in sharded.items():
                            got = _run(SearchPlan.with_vector(f"lib{s}", s, query, request), shards)
                            _same(got, expected)


def test_equal_cosines_are_ordered_by_id_then_uri_on_any_shard_count(
    libraries: tuple[ReaderShards, dict[int, ReaderShards]],
) -> None:
    """Records with the same vector tie; within the top-k they come back by image_id, then image_uri,
    however they are spread over shards. (At the cut, which of several tied records a shard keeps is
    the index's choice, sharded or not.)"""
    one, sharded = libraries
    vecs = unit_vectors(N + 5)
    request = ShardRequest(
        top_k=len(TWINS) + 3, node=parse_filter({"field": "twin", "op": "=", "value": True})
    )
    query = QueryVector(vecs[TWIN], None, "image")
    expected = _run(SearchPlan.with_vector("one", 1, query, request), one)
    assert [r["image_id"] for r in expected] == TWINS
    assert len({r["score"] for r in expected}) == 1
    for s, shards in sharded.items():
        assert len({shard_of(t, s) for t in TWINS}) > 1  # the twins are spread over shards
        _same(_run(SearchPlan.with_vector(f"lib{s}", s, query, request), shards), expected)


def test_by_id_answers_as_an_unsharded_library(
    libraries: tuple[ReaderShards, dict[int, ReaderShards]],
) -> None:
    one, sharded = libraries
    request = ShardRequest(top_k=12, node=parse_filter({"field": "even", "op": "=", "value": True}))
    for image_id, image_uri in [("img4", None), ("img4", "u4"), ("img2", "v2"), ("twin3", None)]:
        expected = _run(SearchPlan.by_id("one", 1, image_id, image_uri, request), one)
        assert expected
        for s, shards in sharded.items():
            _same(_run(SearchPlan.by_id(f"lib{s}", s, image_id, image_uri, request), shards), expected)
    for s, shards in {1: one, **sharded}.items():
        with pytest.raises(ImageNotFound):  # deleted (1 % 11 == 1) and never added
            _run(SearchPlan.by_id(f"lib{s}", s, "img1", None, request), shards)
        with pytest.raises(ImageNotFound):
            _run(SearchPlan.by_id(f"lib{s}", s, "img4", "nope", request), shards)


# -- rounds and failures, on a searcher that records its calls ------------------------------------


class Recording:
    """A searcher whose shards answer from fixed lists and record every call; ``broken`` shards raise
    ``error``."""

    def __init__(self, answers: dict[int, list[Result]], broken: frozenset[int] = frozenset()) -> None:
        self.answers = answers
        self.broken = broken
        self.error: BaseException = RuntimeError("replica lost its node")
        self.calls: list[tuple[Any, ...]] = []
        self.vector = np.ones(4, np.float32) / 2

    def _answer(self, shard: int) -> list[Result]:
        if shard in self.broken:
            raise self.error
        return self.answers[shard]

    async def search(self, shard: int, query: QueryVector, request: ShardRequest) -> list[Result]:
        self.calls.append(("search", shard, query.vector_kind, query.query_kind))
        await asyncio.sleep(0)
        return self._answer(shard)

    async def stored_vector(self, query: StoredVector) -> QueryVector:
        self.calls.append(("stored_vector", query.shard, query.image_id))
        self._answer(query.shard)
        return QueryVector(self.vector, "face", query.query_kind)

    async def search_stored(self, query: StoredVector, request: ShardRequest) -> list[Result]:
        self.calls.append(("search_stored", query.shard, query.image_id))
        return self._answer(query.shard)


def _hit(image_id: str, cosine: float) -> Result:
    return {"image_id": image_id, "image_uri": "u", "score": cosine, "tags": {}, RANK_KEY: cosine}


ANSWERS = {0: [_hit("a", 0.9), _hit("d", 0.2)], 1: [_hit("b", 0.8)], 2: [_hit("c", 0.95)], 3: []}


def test_by_id_reads_the_vector_on_its_shard_then_asks_every_shard() -> None:
    searcher = Recording(ANSWERS)
    plan = SearchPlan.by_id("lib", 4, "img-0001", None, ShardRequest(top_k=3))
    home = shard_of("img-0001", 4)
    assert plan.rounds == 2 and plan.shards == (0, 1, 2, 3)
    assert plan.query == StoredVector("img-0001", None, home)
    results = asyncio.run(run_plan(plan, searcher))
    assert [r["image_id"] for r in results] == ["c", "a", "b"]
    # round 1 on the id's shard, then every shard with the stored vector's kind
    assert searcher.calls[0] == ("stored_vector", home, "img-0001")
    assert sorted(searcher.calls[1:]) == [("search", k, "face", "image") for k in range(4)]


def test_by_id_on_one_shard_is_one_call() -> None:
    searcher = Recording(ANSWERS)
    plan = SearchPlan.by_id("lib", 1, "x", "u", ShardRequest(top_k=1))
    assert plan.rounds == 1
    assert [r["image_id"] for r in asyncio.run(run_plan(plan, searcher))] == ["a"]
    assert searcher.calls == [("search_stored", 0, "x")]


def test_a_vector_search_asks_every_shard_once() -> None:
    searcher = Recording(ANSWERS)
    plan = SearchPlan.with_vector("lib", 4, QueryVector(np.zeros(4), "whole", "text"), ShardRequest(top_k=10))
    assert plan.rounds == 1
    assert [r["image_id"] for r in asyncio.run(run_plan(plan, searcher))] == ["c", "a", "b", "d"]
    assert sorted(searcher.calls) == [("search", k, "whole", "text") for k in range(4)]


@pytest.mark.parametrize("by_id", [False, True])
def test_a_failing_shard_fails_the_plan_with_503(by_id: bool) -> None:
    """Never a partial answer: any shard of several that cannot answer fails the plan."""
    for broken in range(4):
        searcher = Recording(ANSWERS, broken=frozenset({broken}))
        home = shard_of("img-0001", 4)
        if by_id:
            plan = SearchPlan.by_id("lib", 4, "img-0001", None, ShardRequest(top_k=3))
        else:
            plan = SearchPlan.with_vector(
                "lib", 4, QueryVector(np.zeros(4), None, "image"), ShardRequest(top_k=3)
            )
        if by_id and broken == home:
            # round 1 is one call: its error is the plan's, as it is
            with pytest.raises(RuntimeError, match="replica lost its node"):
                asyncio.run(run_plan(plan, searcher))
            continue
        with pytest.raises(Unavailable, match=rf"library 'lib': shard {broken} of 4 cannot answer") as err:
            asyncio.run(run_plan(plan, searcher))
        assert err.value.http_status == 503


def test_a_shards_service_error_is_the_plans_answer() -> None:
    searcher = Recording(ANSWERS, broken=frozenset({1, 2}))
    searcher.error = LibraryNotFound("lib")
    plan = SearchPlan.with_vector("lib", 4, QueryVector(np.zeros(4), None, "image"), ShardRequest(top_k=3))
    with pytest.raises(LibraryNotFound):
        asyncio.run(run_plan(plan, searcher))


def test_one_shard_lets_its_error_through_as_it_is() -> None:
    """A 1-shard library is one call, as before shards existed: its errors are not turned into 503."""
    searcher = Recording({0: []}, broken=frozenset({0}))
    plan = SearchPlan.with_vector("lib", 1, QueryVector(np.zeros(4), None, "image"), ShardRequest(top_k=3))
    with pytest.raises(RuntimeError, match="replica lost its node"):
        asyncio.run(run_plan(plan, searcher))
