"""Serving behaviour on a live Serve instance: user_config changes in place, the proxy's 503 envelope."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from tests.app.conftest import PREFIX, Client, deploy, wait_ready

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def production_app(
    name: str, storage_root: str, encoder_batch: dict[str, Any], **args: Any
) -> ServeDeploySchema:
    """serve_config.yaml's application, shrunk to fit this machine: tiny model, no GPU, 0 CPUs; ``args``
    override builder args."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app,) = copy.deepcopy(config["applications"])
    app["name"], app["route_prefix"] = name, f"/{name}"
    app["args"].update(model="tiny-random", storage_root=storage_root, **args)
    for key in ("pretrained", "model_cache_dir"):
        app["args"].pop(key)
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
        if "autoscaling_config" in d:
            d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        if d["name"] == "Encoder":
            d["user_config"] = encoder_batch
    return ServeDeploySchema.model_validate({"applications": [app]})


def encoder_info(app: str, want_batch: dict[str, Any], deadline_s: float = 90.0) -> dict[str, Any]:
    handle = serve.get_deployment_handle("Encoder", app_name=app)
    end = time.monotonic() + deadline_s
    info: dict[str, Any] = {}
    while time.monotonic() < end:
        info = handle.info.remote().result()
        if info["batch"] == want_batch:
            return info
        time.sleep(0.2)
    raise AssertionError(f"Encoder of {app} still reports {info.get('batch')}, expected {want_batch}")


def test_a_changed_user_config_applies_to_the_running_encoder(serve_port: int, tmp_path: Path) -> None:
    """Deployed the way production is (a config applied to the cluster, as `serve deploy` does): a new
    Encoder user_config reaches the running replica through reconfigure(), with no restart."""
    name = "reconf"
    first = {"max_batch_size": 4, "max_concurrent_batches": 1}
    second = {"max_batch_size": 16, "max_concurrent_batches": 2}
    # The Python counterpart of `serve deploy` (the CLI goes through the dashboard, not run in tests).
    client = serve.context._get_global_client()
    try:
        # a 50 ms ingress batch wait: the 8 overlapping clients below surely share calls to the Encoder
        wait = {"encode_batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.05}}
        client.deploy_apps(production_app(name, str(tmp_path), first, **wait), _blocking=True)
        base = f"http://127.0.0.1:{serve_port}/{name}"
        wait_ready(base)
        before = encoder_info(name, first)

        client.deploy_apps(production_app(name, str(tmp_path), second, **wait), _blocking=True)
        after = encoder_info(name, second)
        assert after["pid"] == before["pid"], "the replica was restarted instead of reconfigured"
        # and it still serves, through HTTP, with the new settings
        c = Client(base)
        c.ok("/library/create", {"library_name": "r", "mode": "general_search"})
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda i: c.post("/search/by-text", {"library_name": "r", "query_text": f"q{i}"}),
                    range(24),
                )
            )
        assert all(code == 200 for code, _ in answers), answers
        stats = encoder_info(name, second)["stats"]["text"]
        assert stats["items"] >= 24 and stats["largest_batch"] <= 16
        # the ingress sent them in batches (the 8 clients overlap: fewer calls than texts)
        assert stats["calls"] < stats["items"]
    finally:
        serve.delete(name)


def test_a_full_ingress_queue_is_answered_by_the_proxy_with_the_envelope(
    serve_port: int, tmp_path: Path
) -> None:
    """The Ingress itself is saturated: Serve's proxy sheds the excess (503), and the proxy middleware
    (installed by conftest the way docs/operations.md says) turns its plain-text answer into the envelope."""
    name = "ingress-overload"
    deploy(
        str(tmp_path),
        name=name,
        route_prefix=f"/{name}",
        deployment_options={
            "Ingress": {
                "ray_actor_options": {"num_cpus": 0},
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            },
            "Encoder": {"ray_actor_options": {"num_cpus": 0}},
            "LibraryIndex": {"ray_actor_options": {"num_cpus": 0}},
            "Writer": {"ray_actor_options": {"num_cpus": 0}},
            "Importer": {"ray_actor_options": {"num_cpus": 0}},
        },
        # a slow batch wait in the Ingress keeps each request there for a while
        encode_batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.2},
    )
    base = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        wait_ready(base)
        Client(base).ok("/library/create", {"library_name": "o", "mode": "general_search"})

        def search(_: int) -> requests.Response:
            return requests.post(
                base + PREFIX + "/search/by-text", json={"library_name": "o", "query_text": "x"}, timeout=60
            )

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(search, range(48)))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        shed = [r for r in answers if r.status_code == 503]
        assert shed, "nothing was shed"
        for r in shed:
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {
                "status": "OVERLOADED",
                "message": "the service is overloaded; retry with backoff",
                "data": None,
            }
    finally:
        serve.delete(name)
