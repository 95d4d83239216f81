"""A deployment without a running replica: /health is 503 and says which, its routes answer 503
``UNAVAILABLE`` after a bounded wait (``limits.unavailable_wait_s``; no wait for a replica that never
comes), the other routes keep working."""

from __future__ import annotations

import time
import uuid

import pytest
import requests
from ray import serve

from deployments.app import build_app
from tests.app.conftest import Client, app_args, import_dir, wait_health_view

NAME = "unready"  # with a suffix per test: see unready_app
#: Far below Serve's wait for a replica (the proxy's request timeout): it tells a refusal from a hang on
#: any machine, without timing how fast the refusal is.
HANG_S = 30.0
#: How long a call waits for a replica before the refusal (limits.unavailable_wait_s).
WAIT_S = 2.0


@pytest.fixture
def unready_app(serve_port, tmp_path):
    """The test app with an Importer that asks for a resource no node has: it is never scheduled."""
    options = app_args(str(tmp_path))["deployment_options"]
    options["Importer"] = {"ray_actor_options": {"num_cpus": 0, "resources": {"no_such_node": 1}}}
    # serve.run would wait forever for the Importer; _run without blocking returns once it is submitted.
    args = app_args(str(tmp_path), deployment_options=options)
    args["limits"]["unavailable_wait_s"] = WAIT_S
    # An app name of its own per test: the previous test's app is deleted without waiting (its Importer
    # never started), and under the same name and route its Ingress could still answer this test's
    # requests with that test's storage root and import_roots (seen once on a fresh clone: a source
    # refused as outside the import roots instead of the 503).
    name = f"{NAME}-{uuid.uuid4().hex[:8]}"
    serve._run(
        build_app(args),
        name=name,
        route_prefix="/" + name,
        _blocking=False,
    )
    base = f"http://127.0.0.1:{serve_port}/{name}"
    wait_health_view(base, "Encoder")  # the ingress answers /health (503) with the controller's view
    yield base, tmp_path
    serve.delete(name, _blocking=False)


def test_health_is_503_and_names_the_missing_deployment(unready_app):
    base, _ = unready_app
    r = requests.get(base + "/health", timeout=10)
    env = r.json()
    assert r.status_code == 503 and env["status"] == "UNAVAILABLE", env
    data = env["data"]
    assert data["ready"] is False
    assert data["deployments"]["Importer"] == {
        "status": data["deployments"]["Importer"]["status"],
        "running": 0,
        "target": 1,
    }
    for name in ("Ingress", "Encoder", "LibraryIndex", "Writer"):
        assert data["deployments"][name]["running"] >= 1, data
    assert "'Importer' has no running replica (0 of 1 running" in env["message"]
    assert data["model"] == "tiny-random"  # what is up is still reported


def test_a_route_needing_it_answers_503_after_a_bounded_wait_and_the_rest_work(unready_app):
    base, storage = unready_app
    c = Client(base)
    c.ok("/library/create", {"library_name": "u", "mode": "general_search"})
    source = import_dir(str(storage)) / "one.jsonl"
    source.write_text('{"image_id": "a", "image_uri": "u"}\n')
    started = time.monotonic()
    code, env = c.post("/image/tasks/create", {"library_name": "u", "source": str(source)})
    took = time.monotonic() - started
    assert code == 503 and env["status"] == "UNAVAILABLE" and env["data"] is None, env
    assert "'Importer' has no running replica" in env["message"]
    assert WAIT_S <= took < HANG_S, took  # it waited for a replica, then refused (the guard's message)
    r = c.raw("GET", "/image/tasks/results/" + "0" * 32)
    assert r.status_code == 503 and r.json()["status"] == "UNAVAILABLE"
    assert c.post("/search/by-text", {"library_name": "u", "query_text": "x"})[0] == 200
