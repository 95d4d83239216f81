"""The envelope every answer is, and the mapping of errors onto it.

``{"status", "message", "data"}`` for every response. :func:`install_error_handlers` registers one
handler per kind of error (FastAPI's validation errors -> 400 ``INVALID_PARAMETER``, Starlette's
404/405, the service's :class:`~index.errors.ServiceError`, Ray's task and back-pressure errors, and
anything else -> 500 without details; with the ``UnhandledErrors`` middleware), so routes raise
instead of catching.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.errors import Overloaded, ServiceError, Unavailable

logger = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OVERLOADED_MESSAGE = "the service is overloaded; retry with backoff"


def envelope(
    data: Any = None, *, status: str = "SUCCESS", message: str | None = None, http: int = 200
) -> JSONResponse:
    return JSONResponse({"status": status, "message": message, "data": data}, status_code=http)


#: A write whose replica died may or may not have committed; the client cannot tell, so it retries
#: (adds and tag updates are upserts, deletes are idempotent).
LOST_REPLICA_MESSAGE = (
    "a replica serving this request was lost (its node failed or it restarted); the request may or may "
    "not have taken effect: retry it"
)


def error_response(exc: BaseException) -> JSONResponse:
    """Map any exception to the envelope; unknown ones are logged and answered 500 without details."""
    exc = unwrap(exc)
    if isinstance(exc, ServiceError):
        return envelope(status=exc.status, message=exc.message, http=exc.http_status)
    if isinstance(exc, BackPressureError):
        err = Overloaded(OVERLOADED_MESSAGE)
        return envelope(status=err.status, message=err.message, http=err.http_status)
    if isinstance(exc, RayActorError):  # the replica died mid-call (its node was lost, it crashed)
        logger.warning("a replica died during a request: %r", exc)
        lost = Unavailable(LOST_REPLICA_MESSAGE)
        return envelope(status=lost.status, message=lost.message, http=lost.http_status)
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
    """Answer every error raised below the middlewares with the envelope."""

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

    async def _error(_: Request, exc: BaseException) -> JSONResponse:
        return error_response(exc)

    for kind in (ServiceError, RayTaskError, RayActorError, BackPressureError):
        app.add_exception_handler(kind, _error)
    # Anything else: 500 without details. Starlette runs an Exception handler in its outermost middleware
    # and then re-raises into the server, so the ingress also installs UnhandledErrors innermost, which
    # answers such errors before they leave the app; this one covers errors of the middlewares above it.
    app.add_exception_handler(Exception, _error)


async def send_envelope(
    send: Send, http: int, status: str, message: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer an error envelope straight from ASGI middleware (no framework below us has run)."""
    body = json.dumps({"status": status, "message": message, "data": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": http, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": body})
