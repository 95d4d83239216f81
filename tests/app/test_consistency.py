"""Read-your-writes across two LibraryIndex replicas, restart on the same storage (overload and replica
failure: test_resilience.py; kill -9 of the whole service: test_crash.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ray import serve

from tests.app.conftest import API_KEY, APP, deploy, wait_ready
from tests.images import image_b64

pytestmark = pytest.mark.ray


def test_every_replica_sees_each_write_at_once(client, library, storage_root):
    """Every answer after an acknowledged write or delete reflects it, from each of the two LibraryIndex
    replicas: searches go straight to the LibraryIndex handle, in bursts until both have answered."""
    from index.storage.embedded.catalog import Catalog

    index = serve.get_deployment_handle("LibraryIndex", app_name=APP)
    key = Catalog(storage_root).get(library).key
    for i in range(8):
        client.ok(
            "/image/add",
            {"library_name": library, "image_id": f"i{i}", "image_uri": "u", "image_base64": image_b64(i)},
        )
        assert client.post("/image/get", {"library_name": library, "image_id": f"i{i}"})[0] == 200
        for ans in _search_until_both_replicas_answer(index, key, _pixels(i), top_k=1):
            assert ans["results"][0]["image_id"] == f"i{i}", ans  # the write just acknowledged
            assert ans["results"][0]["score"] >= 0.99
    # a delete is visible at once on every replica too
    client.ok("/image/delete", {"library_name": library, "image_id": "i7"})
    for ans in _search_until_both_replicas_answer(index, key, _pixels(7), top_k=8):
        assert "i7" not in [r["image_id"] for r in ans["results"]]


def _search_until_both_replicas_answer(index, key, pixels, *, top_k, deadline_s=120.0):
    """Every answer to bursts of eight concurrent searches for ``pixels``, sent until both replicas have
    answered. Which replica serves a call is Serve's choice (multiplexing prefers the one that loaded
    the library first and spills over when it is busy), so one burst alone may miss a replica."""
    encoder = serve.get_deployment_handle("Encoder", app_name=APP)
    query = np.asarray(encoder.embed_image_batch.remote(pixels[None]).result())[0]
    handle = index.options(multiplexed_model_id=key)
    answers: list[dict] = []
    deadline = time.monotonic() + deadline_s
    while len({a["replica"] for a in answers}) < 2:
        assert time.monotonic() < deadline, f"only {len({a['replica'] for a in answers})} replica answered"
        burst = [
            handle.search.remote(
                query,
                query_kind="image",
                top_k=top_k,
                node=None,
                vector_kind="whole",
                min_score=None,
                return_frame=False,
            )
            for _ in range(8)
        ]
        answers += [a.result() for a in burst]
    return answers


def test_read_your_writes_over_http_under_concurrency(client, library):
    def add_then_search(i):
        client.ok(
            "/image/add",
            {
                "library_name": library,
                "image_id": f"c{i}",
                "image_uri": "u",
                "image_base64": image_b64(500 + i),
            },
        )
        res = client.ok(
            "/search/by-image",
            {"library_name": library, "image_base64": image_b64(500 + i), "top_k": 1, "return_frame": False},
        )
        return res["results"][0]["image_id"]

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(add_then_search, range(18))) == [f"c{i}" for i in range(18)]


def test_restart_on_same_storage_loses_nothing(client, base_url, storage_root):
    name = "survives_restart"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    for i in range(6):
        client.ok(
            "/image/add",
            {
                "library_name": name,
                "image_id": f"r{i}",
                "image_uri": "u",
                "image_base64": image_b64(900 + i),
                "tags": {"i": i},
            },
        )
    client.ok("/image/delete", {"library_name": name, "image_id": "r5"})
    before = client.ok(
        "/search/by-image", {"library_name": name, "image_base64": image_b64(902), "return_frame": False}
    )

    serve.delete(APP)
    deploy(storage_root, api_keys=[API_KEY])
    wait_ready(base_url)

    after = client.ok(
        "/search/by-image", {"library_name": name, "image_base64": image_b64(902), "return_frame": False}
    )
    assert after == before
    assert len(after["results"]) == 5
    assert client.get(f"/library/{name}")[1]["data"]["image_count"] == 5


def _pixels(seed: int) -> np.ndarray:
    import base64

    from index.model.imaging import ImageLimits, decode_image, prepare_for_model
    from index.model.spec import resolve_model_spec

    spec = resolve_model_spec("tiny-random")
    img = decode_image(base64.b64decode(image_b64(seed)), ImageLimits())
    return prepare_for_model(img, spec.preprocess)
