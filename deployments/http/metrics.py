"""Request metrics and the access log: one :class:`RequestRecord` per request, counted, timed and
logged by a :class:`RequestRecorder` (created inside each ingress replica)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Protocol

#: One JSON line per request (see :class:`RequestRecorder`); a child of Serve's logger, so it lands in
#: the replica's log file next to Serve's own lines.
access_logger = logging.getLogger("ray.serve.image_search.access")


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
    def inc(self, value: float = ..., tags: dict[str, str] = ...) -> object: ...


class _Histogram(Protocol):
    def observe(self, value: float, tags: dict[str, str] = ...) -> object: ...


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
            tag_keys=("route", "method", "http_status", "status"),  # type: ignore[arg-type]  # Ray: Tuple[str]
        )
        latency = metrics.Histogram(
            "image_search_request_latency_ms",
            description="HTTP request latency in the ingress, milliseconds.",
            boundaries=list(LATENCY_BOUNDARIES_MS),
            tag_keys=("route", "method"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
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
