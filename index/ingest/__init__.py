"""Ingestion: fetching client-given URIs under the SSRF policy, import sources, JSONL line parsing and the
import runner (the task stores it writes to are storage's: index/storage/tasks.py and its backends).

    data = fetch_bytes(uri, policy=FetchPolicy(...), max_bytes=..., timeout_s=...)
    runner = ImportRunner(tasks=TaskStore(root), catalog=..., encode=..., write=..., ...)
    await runner.start(); task = await runner.create(name, uid, source, save_image)

Names are loaded on first use, so that ``index.ingest.fetch`` stays free of the model's imports (torch)
for callers that only fetch.
"""

from __future__ import annotations

from typing import Any

from index import lazy_export

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
    "ByteBudget": "lines",
    "LineReader": "lines",
    "ParsedLine": "lines",
    "parse_line": "lines",
    "ImportRunner": "importer",
    "ImportSettings": "importer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
