"""Fixtures of the cluster suite: one real 4-node Ray cluster (head + nodes a, b, c) with Serve, shared by
the whole session, and an S3-compatible server (moto) on loopback.

The suite runs only inside the private network namespace that ``tests/test_cluster_suite.py`` creates
(it sets ``INSIDE_ENV``); a plain ``pytest`` run of ``tests/`` collects none of these tests, since outside
a namespace Ray would advertise the machine's interface address.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.cluster.harness import LocalCluster, new_cluster_dir
from tests.s3_server import S3

INSIDE_ENV = "IMAGE_SEARCH_CLUSTER_SUITE"
if os.environ.get(INSIDE_ENV) != "1":
    collect_ignore_glob = ["test_*.py"]

#: Worker nodes of the shared cluster and the custom resources that pin replicas: ``node_<x>`` one node,
#: and the roles of cluster mode's placement (tests/cluster/test_cluster_mode.py): Encoder replicas on the
#: head or a, one LibraryIndex replica on each of a and b, Writer and Importer on c.
WORKERS = {
    "a": {"node_a": 1.0, "index": 1.0, "encoder": 1.0},
    "b": {"node_b": 1.0, "index": 1.0},
    "c": {"node_c": 1.0, "writer": 1.0},
}
HEAD_RESOURCES = {"node_head": 1.0, "ingress": 1.0, "encoder": 1.0}
SERVE_PORT = 8000
SERVE_URL = f"http://127.0.0.1:{SERVE_PORT}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that kill the shared nodes a, b and c (``KILLS_SHARED_NODES = True``) run after all the
    others, which expect those nodes alive."""
    items.sort(key=lambda item: bool(getattr(item.module, "KILLS_SHARED_NODES", False)))


def wait_for(what: str, probe: Callable[[], Any], deadline_s: float = 180) -> Any:
    """Poll ``probe`` until it returns something truthy (exceptions count as "not yet"); return it."""
    end = time.monotonic() + deadline_s
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            got = probe()
            if got:
                return got
        except Exception as exc:  # any failure means "not yet" until the deadline
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {deadline_s:.0f}s (last error: {last!r})")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Head + nodes a, b, c, each in its own mount namespace; this process is the driver, with Serve's
    proxy on the head only (several proxies on one address would fight over the port)."""
    import ray
    from ray import serve

    c = LocalCluster(new_cluster_dir())
    try:
        c.start_head(HEAD_RESOURCES)
        for name, res in WORKERS.items():
            c.add_node(name, res)
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="session")
def node_kill(cluster: LocalCluster) -> Callable[[str], None]:
    """Kill one worker node, raylet and workers, with SIGKILL (a crash, not a drain)."""
    return cluster.kill_node


def get_json(path: str) -> Any:
    r = requests.get(SERVE_URL + path, timeout=10)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="session")
def s3(s3_server: S3) -> S3:
    """The session's S3 server (tests/conftest.py), reachable from every node (loopback is shared)."""
    return s3_server
