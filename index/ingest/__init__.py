"""Ingestion: fetching client-given URIs under the SSRF policy, import sources, the durable task store,
JSONL line parsing and the import runner.

    data = fetch_bytes(uri, policy=FetchPolicy(...), max_bytes=..., timeout_s=...)
    runner = ImportRunner(tasks=TaskStore(root), catalog=..., encode=..., write=..., ...)
    await runner.start(); task = await runner.create(name, uid, source, save_image)

Names are loaded on first use, so that ``index.ingest.fetch`` and ``index.ingest.tasks`` stay free of
the model's imports (torch) for callers that only fetch or read tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConnectionPools": "fetch",
    "FetchError": "fetch",
    "FetchPolicy": "fetch",
    "FetchRefused": "fetch",
    "check_source": "fetch",
    "check_uri": "fetch",
    "fetch_bytes": "fetch",
    "open_source": "sources",
    "SourceLimits": "sources",
    "SourceLimitExceeded": "sources",
    "LineError": "tasks",
    "Task": "tasks",
    "TaskStore": "tasks",
    "ByteBudget": "lines",
    "LineReader": "lines",
    "ParsedLine": "lines",
    "parse_line": "lines",
    "ImportRunner": "importer",
    "ImportSettings": "importer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'index.ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(f"index.ingest.{module}"), name)
