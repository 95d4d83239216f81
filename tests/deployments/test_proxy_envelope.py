"""ProxyErrorEnvelope: the proxy's own plain-text errors become the envelope; everything else passes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.middleware import Middleware

from deployments.http import ProxyErrorEnvelope, proxy_middlewares

Message = dict[str, Any]
TEXT = (b"content-type", b"text/plain; charset=utf-8")
JSON = (b"content-type", b"application/json")


def inner_app(status: int, headers: list[tuple[bytes, bytes]], *chunks: bytes) -> Any:
    """An ASGI app answering like Serve's proxy does: one start message, the body in ``chunks``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    return app


def call(app: Any, scope_type: str = "http", path: str = "/api/x") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(ProxyErrorEnvelope(app)({"type": scope_type, "path": path}, receive, send))
    return sent


def answer(sent: list[Message]) -> tuple[int, dict[bytes, bytes], Any]:
    start, *bodies = sent
    body = b"".join(m.get("body", b"") for m in bodies)
    headers = dict(start["headers"])
    assert int(headers[b"content-length"]) == len(body)
    return start["status"], headers, json.loads(body)


@pytest.mark.parametrize("status", [503, 429])
def test_backpressure_from_the_proxy_becomes_overloaded(status: int) -> None:
    app = inner_app(
        status,
        [TEXT, (b"retry-after", b"5"), (b"x-request-id", b"abc")],
        b"Request dropped due to backpressure ",
        b"(num_queued_requests=1, max_queued_requests=1).",
    )
    code, headers, env = answer(call(app))
    assert code == status
    assert env == {
        "status": "OVERLOADED",
        "message": "the service is overloaded; retry with backoff",
        "data": None,
    }
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == b"5" and headers[b"x-request-id"] == b"abc"


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (503, b"Deployment 'Encoder' is unavailable", "OVERLOADED", "temporarily unavailable"),
        (408, b"Request 1234 timed out after 60.0s.", "TIMEOUT", "request timeout"),
        (404, b"Path '/nope' not found. Ping http://...", "NOT_FOUND", "no route for path '/api/x'"),
        (500, b"Traceback (most recent call last): secret internals", "INTERNAL_ERROR", "internal error"),
    ],
)
def test_other_proxy_errors_become_the_envelope_without_internals(
    status: int, body: bytes, code: str, message: str
) -> None:
    got_status, _, env = answer(call(inner_app(status, [TEXT], body)))
    assert got_status == status
    assert env["status"] == code and message in env["message"] and env["data"] is None
    assert "secret" not in env["message"] and "Traceback" not in env["message"]


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (503, [JSON], b'{"status": "OVERLOADED", "message": "from the ingress", "data": null}'),
        (400, [(b"content-type", b"application/json; charset=utf-8")], b'{"status": "INVALID_PARAMETER"}'),
        (200, [TEXT], b"success"),  # e.g. the proxy's own /-/healthz
    ],
)
def test_json_answers_and_successes_pass_through_untouched(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    sent = call(inner_app(status, headers, body))
    assert sent == [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def test_non_http_scopes_are_not_touched() -> None:
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    call(app, scope_type="websocket")
    assert seen == ["websocket"]


def test_proxy_middlewares_is_the_hook_serve_calls() -> None:
    (middleware,) = proxy_middlewares()
    assert isinstance(middleware, Middleware) and middleware.cls is ProxyErrorEnvelope
