"""One Ray instance and one Serve app (tiny random-weight model) shared by the whole app test session.

Every replica asks for 0 CPUs so the graph always fits on a 2-core machine (an unschedulable replica
would hang ``serve.run`` silently); readiness is polled with a deadline instead of sleeping.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from tests.images import encode, pattern  # noqa: E402

PREFIX = "/api/v1/operators/image-search"
APP = "imgsearch"
API_KEY = "test-key-123"
ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}


def import_dir(storage_root: str) -> Path:
    """Where app tests put JSONL sources: the deployed app's ``import_roots``."""
    return Path(storage_root) / "imports"


def app_args(storage_root: str, **overrides: Any) -> dict[str, Any]:
    """Builder args for tests: tiny model, small limits, two LibraryIndex replicas, small import chunks
    (so that a test sees progress between commits)."""
    import_dir(storage_root).mkdir(parents=True, exist_ok=True)
    args: dict[str, Any] = {
        "model": "tiny-random",
        "storage_root": storage_root,
        "limits": {"max_body_bytes": 2_000_000, "max_image_bytes": 1_500_000, "max_image_pixels": 4_000_000},
        # the image server of the fetch tests runs on loopback, which the default fetch policy refuses
        "fetch_allowed_networks": ["127.0.0.0/8"],
        "import_roots": [str(import_dir(storage_root))],
        "imports": {
            "chunk_lines": 4,
            "chunks_in_flight": 2,
            "encode_batch_size": 4,
            "fetch_retries": 0,
            "heartbeat_s": 2.0,
        },
        "deployment_options": {
            "Ingress": ZERO_CPU,
            "Encoder": ZERO_CPU,
            "LibraryIndex": {**ZERO_CPU, "num_replicas": 2, "max_ongoing_requests": 4},
            "Writer": ZERO_CPU,
            "Importer": ZERO_CPU,
        },
    }
    args.update(overrides)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Replicas import this checkout's code (not whatever an editable install points at).
    repo = str(Path(__file__).resolve().parents[2])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": repo,
                "RAY_USAGE_STATS_ENABLED": "0",
                # Serve's proxy answers its own errors (e.g. a full Ingress queue) with the envelope too.
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.http:proxy_middlewares",
            }
        },
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


class Client:
    """Thin HTTP client returning (http status, envelope) pairs."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.headers.update(headers or {})

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, Any]]:
        r = self.session.post(self.base + PREFIX + path, json=body, timeout=60, **kw)
        return r.status_code, r.json()

    def get(self, path: str, *, prefix: bool = True) -> tuple[int, dict[str, Any]]:
        r = self.session.get(self.base + (PREFIX if prefix else "") + path, timeout=60)
        return r.status_code, r.json()

    def raw(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.session.request(method, self.base + PREFIX + path, timeout=60, **kw)

    def ok(self, path: str, body: Any = None) -> dict[str, Any]:
        code, env = self.post(path, body)
        assert code == 200 and env["status"] == "SUCCESS", (code, env)
        assert env["message"] is None
        return env["data"]


def wait_ready(base: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if requests.get(base + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"app at {base} not ready after {deadline_s}s: {serve.status()}")


def wait_health_view(base: str, *running: str, deadline_s: float = 120.0) -> requests.Response:
    """The first ``/health`` answer (200 or 503) of an app that may never be ready, once its ingress is up
    and its view of the deployments shows each of ``running`` with a running replica."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            r = requests.get(base + "/health", timeout=10)
            states = (r.json().get("data") or {}).get("deployments", {})
            if all(states.get(name, {}).get("running") for name in running):
                return r
        except (requests.RequestException, ValueError):
            pass
        assert time.monotonic() < end, f"the ingress at {base} never answered /health with {running} running"
        time.sleep(0.5)


def deploy(storage_root: str, name: str = APP, route_prefix: str = "/", **overrides: Any) -> str:
    serve.run(build_app(app_args(storage_root, **overrides)), name=name, route_prefix=route_prefix)
    return name


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="session")
def base_url(serve_port: int, storage_root: str) -> str:
    deploy(storage_root, api_keys=[API_KEY])
    base = f"http://127.0.0.1:{serve_port}"
    wait_ready(base)
    return base


@pytest.fixture(scope="session")
def client(base_url: str) -> Client:
    return Client(base_url, {"Authorization": f"Bearer {API_KEY}"})


_counter = iter(range(10**6))


@pytest.fixture
def library(client: Client) -> str:
    """A fresh general_search library per test."""
    name = f"lib{next(_counter)}_{os.getpid()}"
    client.ok("/library/create", {"library_name": name, "mode": "general_search"})
    return name


@pytest.fixture
def image_server():
    """A loopback HTTP server serving one JPEG at /photo.jpg."""
    jpeg = encode(pattern(42), "JPEG", quality=95)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/photo.jpg":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(jpeg)))
                self.end_headers()
                self.wfile.write(jpeg)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", jpeg
    server.shutdown()
