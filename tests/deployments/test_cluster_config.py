"""serve_config.cluster.yaml and deploy/kuberay/rayservice.yaml: one configuration in two files, valid for
Serve and the builder, credentials from Secrets only, and a graph the builder really builds from it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.config import AppArgs
from tests.pg_server import PgServer

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONFIG = ROOT / "serve_config.cluster.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
#: Environment variables every Ray container needs from Secrets: (variable, secret, key).
SECRET_ENV = {
    "IMAGE_SEARCH_DB_PASSWORD": ("image-search-db", "password"),
    "AWS_ACCESS_KEY_ID": ("image-search-s3", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("image-search-s3", "secret-access-key"),
}


def cluster_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_CONFIG.read_text())


def app_of(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return app


def serve_config_v2_text() -> str:
    """The literal block of ``spec.serveConfigV2``, dedented, as written in the manifest."""
    lines = RAYSERVICE.read_text().splitlines()
    start = lines.index("  serveConfigV2: |") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].strip() and not lines[i].startswith("    "))
    return textwrap.dedent("\n".join(lines[start:end])).strip("\n")


def test_the_rayservice_carries_the_cluster_config_verbatim() -> None:
    text = CLUSTER_CONFIG.read_text()
    from_proxy_location = text[text.index("\nproxy_location:") + 1 :].strip("\n")
    assert serve_config_v2_text() == from_proxy_location, (
        "deploy/kuberay/rayservice.yaml's serveConfigV2 differs from serve_config.cluster.yaml: paste the "
        "file (from its proxy_location: line on) into the block again"
    )
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == cluster_config()


def test_the_cluster_config_is_valid_for_serve_and_the_builder() -> None:
    config = cluster_config()
    ServeDeploySchema.model_validate(config)
    args = AppArgs.model_validate(app_of(config)["args"])
    storage = args.storage_settings()
    assert storage.cluster and storage.database_password_env == "IMAGE_SEARCH_DB_PASSWORD"
    assert urlsplit(storage.database_url or "").password is None, "the password belongs in a Secret"
    deployments = {d["name"]: d for d in app_of(config)["deployments"]}
    assert deployments["LibraryIndex"]["max_replicas_per_node"] == 1
    assert deployments["Encoder"]["ray_actor_options"]["num_gpus"] >= 1
    assert deployments["Writer"]["num_replicas"] == 1 and deployments["Importer"]["num_replicas"] == 1


def test_every_container_takes_its_credentials_from_secrets() -> None:
    spec = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert len(containers) == 1 + len(spec["workerGroupSpecs"])
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        for name, (secret, key) in SECRET_ENV.items():
            assert "value" not in env[name], (
                f"{container['name']}: {name} must not be written in the manifest"
            )
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    # the variable the builder reads the password from is the one the Secret fills
    assert app_of(cluster_config())["args"]["database_password_env"] in SECRET_ENV


def test_the_builder_builds_the_cluster_graph(
    pg_server: PgServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config's args with only the database and the object store replaced by real ones (the
    password from the environment variable the config names, as on a cluster)."""
    app = app_of(cluster_config())
    args = dict(app["args"])
    monkeypatch.setenv(args["database_password_env"], pg_server.password)
    args |= {
        "database_url": pg_url.replace(f":{quote(pg_server.password, safe='')}@", "@"),
        "object_store_url": (tmp_path / "objects").as_uri(),
        "object_store_options": {},
    }
    assert pg_server.password not in args["database_url"]
    built = build_serve_app(build_app(args), name=app["name"])
    graph = {d.name: d for d in built.deployments}
    configured = {d["name"]: d for d in app["deployments"]}
    assert set(graph) == set(configured) and built.ingress_deployment_name == "Ingress"
    for name, options in configured.items():
        # every option the config sets is one the deployment accepts
        graph[name].options(**{k: v for k, v in options.items() if k != "name"})


def test_the_embedded_config_still_validates() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    args = AppArgs.model_validate(app_of(config)["args"])
    assert not args.storage_settings().cluster
