"""The pure-ASGI middlewares of the edge. Around the FastAPI app, outermost first: :class:`RequestLog`
(metrics and one log line per request), :class:`ApiKeyAuth` (401), :class:`ConcurrencyLimit` (503
``OVERLOADED``), :class:`BodyLimit` (413), :class:`UnhandledErrors` (500 without details); around
Serve's HTTP proxy:
:class:`ProxyErrorEnvelope` (the proxy's plain-text errors -> the envelope). Each reads its settings
from ``app.state`` (set by the ingress replica from its config) at request time.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.http.envelope import (
    OVERLOADED_MESSAGE,
    Message,
    Receive,
    Scope,
    Send,
    error_response,
    send_envelope,
)
from deployments.http.metrics import RequestRecord

logger = logging.getLogger("ray.serve")

#: Envelope status for errors that Serve's proxy answers itself, by HTTP status.
_PROXY_STATUS = {404: "NOT_FOUND", 408: "TIMEOUT", 429: "OVERLOADED", 503: "OVERLOADED"}
#: How Serve's BackPressureError message starts (the proxy sends it as the body of its 503/429).
_BACKPRESSURE_PREFIX = b"Request dropped due to backpressure"


def _setting(scope: Scope, name: str, default: Any = None) -> Any:
    """A setting the ingress replica put on ``app.state`` (``default`` outside an app)."""
    return getattr(scope["app"].state, name, default) if "app" in scope else default


class _Middleware:
    """A pure ASGI middleware that acts on the HTTP requests it :meth:`applies` to; anything else (other
    requests, lifespan and websocket scopes) passes straight through."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.applies(scope):
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def applies(self, scope: Scope) -> bool:
        return True

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class UnhandledErrors(_Middleware):
    """Innermost: an exception no handler took becomes the 500 envelope (the details are logged with an
    incident id, never sent) before it can leave the app."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # too late for an envelope: let the server close the connection
                raise
            await error_response(exc)(scope, receive, send)


class BodyLimit(_Middleware):
    """Pure ASGI middleware: answer 413 with the envelope when a body exceeds the limit.

    It checks ``Content-Length`` up front and counts streamed (chunked) bodies as they arrive, so an
    oversized upload is refused without being buffered. The limit is read from ``app.state.max_body_bytes``
    (set by the ingress from its config) at request time.
    """

    def applies(self, scope: Scope) -> bool:
        return _setting(scope, "max_body_bytes") is not None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int = _setting(scope, "max_body_bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_413(send, limit)
                return
        seen = 0
        too_big = False

        async def counted() -> Message:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_big = True
                    raise _BodyTooLarge
            return message

        replaced = False

        async def guarded_send(message: Message) -> None:
            # The framework may catch our exception while parsing and answer 400 itself: when the body
            # was too big, swap whatever it answers for the 413.
            nonlocal replaced
            if too_big:
                if not replaced:
                    replaced = True
                    await _send_413(send, limit)
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except _BodyTooLarge:
            if not replaced:
                await _send_413(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _send_413(send: Send, limit: int) -> None:
    await send_envelope(send, 413, "PAYLOAD_TOO_LARGE", f"request body exceeds {limit} bytes")


class ProxyErrorEnvelope(_Middleware):
    """Pure ASGI middleware for Serve's HTTP proxy: its own plain-text errors become the envelope.

    Serve's proxy answers some requests without reaching the ingress: 503 (or 429) when the Ingress's
    queue is full (``max_queued_requests``), 408 past ``request_timeout_s``, 404 outside every route,
    500 when the proxy fails. It answers those in ``text/plain``; every response of this service is JSON,
    so a non-JSON error response can only come from the proxy, and is rewritten into the envelope with
    the same HTTP status and headers (``Retry-After`` and ``x-request-id`` included). Everything else
    passes through untouched. Installed with :func:`proxy_middlewares` (docs/operations.md: "Overload: a fast
    503 instead of timeouts").
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: dict[str, Any] | None = None

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if message["status"] >= 400 and not _is_json(headers):
                    held = {"status": message["status"], "headers": headers, "body": b""}
                    return
            elif message["type"] == "http.response.body" and held is not None:
                held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    await _send_proxy_envelope(send, scope, held)
                return
            await send(message)

        await self.app(scope, receive, rewriting_send)


def proxy_middlewares() -> list[Any]:
    """Middlewares for Serve's HTTP proxy: set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` to
    ``deployments.http:proxy_middlewares`` in the environment of every Ray node (see docs/operations.md)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrorEnvelope)]


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


async def _send_proxy_envelope(send: Send, scope: Scope, held: dict[str, Any]) -> None:
    http = int(held["status"])
    status = _PROXY_STATUS.get(http, "INTERNAL_ERROR" if http >= 500 else "INVALID_PARAMETER")
    body: bytes = held["body"]
    if status == "OVERLOADED":
        message = (
            OVERLOADED_MESSAGE
            if body.startswith(_BACKPRESSURE_PREFIX)
            else "the service is temporarily unavailable; retry with backoff"
        )
    elif status == "TIMEOUT":
        message = "the request took longer than the server's request timeout"
    elif status == "NOT_FOUND":
        message = f"no route for path {scope.get('path', '')!r}"
    else:
        # The proxy's own text may carry internals (it is str(exception)): log it, never send it.
        logger.error("proxy answered %d: %s", http, body[:500].decode("utf-8", "replace"))
        message = "internal error in the HTTP proxy"
    kept = tuple((k, v) for k, v in held["headers"] if k.lower() not in (b"content-type", b"content-length"))
    await send_envelope(send, http, status, message, kept)


#: Paths answered without an API key: liveness for orchestrators, the public schema, and the web page
#: (``/``). The page holds no data: every API call it makes sends the key the user typed in.
OPEN_PATHS = frozenset(
    {"/", "/health", "/api/v1/operators/image-search/health", "/docs", "/openapi.json", "/redoc"}
)
#: Path prefixes answered without an API key: the web page's static files (HTML, JS, CSS only).
OPEN_PREFIXES = ("/static/",)


def route_path(scope: Scope) -> str:
    """The request path relative to the application's mount point.

    Under a Serve ``route_prefix`` such as ``/shop``, ``scope["path"]`` is the full path
    (``/shop/health``) and ``root_path`` is ``/shop``: compare the part after the prefix.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")) :] or "/"
    return path


def is_open_path(scope: Scope) -> bool:
    """Whether the request may pass without an API key (see ``OPEN_PATHS``, ``OPEN_PREFIXES``)."""
    path = route_path(scope)
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ApiKeyAuth(_Middleware):
    """Pure ASGI middleware: when API keys are configured, require ``Authorization: Bearer <key>``.

    Keys come from ``app.state.api_keys`` (a frozenset set by the ingress from its config); an empty set
    disables the check. Comparison is constant-time per key.
    """

    def applies(self, scope: Scope) -> bool:
        return bool(_setting(scope, "api_keys")) and not is_open_path(scope)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: frozenset[str] = _setting(scope, "api_keys")
        given = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip()
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            await send_envelope(
                send,
                401,
                "UNAUTHORIZED",
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        await self.app(scope, receive, send)


class ConcurrencyLimit(_Middleware):
    """Pure ASGI middleware: answer 503 ``OVERLOADED`` (with the envelope) beyond N requests at once.

    Serve's own queue limit (``max_queued_requests``) answers a plain-text 503 from the proxy, outside
    the contract; this limit sits inside the ingress, below Serve's ``max_ongoing_requests`` for the
    ingress, so that a flood is shed here, quickly and with the envelope. The limit is read from
    ``app.state.max_concurrent_requests``; ``/health`` and the schema are never refused (a liveness probe
    must not fail because the service is busy).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        super().__init__(app)
        self.active = 0  # one event loop per replica: no lock needed

    def applies(self, scope: Scope) -> bool:
        return _setting(scope, "max_concurrent_requests") is not None and route_path(scope) not in OPEN_PATHS

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int = _setting(scope, "max_concurrent_requests")
        if self.active >= limit:
            await send_envelope(
                send,
                503,
                "OVERLOADED",
                f"the service is handling its maximum of {limit} concurrent requests; retry with backoff",
                ((b"retry-after", b"1"),),
            )
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


_ENVELOPE_STATUS = re.compile(rb'^\{"status":\s*"([A-Z_]{1,64})"')
#: The largest value of ``library_name`` a log line carries (a valid name has at most 64 characters).
_MAX_LOGGED_NAME = 64


class RequestLog(_Middleware):
    """Pure ASGI middleware, outermost: hands a :class:`RequestRecord` of every request to the recorder
    in ``app.state.request_recorder`` (none: requests pass untouched).

    The route is the matched route's template (bounded metric cardinality; ``unmatched`` for 404s), the
    envelope status is read from the start of the response body (the envelope's first key), and the
    library is whatever the request handling put into ``scope["state"]["library_name"]``.
    """

    def applies(self, scope: Scope) -> bool:
        return _setting(scope, "request_recorder") is not None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        recorder = _setting(scope, "request_recorder")
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        http_status = 500  # what the client gets when the app raises (Starlette's error middleware)
        status: str | None = "INTERNAL_ERROR"
        seen_body = False

        async def watched(message: Message) -> None:
            nonlocal http_status, status, seen_body
            if message["type"] == "http.response.start":
                http_status = int(message["status"])
                status = None
            elif message["type"] == "http.response.body" and not seen_body:
                seen_body = True
                match = _ENVELOPE_STATUS.match(bytes(message.get("body", b""))[:128])
                status = match.group(1).decode() if match else None
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            name = state.get("library_name")
            rec = RequestRecord(
                route=route,
                method=str(scope.get("method", "")),
                http_status=http_status,
                status=status,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                library_name=name[:_MAX_LOGGED_NAME] if isinstance(name, str) else None,
            )
            try:
                recorder.record(rec)
            except Exception:  # observability must never cost a request its answer
                logger.exception("recording request metrics failed")
