"""Timestamps as the API writes them."""

from __future__ import annotations

import time


def iso_time(ts: float) -> str:
    """A Unix time as ISO 8601 UTC to the second, e.g. ``"2026-01-31T12:00:00Z"``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
