"""The ingress app's routes over HTTP without Ray (``deployments.routes``, ``deployments.searchers``): the
app a replica serves (``replica_app``), a replica with stand-in handles, a real catalog. Routes reach
the replica through the app's state; searches fan out to every shard and merge; a shard that fails fails
the request with 503; a search by id reads the vector on the id's shard first; the replica's limits and
API keys are the app's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.config import AppArgs
from deployments.ingress import PREFIX, Ingress, replica_app
from deployments.readiness import DeploymentStates
from deployments.routes.replica import Replica
from deployments.searchers import IndexHandles
from index.model.spec import resolve_model_spec
from index.query.merge import RANK_KEY
from index.search.sharding import shard_of
from index.storage.embedded.catalog import Catalog

MODEL = {"identity": "m/p", "face_identity": None}
SHARDS = 3


class Call:
    def __init__(self, handle: Any, method: str) -> None:
        self.handle, self.method = handle, method

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle.answer(self.method, args, kwargs)


class FakeIndex:
    """LibraryIndex stand-in: shard k of the library answers one hit with cosine 0.9 - 0.1 k; ``broken``
    shards raise; every call is recorded as (method, shard)."""

    def __init__(
        self, broken: frozenset[int] = frozenset(), key: str | None = None, calls: Any = None
    ) -> None:
        self.broken, self.key = broken, key
        self.calls: list[tuple[str, int]] = [] if calls is None else calls

    def options(self, *, multiplexed_model_id: str) -> FakeIndex:
        return FakeIndex(self.broken, multiplexed_model_id, self.calls)

    def __getattr__(self, method: str) -> Call:
        return Call(self, method)

    def answer(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.key is not None
        shard = int(self.key.rsplit(":", 2)[-1]) if self.key.count(":") == 2 else 0
        self.calls.append((method, shard))
        if shard in self.broken:
            raise RuntimeError("replica lost its node")
        if method == "stored_vector":
            return np.ones(8, np.float32), "whole"
        cosine = 0.9 - 0.1 * shard
        hit = {"image_id": f"s{shard}", "image_uri": "u", "score": cosine, "tags": {}, RANK_KEY: cosine}
        return {"results": [hit], "replica": "r", "applied_seq": 0}


class Writer:
    def __getattr__(self, method: str) -> Call:
        return Call(self, method)

    def answer(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return {"library_name": args[0]}


async def _no_controller() -> dict[str, Any]:
    return {"applications": {}}


def _replica(tmp_path: Path, index: FakeIndex, **args: Any) -> Replica:
    app_args = AppArgs.model_validate({"model": "tiny-random", "storage_root": str(tmp_path), **args})
    replica = Replica(
        encoder=None,  # type: ignore[arg-type]
        index=IndexHandles(index, {}),  # type: ignore[arg-type]
        writer=Writer(),  # type: ignore[arg-type]
        importer=None,  # type: ignore[arg-type]
        states=DeploymentStates("app", _no_controller),
        args=app_args,
        preprocess=resolve_model_spec("tiny-random").preprocess,
    )
    replica.model = dict(MODEL)

    async def encode_text(text: str) -> np.ndarray:
        return np.ones(8, np.float32) / np.sqrt(8)

    replica.encode_text = encode_text  # type: ignore[method-assign]
    return replica


@pytest.fixture
def serve(tmp_path: Path) -> Any:
    """``serve(index, **args)``: a client of the app a replica with these builder args serves, its
    LibraryIndex calls going to ``index``; a library ``lib`` of SHARDS shards in its catalog."""
    Catalog(tmp_path).create(
        "lib", "general_search", None, model="m", pretrained="p", model_identity="m/p", dim=8, shards=SHARDS
    )

    def start(index: FakeIndex, **args: Any) -> TestClient:
        return TestClient(replica_app(_replica(tmp_path, index, **args)))

    return start


def test_a_search_asks_every_shard_and_merges(serve: Any) -> None:
    index = FakeIndex()
    r = serve(index).post(
        PREFIX + "/search/by-text", json={"library_name": "lib", "query_text": "a", "top_k": 2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["results"] == [
        {"image_id": "s0", "image_uri": "u", "score": 0.9, "tags": {}},
        {"image_id": "s1", "image_uri": "u", "score": 0.8, "tags": {}},
    ]
    assert sorted(index.calls) == [("search", k) for k in range(SHARDS)]


def test_by_id_reads_the_vector_on_the_ids_shard_first(serve: Any) -> None:
    index = FakeIndex()
    r = serve(index).post(PREFIX + "/search/by-id", json={"library_name": "lib", "image_id": "img-0001"})
    assert r.status_code == 200, r.text
    assert [x["image_id"] for x in r.json()["data"]["results"]] == ["s0", "s1", "s2"]
    assert index.calls[0] == ("stored_vector", shard_of("img-0001", SHARDS))
    assert sorted(index.calls[1:]) == [("search", k) for k in range(SHARDS)]


@pytest.mark.parametrize("route", ["by-text", "by-id"])
def test_a_failing_shard_fails_the_request_with_503(serve: Any, route: str) -> None:
    broken = (shard_of("img-0001", SHARDS) + 1) % SHARDS  # not the id's shard: round 1 succeeds
    body = {"library_name": "lib", "query_text": "a", "image_id": "img-0001"}
    body.pop("query_text" if route == "by-id" else "image_id")
    r = serve(FakeIndex(broken=frozenset({broken}))).post(PREFIX + f"/search/{route}", json=body)
    assert r.status_code == 503
    assert r.json() == {
        "status": "UNAVAILABLE",
        "message": f"library 'lib': shard {broken} of {SHARDS} cannot answer; retry later",
        "data": None,
    }


def test_the_other_resources_reach_the_replica(serve: Any) -> None:
    client = serve(FakeIndex())
    listed = client.get(PREFIX + "/library/list").json()["data"]["libraries"]
    assert [lib["library_name"] for lib in listed] == ["lib"]
    assert client.get(PREFIX + "/library/lib").json()["data"]["shards"] == SHARDS
    assert client.post(PREFIX + "/library/delete", json={"library_name": "lib"}).json()["data"] == {
        "library_name": "lib"
    }
    r = client.get(PREFIX + "/library/nope")
    assert r.status_code == 404 and r.json()["status"] == "LIBRARY_NOT_FOUND"
    r = client.get(PREFIX + "/image/tasks/results/not-a-task-id")
    assert r.status_code == 404 and r.json()["status"] == "TASK_NOT_FOUND"
    assert client.get("/").status_code == 200


def test_the_replicas_limits_and_keys_are_its_apps(serve: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("key-1234567890abcdef\n")
    client = serve(FakeIndex(), api_keys_file=str(keys), limits={"max_body_bytes": 1024})
    assert client.get(PREFIX + "/library/list").status_code == 401
    auth = {"Authorization": "Bearer key-1234567890abcdef"}
    assert client.get(PREFIX + "/library/list", headers=auth).status_code == 200
    r = client.post(
        PREFIX + "/search/by-text", json={"library_name": "lib", "query_text": "a" * 2000}, headers=auth
    )
    assert r.status_code == 413 and r.json()["status"] == "PAYLOAD_TOO_LARGE"


def test_each_replica_builds_the_app_it_serves() -> None:
    """Serve builds no app when it decorates the class (``@serve.ingress()``): each replica asks its
    own object for one, so the state the routes and middlewares read is that replica's."""
    wrapped = Ingress.func_or_class  # type: ignore[attr-defined]  # the class under Serve's decorators
    assert wrapped.__serve_build_asgi_app__.__qualname__ == "Ingress.__serve_build_asgi_app__"
    assert not hasattr(wrapped, "_asgi_app")
