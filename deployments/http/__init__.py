"""The HTTP edge: the envelope and error handlers (``envelope``), the ASGI middlewares (``middleware``)
and the request metrics (``metrics``)."""

from deployments.http.envelope import (
    envelope,
    error_response,
    install_error_handlers,
    send_envelope,
    unwrap,
    validation_message,
)
from deployments.http.metrics import RequestRecord, RequestRecorder
from deployments.http.middleware import (
    ApiKeyAuth,
    BodyLimit,
    ConcurrencyLimit,
    ProxyErrorEnvelope,
    RequestLog,
    UnhandledErrors,
    is_open_path,
    proxy_middlewares,
    route_path,
)

__all__ = [
    "ApiKeyAuth",
    "BodyLimit",
    "ConcurrencyLimit",
    "ProxyErrorEnvelope",
    "RequestLog",
    "RequestRecord",
    "RequestRecorder",
    "UnhandledErrors",
    "envelope",
    "error_response",
    "install_error_handlers",
    "is_open_path",
    "proxy_middlewares",
    "route_path",
    "send_envelope",
    "unwrap",
    "validation_message",
]
