"""Failures and overload: a LibraryIndex replica killed during a stream of searches; far more concurrent
requests than the queues allow.

Both report what they saw (error counts, shed counts, latencies) on stdout (``pytest -s``); they assert
recovery and the contract's answers, and bound errors only loosely (no wall-clock assertions).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import ray
import requests
from ray import serve

from tests.app.conftest import APP, Client, deploy, wait_ready
from tests.images import image_b64

pytestmark = pytest.mark.ray


def replica_actors(app: str, deployment: str) -> set[str]:
    """Names of the live replica actors of a deployment (Serve names them SERVE_REPLICA::app#dep#id)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    }


def deployment_running(app: str, deployment: str, replicas: int) -> bool:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0) == replicas and status.status == "HEALTHY"


def test_killed_library_index_replica_is_replaced_while_searches_go_on(client, library, storage_root):
    from index.storage.embedded.catalog import Catalog

    for i in range(5):
        client.ok(
            "/image/add",
            {
                "library_name": library,
                "image_id": f"k{i}",
                "image_uri": "u",
                "image_base64": image_b64(700 + i),
            },
        )
    # the replica that serves this library: ask it directly (the answer names the replica)
    key = Catalog(storage_root).get(library).key
    encoder = serve.get_deployment_handle("Encoder", app_name=APP)
    vector = np.asarray(encoder.embed_text_batch.remote(["x"]).result())[0]
    answer = (
        serve.get_deployment_handle("LibraryIndex", app_name=APP)
        .options(multiplexed_model_id=key)
        .search.remote(
            vector,
            query_kind="text",
            top_k=1,
            node=None,
            vector_kind=None,
            min_score=None,
            return_frame=False,
        )
        .result()
    )
    before = replica_actors(APP, "LibraryIndex")
    victim = f"SERVE_REPLICA::{APP}#LibraryIndex#{answer['replica']}"
    assert victim in before and len(before) == 2

    outcomes: list[tuple[float, int | str]] = []  # (time, HTTP status or exception name)
    stop = threading.Event()
    body = {"library_name": library, "image_base64": image_b64(72), "top_k": 3, "return_frame": False}

    def searcher() -> None:
        c = Client(client.base, dict(client.session.headers))
        while not stop.is_set():
            try:
                code, env = c.post("/search/by-image", body)
                ok = code == 200 and env["data"]["results"][0]["image_id"] == "k2"
                outcomes.append((time.monotonic(), 200 if ok else code))
            except requests.RequestException as exc:
                outcomes.append((time.monotonic(), type(exc).__name__))

    threads = [threading.Thread(target=searcher, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: sum(o == 200 for _, o in outcomes) >= 20, 60, "searches before the kill")
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # recovery: Serve starts a replacement by itself and searches keep succeeding
        _wait(
            lambda: (
                len(replica_actors(APP, "LibraryIndex") - before) == 1
                and deployment_running(APP, "LibraryIndex", 2)
            ),
            180,
            "a replacement replica",
        )
        replaced_at = time.monotonic()
        _wait(lambda: sum(o == 200 for t, o in outcomes if t > replaced_at) >= 20, 60, "searches after")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    after_kill = [o for t, o in outcomes if t >= killed_at]
    errors = Counter(o for o in after_kill if o != 200)
    print(
        f"\nreplica failure: {len(outcomes)} searches, {len(after_kill)} after the kill, "
        f"errors {dict(errors)}, replacement running {replaced_at - killed_at:.1f} s after the kill"
    )
    assert victim not in replica_actors(APP, "LibraryIndex")
    assert all(o == 200 for t, o in outcomes if t > replaced_at + 5), "errors after the recovery"
    assert sum(errors.values()) <= max(10, len(after_kill) // 4), errors  # loose: most searches succeed


def _wait(condition: Any, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_overload_is_a_fast_503_with_the_envelope(serve_port, tmp_path):
    """Small queues everywhere: excess requests are shed with 503 OVERLOADED, nothing times out or dies.

    Two shedding points: the ingress's own concurrency limit (``limits.max_concurrent_requests``) and
    the encoder's Serve queue (``max_queued_requests``; the ingress maps Serve's BackPressureError).
    """
    name = "overload"
    deploy(
        str(tmp_path),
        name=name,
        route_prefix="/overload",
        limits={"max_concurrent_requests": 8},
        deployment_options={
            "Ingress": {"ray_actor_options": {"num_cpus": 0}},
            "Encoder": {
                "ray_actor_options": {"num_cpus": 0},
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "user_config": {"max_batch_size": 1},
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
    replicas = {d: replica_actors(name, d) for d in ("Ingress", "Encoder")}
    body = {"library_name": "o", "query_text": "x " * 400}

    def call(_: int) -> tuple[int | str, dict[str, Any] | None, float]:
        started = time.monotonic()
        try:
            code, env = c.post("/search/by-text", body)  # 60 s client timeout
            return code, env, time.monotonic() - started
        except requests.RequestException as exc:
            return type(exc).__name__, None, time.monotonic() - started

    try:
        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(call, range(240)))
        codes = Counter(code for code, _, _ in answers)
        shed = [(env, took) for code, env, took in answers if code == 503]
        sources = Counter(
            "ingress limit" if "concurrent requests" in env["message"] else "encoder queue" for env, _ in shed
        )
        served = [took for code, _, took in answers if code == 200]
        shed_ms = [took * 1000 for _, took in shed]
        print(
            f"\noverload: {dict(codes)}; shed by {dict(sources)}; 503 latency p50 "
            f"{statistics.median(shed_ms):.0f} ms, max {max(shed_ms):.0f} ms; "
            f"200 latency p50 {statistics.median(served) * 1000:.0f} ms"
        )
        assert set(codes) <= {200, 503}, codes  # no timeouts, no connection errors, no 500s
        assert codes[503] > 0, "nothing was shed"
        for env, _ in shed:
            assert env["status"] == "OVERLOADED" and env["data"] is None and "retry" in env["message"], env
        # no crash: the same replicas are alive, and service is normal afterwards
        assert {d: replica_actors(name, d) for d in replicas} == replicas
        assert requests.get(base + "/health", timeout=30).status_code == 200
        assert c.post("/search/by-text", body)[0] == 200
    finally:
        serve.delete(name)
