"""The ingress reads a library's catalog entry once per request: in cluster mode every read is a round
trip to PostgreSQL (issue 13). Checked on the routes and the replica's state (``deployments.routes``),
without Ray: the handles and the encoder are stand-ins, the catalog counts its reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from deployments.config import AppArgs
from deployments.readiness import DeploymentStates
from deployments.routes import images, operations, search
from deployments.routes.replica import Replica
from deployments.schemas import AddImage, SearchById, SearchByImage, SearchByText
from deployments.searchers import IndexHandles
from index.detect.modes import Embedded
from index.errors import LibraryNotFound
from index.model.spec import resolve_model_spec
from index.storage.embedded.catalog import LibraryInfo
from tests.images import image_b64

MODEL = {"identity": "tiny-random/random-seed-0", "face_identity": None}
INFO = LibraryInfo(
    name="lib",
    mode="general_search",
    description=None,
    created_at=0.0,
    model="tiny-random",
    pretrained="random",
    model_identity=MODEL["identity"],
    dim=8,
    uid="0123456789ab",
)


class CountingCatalog:
    def __init__(self) -> None:
        self.reads = 0

    def get(self, name: str) -> LibraryInfo:
        self.reads += 1
        if name != INFO.name:
            raise LibraryNotFound(name)
        return INFO


class Method:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.answer


class Handle:
    """Every method answers ``answer``; ``options`` (multiplexing) keeps it."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def options(self, **kwargs: Any) -> Handle:
        return self

    def __getattr__(self, name: str) -> Method:
        return Method(self.answer)


async def _no_controller() -> dict[str, Any]:
    return {"applications": {}}


@pytest.fixture
def ingress(tmp_path: Any) -> Any:
    """A replica's state built by its real constructor, with stand-in handles and encoder."""
    args = AppArgs.model_validate({"model": "tiny-random", "storage_root": str(tmp_path)})
    obj = Replica(
        encoder=Handle(None),  # type: ignore[arg-type]
        index=IndexHandles(Handle({"results": [], "replica": "r", "applied_seq": 0}), {}),  # type: ignore[arg-type]
        writer=Handle([True]),  # type: ignore[arg-type]
        importer=Handle(None),  # type: ignore[arg-type]
        states=DeploymentStates("app", _no_controller),
        args=args,
        preprocess=resolve_model_spec("tiny-random").preprocess,
    )
    obj.catalog = CountingCatalog()  # type: ignore[assignment]
    obj.model = {"identity": MODEL["identity"], "face_identity": None}

    async def embed(image: Any, mode: str, *, query: bool) -> Embedded:
        return Embedded(np.ones(8, np.float32) / np.sqrt(8), "whole", None, None)

    async def encode_text(text: str) -> np.ndarray:
        return np.ones(8, np.float32) / np.sqrt(8)

    obj.embed = embed  # type: ignore[method-assign]
    obj.encode_text = encode_text  # type: ignore[method-assign]
    return obj


ROUTES: dict[str, Callable[[Any, Replica], Coroutine[Any, Any, Any]]] = {
    "search_by_image": search.search_by_image,
    "search_by_text": search.search_by_text,
    "search_by_id": search.search_by_id,
    "add_image": images.add_image,
}


@pytest.mark.parametrize(
    "route, body",
    [
        ("search_by_image", SearchByImage(library_name="lib", image_base64=image_b64(1))),
        ("search_by_text", SearchByText(library_name="lib", query_text="a red shoe")),
        ("search_by_id", SearchById(library_name="lib", image_id="a")),
        ("add_image", AddImage(library_name="lib", image_id="a", image_uri="u", image_base64=image_b64(2))),
    ],
)
def test_one_catalog_read_per_request(ingress: Any, route: str, body: Any) -> None:
    response = asyncio.run(ROUTES[route](body, ingress))
    assert response.status_code == 200
    assert ingress.catalog.reads == 1


def test_a_missing_library_is_still_404_after_the_image_was_checked(ingress: Any) -> None:
    body = SearchByImage(library_name="nope", image_base64=image_b64(1))
    with pytest.raises(LibraryNotFound):
        asyncio.run(search.search_by_image(body, ingress))
    assert ingress.catalog.reads == 1


def test_health_answers_503_at_once_when_the_database_and_the_encoder_are_down(ingress: Any) -> None:
    """/health must answer fast whatever is down (a readiness probe waits a few seconds at most): no
    wait for the Encoder, and a catalog that cannot be read is a reason, not an error."""
    import json
    import time

    from deployments.readiness import DeploymentStates, GuardedHandle
    from index.errors import Unavailable

    class DownCatalog:
        def names(self) -> list[str]:
            raise Unavailable("the database is unavailable; retry later")

    answer = {
        "applications": {
            "app": {
                "deployments": {
                    name: {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}
                    for name in ("Ingress", "LibraryIndex", "Writer", "Importer")
                }
                | {"Encoder": {"status": "UNHEALTHY", "target_num_replicas": 1, "replicas": []}}
            }
        }
    }

    async def controller() -> dict[str, Any]:
        return answer

    async def probe() -> Any:
        ingress.states = DeploymentStates("app", controller)
        await ingress.states.current()
        ingress.encoder = GuardedHandle(Handle(None), "Encoder", ingress.states, wait_s=30)
        ingress.model = None
        ingress.catalog = DownCatalog()
        return await operations.health(ingress)

    started = time.monotonic()
    response = asyncio.run(probe())
    assert time.monotonic() - started < 5
    body = json.loads(response.body)
    assert response.status_code == 503 and body["status"] == "UNAVAILABLE"
    assert "'Encoder' has no running replica" in body["message"]
    assert "storage: the database is unavailable" in body["message"]
    assert body["data"]["ready"] is False and "libraries" not in body["data"]
    assert body["data"]["storage"]["mode"] == "embedded"
