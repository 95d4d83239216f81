"""deployments.http: the ASGI guards and the request log, on a small FastAPI app (no Ray cluster).

The app is wired exactly like the ingress: the same middlewares in the same order, the same
``note_library`` dependency, the same error handlers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from deployments.http import (
    ApiKeyAuth,
    BodyLimit,
    ConcurrencyLimit,
    RequestLog,
    RequestRecord,
    RequestRecorder,
    UnhandledErrors,
    envelope,
    install_error_handlers,
    route_path,
)
from deployments.ingress import note_library
from index.errors import LibraryNotFound

KEY = "secret-key-1"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    library_name: str
    top_k: int = 10


class FakeRecorder:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def record(self, rec: RequestRecord) -> None:
        self.records.append(rec)


def make_app(**state: Any) -> FastAPI:
    app = FastAPI(dependencies=[Depends(note_library)])
    install_error_handlers(app)
    app.add_middleware(UnhandledErrors)
    app.add_middleware(BodyLimit)
    app.add_middleware(ConcurrencyLimit)
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(RequestLog)
    for key, value in state.items():
        setattr(app.state, key, value)
    gate: dict[str, asyncio.Event] = {}

    @app.post("/search")
    async def search(body: Body) -> Any:
        return envelope({"results": [], "top_k": body.top_k})

    @app.get("/library/{library_name}")
    async def library(library_name: str) -> Any:
        raise LibraryNotFound(library_name)

    @app.get("/health")
    async def health() -> Any:
        return envelope({"ready": True})

    @app.get("/boom")
    async def boom() -> Any:
        raise RuntimeError("secret detail")

    @app.get("/wait")
    async def wait() -> Any:
        await gate["event"].wait()
        return envelope({"waited": True})

    app.state.gate = gate
    return app


def client(**state: Any) -> tuple[TestClient, FakeRecorder]:
    recorder = FakeRecorder()
    app = make_app(request_recorder=recorder, **state)
    return TestClient(app, raise_server_exceptions=False), recorder


# -- the request log ------------------------------------------------------------------------------------


def test_every_request_is_recorded_with_route_template_status_and_library():
    c, rec = client()
    assert c.post("/search", json={"library_name": "shop_a", "top_k": 3}).status_code == 200
    assert c.get("/library/shop_b").status_code == 404
    assert c.post("/search", json={"library_name": "shop_c", "top_k": "3"}).status_code == 400
    bad_json = c.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert c.get("/no/such/route").status_code == 404
    assert c.get("/search").status_code == 405
    assert c.get("/boom").status_code == 500
    got = [(r.route, r.method, r.http_status, r.status, r.library_name) for r in rec.records]
    assert got == [
        ("/search", "POST", 200, "SUCCESS", "shop_a"),
        ("/library/{library_name}", "GET", 404, "LIBRARY_NOT_FOUND", "shop_b"),
        ("/search", "POST", 400, "INVALID_PARAMETER", "shop_c"),  # invalid requests are attributed too
        ("/search", "POST", 400, "INVALID_PARAMETER", None),
        ("unmatched", "GET", 404, "NOT_FOUND", None),  # raw paths never become metric labels
        ("/search", "GET", 405, "METHOD_NOT_ALLOWED", None),
        ("/boom", "GET", 500, "INTERNAL_ERROR", None),
    ]
    assert all(r.latency_ms >= 0 for r in rec.records)


def test_refusals_by_the_guards_are_recorded():
    c, rec = client(api_keys=frozenset({KEY}), max_body_bytes=100, max_concurrent_requests=10)
    assert c.post("/search", json={"library_name": "x"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert c.post("/search", json={"library_name": "x" * 200}, headers=auth).status_code == 413
    assert [(r.http_status, r.status) for r in rec.records] == [
        (401, "UNAUTHORIZED"),
        (413, "PAYLOAD_TOO_LARGE"),
    ]


def test_recorder_emits_metrics_and_one_json_log_line(caplog):
    counted: list[tuple[float, dict[str, str]]] = []
    observed: list[tuple[float, dict[str, str]]] = []

    class Counter:
        def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            counted.append((value, tags or {}))

    class Histogram:
        def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
            observed.append((value, tags or {}))

    recorder = RequestRecorder(Counter(), Histogram(), logging.getLogger("test.access"))
    with caplog.at_level(logging.INFO, logger="test.access"):
        recorder.record(RequestRecord("/search", "POST", 400, "INVALID_PARAMETER", 12.34567, "shop"))
        recorder.record(RequestRecord("/docs", "GET", 200, None, 1.0, None))
    assert counted == [
        (1, {"route": "/search", "method": "POST", "http_status": "400", "status": "INVALID_PARAMETER"}),
        (1, {"route": "/docs", "method": "GET", "http_status": "200", "status": "-"}),
    ]
    assert observed[0] == (12.34567, {"route": "/search", "method": "POST"})
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert lines[0] == {
        "route": "/search",
        "method": "POST",
        "http_status": 400,
        "status": "INVALID_PARAMETER",
        "latency_ms": 12.346,
        "library_name": "shop",
    }
    assert lines[1]["library_name"] is None and lines[1]["status"] is None


def test_a_failing_recorder_does_not_cost_the_answer():
    class Broken:
        def record(self, rec: RequestRecord) -> None:
            raise RuntimeError("metrics backend down")

    app = make_app(request_recorder=Broken())
    r = TestClient(app).post("/search", json={"library_name": "x"})
    assert r.status_code == 200 and r.json()["status"] == "SUCCESS"


def test_no_recorder_passes_requests_through():
    app = make_app()
    assert TestClient(app).post("/search", json={"library_name": "x"}).status_code == 200


# -- API keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, code",
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        ("Bearer wrong-key-00", 401),
        (f"Basic {KEY}", 401),
        (f"Bearer {KEY}x", 401),
        (f"Bearer {KEY}", 200),
        (f"bearer {KEY}", 200),  # the scheme is case-insensitive (RFC 9110)
        (f"Bearer  {KEY} ", 200),
    ],
)
def test_api_key_header(header, code):
    c, _ = client(api_keys=frozenset({KEY, "another-key-2"}))
    headers = {} if header is None else {"Authorization": header}
    r = c.post("/search", json={"library_name": "x"}, headers=headers)
    assert r.status_code == code
    if code == 401:
        assert r.json() == {
            "status": "UNAUTHORIZED",
            "message": "a valid API key is required: send 'Authorization: Bearer <key>'",
            "data": None,
        }
        assert r.headers["www-authenticate"] == "Bearer"


def test_health_and_schema_stay_open_with_keys():
    c, _ = client(api_keys=frozenset({KEY}))
    assert c.get("/health").status_code == 200
    assert c.get("/openapi.json").status_code == 200
    assert c.get("/library/x").status_code == 401
    assert c.get("/no/such/route").status_code == 401  # no route discovery without a key


def test_no_keys_means_no_auth():
    c, _ = client(api_keys=frozenset())
    assert c.post("/search", json={"library_name": "x"}).status_code == 200


# -- body limit ----------------------------------------------------------------------------------------


def test_body_limit_declared_and_streamed():
    c, _ = client(max_body_bytes=50)
    r = c.post("/search", json={"library_name": "x" * 100})
    assert r.status_code == 413 and r.json()["status"] == "PAYLOAD_TOO_LARGE"
    assert "50 bytes" in r.json()["message"]

    def chunks():
        yield b'{"library_name": "'
        yield b"x" * 100
        yield b'"}'

    r = c.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["status"] == "PAYLOAD_TOO_LARGE"
    assert c.post("/search", json={"library_name": "x"}).status_code == 200


# -- concurrency limit ------------------------------------------------------------------------------------


def test_concurrency_limit_sheds_with_the_envelope_and_recovers():
    recorder = FakeRecorder()
    app = make_app(request_recorder=recorder, max_concurrent_requests=3)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response, httpx.Response]:
        app.state.gate["event"] = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            held = [asyncio.create_task(ac.get("/wait")) for _ in range(3)]
            for _ in range(1000):  # let the three requests enter the app before the next ones arrive
                if _active(app) == 3:
                    break
                await asyncio.sleep(0.005)
            shed = [await ac.get("/wait") for _ in range(4)]
            health = await ac.get("/health")  # never refused
            app.state.gate["event"].set()
            done = [await t for t in held]
            after = await ac.post("/search", json={"library_name": "x"})
            return done, shed, health, after

    done, shed, health, after = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200, 200, 200]
    assert [r.status_code for r in shed] == [503] * 4
    assert all(r.json()["status"] == "OVERLOADED" and "3 concurrent" in r.json()["message"] for r in shed)
    assert shed[0].headers["retry-after"] == "1"
    assert health.status_code == 200
    assert after.status_code == 200


def _active(app: FastAPI) -> int:
    """Requests inside the app's ConcurrencyLimit (walks the built middleware stack)."""
    layer: Any = app.middleware_stack
    while layer is not None and not isinstance(layer, ConcurrencyLimit):
        layer = getattr(layer, "app", None)
    return layer.active if layer is not None else 0


@pytest.mark.parametrize(
    "path, root, expected",
    [
        ("/health", "", "/health"),
        ("/strict/health", "/strict", "/health"),
        ("/strict", "/strict", "/"),
        ("/strictly/health", "/strict", "/strictly/health"),  # not below the mount point
        ("/other/health", "/strict", "/other/health"),
    ],
)
def test_open_paths_are_matched_below_the_route_prefix(path, root, expected):
    assert route_path({"path": path, "root_path": root}) == expected


def test_a_body_that_is_not_text_is_named():
    c, _ = client()
    r = c.post("/search", content=b"!\x995\x17\xb4\x90y\x82", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["message"] == "request body is not valid JSON (it must be UTF-8 text)"


def test_routes_raise_and_the_handlers_answer_without_internal_details():
    """Routes raise instead of catching: service errors keep their status, Ray's wrappers are unwrapped,
    back-pressure is 503 OVERLOADED, and anything else is a 500 whose body names no internal detail;
    nothing escapes the app (the test client would re-raise it)."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    app = make_app()
    secret = "secret-internal-detail /srv/app/db.py line 12"
    raising = {
        "plain": RuntimeError(secret),
        "ray-wrapped-bug": RayTaskError("search", f"Traceback: {secret}", RuntimeError(secret)),
        "ray-wrapped-service": RayTaskError("search", f"Traceback: {secret}", LibraryNotFound("shop")),
        "backpressure": BackPressureError(num_queued_requests=9, max_queued_requests=8),
        "replica-died": ActorDiedError(),
    }
    for name, exc in raising.items():

        def route(error: BaseException) -> Any:
            async def raise_it() -> Any:
                raise error

            return raise_it

        app.add_api_route(f"/raise/{name}", route(exc))
    with TestClient(app, raise_server_exceptions=True) as c:
        answers = {name: c.get(f"/raise/{name}") for name in raising}
    got = {name: (r.status_code, r.json()["status"]) for name, r in answers.items()}
    assert got == {
        "plain": (500, "INTERNAL_ERROR"),
        "ray-wrapped-bug": (500, "INTERNAL_ERROR"),
        "ray-wrapped-service": (404, "LIBRARY_NOT_FOUND"),
        "backpressure": (503, "OVERLOADED"),
        "replica-died": (503, "UNAVAILABLE"),  # a write's replica lost mid-call: retry
    }
    for r in answers.values():
        assert "secret" not in r.text and "Traceback" not in r.text and "/srv" not in r.text
        assert set(r.json()) == {"status", "message", "data"}
