"""The ingress app's route table and OpenAPI schema stay what they were when the routes moved into one
module per resource (``deployments/routes/``): same methods, paths, names, tags, response models, order,
and the same schema (paths, operation ids, request models).

``route_table.json`` was written from main's app before the move. After an intended change of the API,
write it again and review the diff::

    .venv/bin/python -c 'from tests.deployments.test_route_table import write_snapshot; write_snapshot()'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

SNAPSHOT = Path(__file__).with_name("route_table.json")


def route_table(app: FastAPI) -> list[dict[str, Any]]:
    """Every route of ``app`` in matching order (routers included), as plain JSON values."""
    rows = []
    for route in iter_route_contexts(app.routes):
        row: dict[str, Any] = {
            "kind": type(route.original_route).__name__,
            "path": route.path,
            "methods": sorted(route.methods or ()),
            "name": route.name,
        }
        if isinstance(route.original_route, APIRoute):
            row |= {
                "tags": list(route.tags),
                "response_model": repr(route.response_model),
                "status_code": route.status_code,
                "include_in_schema": route.include_in_schema,
            }
        rows.append(row)
    return rows


def current() -> dict[str, Any]:
    from deployments.ingress import api

    # The schema through JSON, as /openapi.json serves it (tuples become lists).
    return {"routes": route_table(api), "openapi": json.loads(json.dumps(api.openapi()))}


def write_snapshot() -> None:
    SNAPSHOT.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")


def test_route_table_is_unchanged() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    got = current()
    assert got["routes"] == expected["routes"]


def test_openapi_schema_is_unchanged() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    got = current()
    assert sorted(got["openapi"]["paths"]) == sorted(expected["openapi"]["paths"])
    for path, operations in expected["openapi"]["paths"].items():
        assert got["openapi"]["paths"][path] == operations, path
    assert got["openapi"] == expected["openapi"]
