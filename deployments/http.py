"""The HTTP edge shared by every route: the envelope, error mapping, and the ASGI guards.

Every response, success or failure, is ``{"status", "message", "data"}``. Framework errors (FastAPI's
422 for validation, Starlette's 404/405, an oversized body) are rewritten into that envelope with the
contract's codes: 400 ``INVALID_PARAMETER`` instead of a bare 422, and never a stack trace.

The pure-ASGI middlewares, outermost first: :class:`RequestLog` (metrics and one log line per request),
:class:`ApiKeyAuth` (401), :class:`ConcurrencyLimit` (503 ``OVERLOADED``), :class:`BodyLimit` (413).
Each reads its settings from ``app.state`` (set by the ingress replica from its config) at request time.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.errors import Overloaded, ServiceError

logger = logging.getLogger("ray.serve")
#: One JSON line per request (see :class:`RequestRecorder`); a child of Serve's logger, so it lands in
#: the replica's log file next to Serve's own lines.
access_logger = logging.getLogger("ray.serve.image_search.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Envelope status for errors that Serve's proxy answers itself, by HTTP status.
_PROXY_STATUS = {404: "NOT_FOUND", 408: "TIMEOUT", 429: "OVERLOADED", 503: "OVERLOADED"}
#: How Serve's BackPressureError message starts (the proxy sends it as the body of its 503/429).
_BACKPRESSURE_PREFIX = b"Request dropped due to backpressure"
_OVERLOADED_MESSAGE = "the service is overloaded; retry with backoff"


def envelope(
    data: Any = None, *, status: str = "SUCCESS", message: str | None = None, http: int = 200
) -> JSONResponse:
    return JSONResponse({"status": status, "message": message, "data": data}, status_code=http)


def error_response(exc: BaseException) -> JSONResponse:
    """Map any exception to the envelope; unknown ones are logged and answered 500 without details."""
    exc = unwrap(exc)
    if isinstance(exc, ServiceError):
        return envelope(status=exc.status, message=exc.message, http=exc.http_status)
    if isinstance(exc, BackPressureError):
        err = Overloaded(_OVERLOADED_MESSAGE)
        return envelope(status=err.status, message=err.message, http=err.http_status)
    incident = uuid.uuid4().hex[:12]
    logger.error("internal error %s: %r", incident, exc, exc_info=exc)
    return envelope(status="INTERNAL_ERROR", message=f"internal error (incident {incident})", http=500)


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's task-error wrapper."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def validation_message(exc: RequestValidationError) -> str:
    """One sentence naming each bad field, e.g. ``top_k: Input should be less than or equal to 1000``."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if kind == "extra_forbidden":
            parts.append(f"{_path(loc)}: unknown field")
            continue
        if not loc and kind == "missing":
            parts.append("request body is missing: send a JSON object")
            continue
        where = _path(loc) if loc else "request body"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _path(loc: list[str]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


#: FastAPI's detail when it cannot decode a body at all (its JSON errors are RequestValidationErrors).
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(status="INVALID_PARAMETER", message=validation_message(exc), http=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_PARAMETER")
        message = str(exc.detail)
        if message == FASTAPI_BODY_PARSE_ERROR:  # raised for a body that is not even text (bad UTF-8)
            message = "request body is not valid JSON (it must be UTF-8 text)"
        return envelope(status=status, message=message, http=exc.status_code)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)


class BodyLimit:
    """Pure ASGI middleware: answer 413 with the envelope when a body exceeds the limit.

    It checks ``Content-Length`` up front and counts streamed (chunked) bodies as they arrive, so an
    oversized upload is refused without being buffered. The limit is read from ``app.state.max_body_bytes``
    (set by the ingress from its config) at request time.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = getattr(scope["app"].state, "max_body_bytes", None) if "app" in scope else None
        if limit is None:
            await self.app(scope, receive, send)
            return
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


async def send_envelope(
    send: Send, http: int, status: str, message: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer an error envelope straight from ASGI middleware (no framework below us has run)."""
    body = json.dumps({"status": status, "message": message, "data": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": http, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": body})


class ProxyErrorEnvelope:
    """Pure ASGI middleware for Serve's HTTP proxy: its own plain-text errors become the envelope.

    Serve's proxy answers some requests without reaching the ingress: 503 (or 429) when the Ingress's
    queue is full (``max_queued_requests``), 408 past ``request_timeout_s``, 404 outside every route,
    500 when the proxy fails. It answers those in ``text/plain``; every response of this service is JSON,
    so a non-JSON error response can only come from the proxy, and is rewritten into the envelope with
    the same HTTP status and headers (``Retry-After`` and ``x-request-id`` included). Everything else
    passes through untouched. Installed with :func:`proxy_middlewares` (README: "Errors from Serve's
    proxy").
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
    ``deployments.http:proxy_middlewares`` in the environment of every Ray node (see README)."""
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
            _OVERLOADED_MESSAGE
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


class ApiKeyAuth:
    """Pure ASGI middleware: when API keys are configured, require ``Authorization: Bearer <key>``.

    Keys come from ``app.state.api_keys`` (a frozenset set by the ingress from its config); an empty set
    disables the check. Comparison is constant-time per key.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: frozenset[str] = (
            getattr(scope["app"].state, "api_keys", frozenset()) if "app" in scope else frozenset()
        )
        if scope["type"] != "http" or not keys or is_open_path(scope):
            await self.app(scope, receive, send)
            return
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


class ConcurrencyLimit:
    """Pure ASGI middleware: answer 503 ``OVERLOADED`` (with the envelope) beyond N requests at once.

    Serve's own queue limit (``max_queued_requests``) answers a plain-text 503 from the proxy, outside
    the contract; this limit sits inside the ingress, below Serve's ``max_ongoing_requests`` for the
    ingress, so that a flood is shed here, quickly and with the envelope. The limit is read from
    ``app.state.max_concurrent_requests``; ``/health`` and the schema are never refused (a liveness probe
    must not fail because the service is busy).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.active = 0  # one event loop per replica: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = getattr(scope["app"].state, "max_concurrent_requests", None) if "app" in scope else None
        if scope["type"] != "http" or limit is None or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
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


@dataclass(frozen=True)
class RequestRecord:
    """What is known about one finished request."""

    route: str  # the route template, e.g. /api/v1/operators/image-search/library/{library_name}
    method: str
    http_status: int
    status: str | None  # the envelope's status string; None for non-envelope answers (/docs)
    latency_ms: float
    library_name: str | None


class _Counter(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


class _Histogram(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


#: Latency histogram boundaries in milliseconds.
LATENCY_BOUNDARIES_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)


class RequestRecorder:
    """Counts requests by route and status, observes their latency, and logs one JSON line each.

    Metrics (Ray Serve metrics, exported through Ray's Prometheus endpoint with Serve's application,
    deployment and replica tags added):

    * ``image_search_requests`` (counter): tags ``route``, ``method``, ``http_status``, ``status``;
    * ``image_search_request_latency_ms`` (histogram): tags ``route``, ``method``.

    Log line (logger ``ray.serve.image_search.access``, level INFO): a JSON object with ``route``,
    ``method``, ``http_status``, ``status``, ``latency_ms`` and ``library_name`` (when the request named
    one).
    """

    def __init__(self, counter: _Counter, latency: _Histogram, log: logging.Logger = access_logger) -> None:
        self.counter = counter
        self.latency = latency
        self.log = log

    @classmethod
    def for_replica(cls) -> RequestRecorder:
        """The Ray Serve metrics; call inside a replica (metrics belong to the process that made them)."""
        from ray.serve import metrics

        counter = metrics.Counter(
            "image_search_requests",
            description="HTTP requests by route, method, HTTP status and envelope status.",
            tag_keys=("route", "method", "http_status", "status"),
        )
        latency = metrics.Histogram(
            "image_search_request_latency_ms",
            description="HTTP request latency in the ingress, milliseconds.",
            boundaries=list(LATENCY_BOUNDARIES_MS),
            tag_keys=("route", "method"),
        )
        return cls(counter, latency)

    def record(self, rec: RequestRecord) -> None:
        self.counter.inc(
            1,
            tags={
                "route": rec.route,
                "method": rec.method,
                "http_status": str(rec.http_status),
                "status": rec.status or "-",
            },
        )
        self.latency.observe(rec.latency_ms, tags={"route": rec.route, "method": rec.method})
        if self.log.isEnabledFor(logging.INFO):
            self.log.info(json.dumps(asdict(rec) | {"latency_ms": round(rec.latency_ms, 3)}))


_ENVELOPE_STATUS = re.compile(rb'^\{"status":\s*"([A-Z_]{1,64})"')
#: The largest value of ``library_name`` a log line carries (a valid name has at most 64 characters).
_MAX_LOGGED_NAME = 64


class RequestLog:
    """Pure ASGI middleware, outermost: hands a :class:`RequestRecord` of every request to the recorder
    in ``app.state.request_recorder`` (none: requests pass untouched).

    The route is the matched route's template (bounded metric cardinality; ``unmatched`` for 404s), the
    envelope status is read from the start of the response body (the envelope's first key), and the
    library is whatever the request handling put into ``scope["state"]["library_name"]``.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        recorder = getattr(scope["app"].state, "request_recorder", None) if "app" in scope else None
        if scope["type"] != "http" or recorder is None:
            await self.app(scope, receive, send)
            return
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
