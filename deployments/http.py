"""The HTTP edge shared by every route: the envelope, error mapping, and the body-size guard.

Every response, success or failure, is ``{"status", "message", "data"}``. Framework errors (FastAPI's
422 for validation, Starlette's 404/405, an oversized body) are rewritten into that envelope with the
contract's codes: 400 ``INVALID_PARAMETER`` instead of a bare 422, and never a stack trace.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.errors import Overloaded, ServiceError

logger = logging.getLogger("ray.serve")

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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(status="INVALID_PARAMETER", message=validation_message(exc), http=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_PARAMETER")
        return envelope(status=status, message=str(exc.detail), http=exc.status_code)

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


#: Paths answered without an API key: liveness for orchestrators and the public schema.
OPEN_PATHS = frozenset(
    {"/health", "/api/v1/operators/image-search/health", "/docs", "/openapi.json", "/redoc"}
)


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
        if scope["type"] != "http" or not keys or scope.get("path", "") in OPEN_PATHS:
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
