"""Metrics for every route and status (Ray's Prometheus endpoint) and one JSON log line per request."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import ray
import requests

from tests.app.conftest import APP

pytestmark = pytest.mark.ray

ROUTE = "/api/v1/operators/image-search/library/{library_name}"


def test_requests_are_counted_timed_and_logged(client):
    probe = f"obs_probe_{os.getpid()}"
    assert client.get(f"/library/{probe}")[0] == 404
    assert client.post("/search/by-text", {"library_name": probe, "query_text": "x", "top_k": 0})[0] == 400

    # one JSON line per request in the ingress replica's log, with route, status, latency and library
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    lines = _wait_for(
        lambda: [
            json.loads(line[line.index("{") :])
            for path in logs.glob(f"replica_{APP}_Ingress_*.log")
            for line in path.read_text(errors="replace").splitlines()
            if probe in line and '"latency_ms"' in line
        ],
        want=2,
    )
    assert {(e["route"], e["method"], e["http_status"], e["status"]) for e in lines} == {
        (ROUTE, "GET", 404, "LIBRARY_NOT_FOUND"),
        ("/api/v1/operators/image-search/search/by-text", "POST", 400, "INVALID_PARAMETER"),
    }
    assert all(e["library_name"] == probe and e["latency_ms"] > 0 for e in lines)

    # metrics through Ray's Prometheus endpoint (exported every few seconds)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    pattern = re.compile(
        r'^ray_image_search_requests_total\{[^}]*http_status="404"[^}]*route="'
        + re.escape(ROUTE)
        + r'"[^}]*status="LIBRARY_NOT_FOUND"[^}]*\} (\d+(?:\.\d+)?)',
        re.MULTILINE,
    )
    text = _wait_for(
        lambda: [
            t
            for t in [requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text]
            if pattern.search(t)
        ],
        want=1,
    )[0]
    assert float(pattern.search(text).group(1)) >= 1
    assert re.search(r'^ray_image_search_request_latency_ms_bucket\{[^}]*route="', text, re.MULTILINE)


def _wait_for(fetch, want: int, deadline_s: float = 90.0):
    end = time.monotonic() + deadline_s
    while True:
        got = fetch()
        if len(got) >= want or time.monotonic() > end:
            assert len(got) >= want, got
            return got
        time.sleep(1.0)
