"""serve_config.yaml and serve_config.multilingual.yaml: valid for Serve, valid builder args, consistent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppArgs
from deployments.encoder import EncoderConfig
from index.model.spec import resolve_model_spec

ROOT = Path(__file__).resolve().parents[2]
FILES = ["serve_config.yaml", "serve_config.multilingual.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", FILES)
def test_config_is_valid_for_serve_and_the_builder(name: str) -> None:
    config = load(name)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    args = AppArgs.model_validate(app["args"])
    # resolving is offline: no weights, no tokenizer download
    spec = resolve_model_spec(args.model, pretrained=args.pretrained, device=args.device)
    assert spec.random_weights is False
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "Encoder", "LibraryIndex", "Writer", "Importer"}
    encoder = deployments["Encoder"]
    batch = EncoderConfig.model_validate(encoder["user_config"])
    # room for the passes the replica may run at once, or batches could never fill
    assert encoder["max_ongoing_requests"] >= batch.max_batch_size * batch.max_concurrent_batches
    for d in deployments.values():
        if "autoscaling_config" in d:
            assert d["max_ongoing_requests"] >= d["autoscaling_config"]["target_ongoing_requests"]
            assert "max_queued_requests" in d, f"{d['name']}: overload must be a fast 503, not a queue"


def test_multilingual_config_differs_only_in_the_model() -> None:
    main, multi = load("serve_config.yaml"), load("serve_config.multilingual.yaml")
    (main_app,), (multi_app,) = main["applications"], multi["applications"]
    assert (multi_app["args"]["model"], multi_app["args"]["pretrained"]) == (
        "xlm-roberta-base-ViT-B-32",
        "laion5b_s13b_b90k",
    )
    for app in (main_app, multi_app):
        del app["name"], app["args"]["model"], app["args"]["pretrained"]
    assert multi == main


@pytest.mark.parametrize("name", [*FILES, "serve_config.cluster.yaml"])
def test_a_draining_ingress_outlasts_the_requests_it_holds(name: str) -> None:
    """A replica being replaced finishes its requests; Serve kills it after graceful_shutdown_timeout_s
    (default 20 s), answering the client a plain-text 500. A request may wait for other deployments'
    replicas (limits.unavailable_wait_s, twice for a by-id search of a sharded library) up to the
    proxy's request timeout: the Ingress must be given at least that long."""
    from deployments.config import Limits
    from deployments.ingress import Ingress

    assert Ingress._deployment_config.graceful_shutdown_timeout_s >= 2 * Limits().unavailable_wait_s
    config = load(name)
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    assert ingress["graceful_shutdown_timeout_s"] >= config["http_options"]["request_timeout_s"]
