"""The image-search app's graph schedules across nodes: the Encoder on worker node a, every other
deployment pinned to the head, and an add + search goes through both.

Embedded mode (``storage_root``: SQLite + local files) is for one machine, so its storage lives in the
head's private directory and every deployment that touches it runs on the head; this only checks that
the graph's calls cross nodes, not cluster mode's storage (PostgreSQL + object store).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from ray import serve

from deployments.app import build_app
from tests.cluster.conftest import SERVE_URL, wait_for
from tests.cluster.harness import LocalCluster, foreign_files, replica_processes
from tests.images import image_b64

pytestmark = pytest.mark.cluster

APP = "imgsearch"
PREFIX = "/api/v1/operators/image-search"
ON_HEAD = {"ray_actor_options": {"num_cpus": 0, "resources": {"node_head": 0.01}}}
ON_A = {"ray_actor_options": {"num_cpus": 0, "resources": {"node_a": 0.01}}}
#: Which node each deployment is pinned to.
PLACEMENT = {"Ingress": "head", "Writer": "head", "Importer": "head", "LibraryIndex": "head", "Encoder": "a"}


@pytest.fixture(scope="module")
def app(cluster: LocalCluster) -> Iterator[str]:
    args: dict[str, Any] = {
        "model": "tiny-random",
        # the head's private directory: only the head's processes see it
        "storage_root": str(cluster.nodes["head"].data_dir / "store"),
        "deployment_options": {name: ON_HEAD if node == "head" else ON_A for name, node in PLACEMENT.items()},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    wait_for("the app's /health answering 200", lambda: requests.get(SERVE_URL + "/health", timeout=10).ok)
    yield APP
    serve.delete(APP)


def _ok(path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(SERVE_URL + PREFIX + path, json=body, timeout=60)
    env = r.json()
    assert r.status_code == 200 and env["status"] == "SUCCESS", (path, r.status_code, env)
    return env["data"]  # type: ignore[no-any-return]


def test_every_deployment_runs_on_the_node_it_is_pinned_to(cluster: LocalCluster, app: str) -> None:
    for deployment, node in PLACEMENT.items():
        procs = replica_processes(cluster, app, deployment)
        assert procs, f"no replica process of {deployment}"
        assert {cluster.node_of(p) for p in procs} == {node}, deployment
    procs = [p for d in PLACEMENT for p in replica_processes(cluster, app, d)]
    assert foreign_files(cluster, procs) == []


def test_add_and_search_across_nodes(app: str) -> None:
    lib = "cluster_" + uuid.uuid4().hex[:8]
    _ok("/library/create", {"library_name": lib, "mode": "general_search"})
    for i in range(3):
        _ok(
            "/image/add",
            {
                "library_name": lib,
                "image_id": f"img{i}",
                "image_uri": f"https://example.com/img{i}.png",
                "image_base64": image_b64(i),
                "tags": {"n": i},
            },
        )
    # the query is encoded on node a, searched on the head
    hits = _ok("/search/by-image", {"library_name": lib, "image_base64": image_b64(1), "top_k": 3})["results"]
    assert [h["image_id"] for h in hits][:1] == ["img1"] and len(hits) == 3
    assert len(_ok("/search/by-text", {"library_name": lib, "query_text": "a photo"})["results"]) == 3
    _ok("/library/delete", {"library_name": lib})
