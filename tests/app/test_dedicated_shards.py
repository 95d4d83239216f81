"""Big shards on LibraryIndex deployments of their own (``dedicated_shards``): the ingress sends that
shard, and only that shard, to its deployment; the answers are those of an unsharded library; a replica
of that deployment that starts after the library exists has loaded the shard when Serve first routes to
it (its constructor loads it; Serve routes to no replica whose constructor is still running)."""

from __future__ import annotations

import time

import pytest
from ray import serve

from deployments.app import build_app
from tests.app.conftest import ZERO_CPU, Client, app_args, deploy, wait_health_view, wait_ready
from tests.images import image_b64

pytestmark = pytest.mark.ray

APP_NAME = "dedicated"
DEPLOYMENT = "LibraryIndex-big-1"
EVEN = {"field": "even", "op": "=", "value": True}


def _searches(client: Client, name: str) -> list[list[dict]]:
    common = {"library_name": name, "top_k": 5}
    return [
        client.ok("/search/by-image", {**common, "image_base64": image_b64(3)})["results"],
        client.ok("/search/by-text", {**common, "query_text": "stripes", "tag_filter": EVEN})["results"],
        client.ok("/search/by-id", {**common, "image_id": "img5"})["results"],
        client.ok("/search/by-id", {**common, "image_id": "img6", "tag_filter": EVEN})["results"],
    ]


def _deploy(root: str) -> None:
    deploy(
        root,
        name=APP_NAME,
        route_prefix="/" + APP_NAME,
        dedicated_shards=[
            {
                "library": "big",
                "shards": [1],
                # what an operator sets for a big shard: its own node and the memory it needs
                "deployment": {
                    "max_replicas_per_node": 1,
                    "ray_actor_options": {"num_cpus": 0, "memory": 64 * 1024 * 1024},
                },
            }
        ],
        deployment_options={
            d: ZERO_CPU for d in ("Ingress", "Encoder", "LibraryIndex", "Writer", "Importer")
        },
    )


def _loads(deployment: str) -> list[str]:
    return serve.get_deployment_handle(deployment, app_name=APP_NAME).loads.remote().result(timeout_s=30)


def test_a_dedicated_shard_is_served_by_its_own_deployment_loaded_before_use(serve_port, tmp_path):
    root = str(tmp_path / "storage")
    base = f"http://127.0.0.1:{serve_port}/{APP_NAME}"
    _deploy(root)
    try:
        wait_ready(base)
        c = Client(base)
        health = c.get("/health", prefix=False)[1]["data"]
        assert health["deployments"][DEPLOYMENT]["running"] == 1
        assert _loads(DEPLOYMENT) == []  # the library does not exist yet: nothing to load

        for name, shards in (("big", 2), ("ref", 1)):
            c.ok("/library/create", {"library_name": name, "mode": "general_search", "shards": shards})
            for i in range(12):
                body = {"library_name": name, "image_id": f"img{i}", "image_uri": f"u{i}"}
                c.ok("/image/add", body | {"image_base64": image_b64(i), "tags": {"even": i % 2 == 0}})
        expected = _searches(c, "ref")
        assert all(len(r) == 5 for r in expected)
        assert _searches(c, "big") == expected

        # Shard 1 was loaded by its deployment only; shard 0 by the shared LibraryIndex.
        (key,) = _loads(DEPLOYMENT)
        assert key.startswith("big:") and key.endswith(":1")
        shared = _loads("LibraryIndex")
        assert key not in shared and key[: -len("1")] + "0" in shared

        # A fresh replica (here: the whole app deployed again) loads the shard in its constructor: it
        # holds it before any request reaches it, and answers from it without loading it again.
        serve.delete(APP_NAME)
        _deploy(root)
        wait_ready(base)
        assert _loads(DEPLOYMENT) == [key]
        assert _searches(c, "big") == expected
        assert _loads(DEPLOYMENT) == [key]

        # Deleted and created again: a new uid, loaded on its first request, by the same deployment.
        c.ok("/library/delete", {"library_name": "big"})
        c.ok("/library/create", {"library_name": "big", "mode": "general_search", "shards": 2})
        for i in range(12):
            body = {"library_name": "big", "image_id": f"img{i}", "image_uri": f"u{i}"}
            c.ok("/image/add", body | {"image_base64": image_b64(i), "tags": {"even": i % 2 == 0}})
        assert _searches(c, "big") == expected
        first, second = _loads(DEPLOYMENT)
        assert first == key and second != key and second.endswith(":1")
    finally:
        serve.delete(APP_NAME)


def test_a_dedicated_shard_without_a_replica_is_503_for_its_library_only(serve_port, tmp_path):
    """Its deployment asks for more memory than any node has: never scheduled. Searches of its library
    wait ``unavailable_wait_s``, then 503 naming the deployment; /health says why; other libraries work."""
    name, wait_s = "nomem", 2.0
    args = app_args(
        str(tmp_path),
        deployment_options={
            d: ZERO_CPU for d in ("Ingress", "Encoder", "LibraryIndex", "Writer", "Importer")
        },
        dedicated_shards=[
            {
                "library": "huge",
                "shards": [0],
                "deployment": {"ray_actor_options": {"num_cpus": 0, "memory": 2**40}},  # 1 TiB
            }
        ],
    )
    args["limits"]["unavailable_wait_s"] = wait_s
    # serve.run would wait forever for the unschedulable replica; _run without blocking returns at once.
    serve._run(build_app(args), name=name, route_prefix="/" + name, _blocking=False)
    base = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        # every deployment but the unschedulable one (library/create needs the Encoder and the Writer)
        r = wait_health_view(base, "Ingress", "Encoder", "LibraryIndex", "Writer", "Importer")
        env = r.json()
        assert r.status_code == 503 and env["data"]["deployments"]["LibraryIndex-huge-0"]["running"] == 0
        assert "'LibraryIndex-huge-0' has no running replica" in env["message"]

        c = Client(base)
        for lib in ("huge", "small"):
            c.ok("/library/create", {"library_name": lib, "mode": "general_search"})
            c.ok(
                "/image/add",
                {"library_name": lib, "image_id": "a", "image_uri": "u", "image_base64": image_b64(1)},
            )
        started = time.monotonic()
        code, env = c.post("/search/by-image", {"library_name": "huge", "image_base64": image_b64(1)})
        assert (code, env["status"], env["data"]) == (503, "UNAVAILABLE", None), env
        assert "'LibraryIndex-huge-0' has no running replica" in env["message"]
        assert time.monotonic() - started >= wait_s
        code, env = c.post("/search/by-image", {"library_name": "small", "image_base64": image_b64(1)})
        assert code == 200 and [x["image_id"] for x in env["data"]["results"]] == ["a"]
    finally:
        serve.delete(name, _blocking=False)
