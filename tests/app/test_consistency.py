"""Read-your-writes across two LibraryIndex replicas, restart on the same storage, overload."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ray import serve

from tests.app.conftest import API_KEY, APP, Client, deploy, wait_ready
from tests.images import image_b64

pytestmark = pytest.mark.ray


def test_every_replica_sees_each_write_at_once(client, library, storage_root):
    """Directly through the LibraryIndex handle, with enough concurrency to use both replicas."""
    from index.catalog import Catalog

    index = serve.get_deployment_handle("LibraryIndex", app_name=APP)
    seen_replicas = set()
    key = Catalog(storage_root).get(library).key
    for i in range(8):
        client.ok(
            "/image/add",
            {"library_name": library, "image_id": f"i{i}", "image_uri": "u", "image_base64": image_b64(i)},
        )
        assert client.post("/image/get", {"library_name": library, "image_id": f"i{i}"})[0] == 200
        query = np.asarray(
            serve.get_deployment_handle("Encoder", app_name=APP).embed_image.remote(_pixels(i)).result()
        )
        handle = index.options(multiplexed_model_id=key)
        answers = [
            handle.search.remote(
                query,
                query_kind="image",
                top_k=1,
                node=None,
                vector_kind="whole",
                min_score=None,
                return_frame=False,
            )
            for _ in range(8)
        ]
        for ans in (a.result() for a in answers):
            seen_replicas.add(ans["replica"])
            assert ans["results"][0]["image_id"] == f"i{i}", ans  # the write just acknowledged
            assert ans["results"][0]["score"] >= 0.99
    assert len(seen_replicas) == 2, "both LibraryIndex replicas should have answered"
    # a delete is visible at once on every replica too
    client.ok("/image/delete", {"library_name": library, "image_id": "i7"})
    query = np.asarray(
        serve.get_deployment_handle("Encoder", app_name=APP).embed_image.remote(_pixels(7)).result()
    )
    handle = index.options(multiplexed_model_id=key)
    answers = [
        handle.search.remote(
            query,
            query_kind="image",
            top_k=8,
            node=None,
            vector_kind="whole",
            min_score=None,
            return_frame=False,
        )
        for _ in range(8)
    ]
    for ans in (a.result() for a in answers):
        assert "i7" not in [r["image_id"] for r in ans["results"]]


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


def test_overload_is_a_fast_503_with_the_envelope(serve_port, tmp_path):
    """A tiny queue in front of a slow-batching encoder: excess requests are shed, not queued."""
    name = "overload"
    deploy(
        str(tmp_path),
        name=name,
        route_prefix="/overload",
        deployment_options={
            "Ingress": {"ray_actor_options": {"num_cpus": 0}},
            "Encoder": {
                "ray_actor_options": {"num_cpus": 0},
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
            },
            "LibraryIndex": {"ray_actor_options": {"num_cpus": 0}},
            "Writer": {"ray_actor_options": {"num_cpus": 0}},
            "Importer": {"ray_actor_options": {"num_cpus": 0}},
        },
    )
    base = f"http://127.0.0.1:{serve_port}/overload"
    wait_ready(base)
    c = Client(base)
    c.ok("/library/create", {"library_name": "o", "mode": "general_search"})
    body = {"library_name": "o", "query_text": "x " * 400}
    try:
        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(lambda _: c.post("/search/by-text", body), range(96)))
        codes = [code for code, _ in answers]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, "nothing was shed"
        assert all(env["status"] == "OVERLOADED" and env["message"] for code, env in answers if code == 503)
        assert c.post("/search/by-text", body)[0] == 200  # normal service afterwards
    finally:
        serve.delete(name)


def _pixels(seed: int) -> np.ndarray:
    import base64

    from index.embedder import resolve_model_spec
    from index.imaging import ImageLimits, decode_image, prepare_for_model

    spec = resolve_model_spec("tiny-random")
    img = decode_image(base64.b64decode(image_b64(seed)), ImageLimits())
    return prepare_for_model(img, spec.preprocess)
