"""Which paths pass the API-key check (no Ray needed: plain functions of the ASGI scope)."""

from __future__ import annotations

import pytest

from deployments.http import is_open_path, route_path


@pytest.mark.parametrize(
    "path, root, relative",
    [
        ("/health", "", "/health"),
        ("/shop/health", "/shop", "/health"),  # Starlette >= 0.35: path includes root_path
        ("/health", "/shop", "/health"),  # older servers strip it themselves
        ("/shop", "/shop", "/"),
        ("/shopping/x", "/shop", "/shopping/x"),  # a prefix of a segment is not the mount point
        ("/static/app.js", "/static", "/app.js"),
    ],
)
def test_route_path(path, root, relative):
    assert route_path({"path": path, "root_path": root}) == relative


@pytest.mark.parametrize(
    "path, root, open_",
    [
        ("/", "", True),
        ("/static/app.js", "", True),
        ("/static/style.css", "", True),
        ("/shop/", "/shop", True),
        ("/shop/static/app.js", "/shop", True),
        ("/health", "", True),
        ("/docs", "", True),
        ("/shop/api/v1/operators/image-search/health", "/shop", True),
        ("/api/v1/operators/image-search/library/list", "", False),
        ("/shop/api/v1/operators/image-search/library/list", "/shop", False),
        ("/staticky", "", False),
        ("/static", "", False),
        ("/index.html", "", False),
    ],
)
def test_open_paths(path, root, open_):
    assert is_open_path({"path": path, "root_path": root}) is open_
