"""Fetching an image from its ``image_uri`` when a client sends no ``image_base64``.

http(s) with a connect/read timeout, an overall deadline and a size cap; ``file://`` only inside the
configured allowed roots (resolved, so ``..`` and symlinks cannot escape). Any other scheme is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from index.imaging import ImageTooLarge

CHUNK = 64 * 1024


class FetchError(ValueError):
    """The URI could not be fetched; the message says why."""


def fetch_bytes(
    uri: str, *, max_bytes: int, timeout_s: float, allowed_file_roots: list[str] | tuple[str, ...] = ()
) -> bytes:
    """Return the bytes ``uri`` points to.

    Raises:
        FetchError: unsupported scheme, refused path, network error, non-2xx answer, deadline passed.
        ImageTooLarge: more than ``max_bytes``.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return _fetch_http(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    if parts.scheme == "file":
        return _read_file(unquote(parts.path), max_bytes=max_bytes, allowed_roots=allowed_file_roots)
    raise FetchError(
        f"cannot fetch image_uri with scheme {parts.scheme or '(none)'!r}: send image_base64, or use an "
        "http(s):// URI (or file:// under an allowed root)"
    )


def _fetch_http(uri: str, *, max_bytes: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    try:
        with requests.get(uri, stream=True, timeout=timeout_s, allow_redirects=True) as resp:
            if not 200 <= resp.status_code < 300:
                raise FetchError(f"fetching image_uri answered HTTP {resp.status_code}")
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLarge(f"image_uri holds {declared} bytes; the limit is {max_bytes}")
            buf = bytearray()
            for chunk in resp.iter_content(CHUNK):
                buf += chunk
                if len(buf) > max_bytes:
                    raise ImageTooLarge(f"image_uri holds more than {max_bytes} bytes")
                if time.monotonic() > deadline:  # a slow drip must not hold a worker forever
                    raise FetchError(f"fetching image_uri took longer than {timeout_s:g} s")
            return bytes(buf)
    except requests.RequestException as exc:
        raise FetchError(f"fetching image_uri failed: {type(exc).__name__}") from exc


def _read_file(path: str, *, max_bytes: int, allowed_roots: list[str] | tuple[str, ...]) -> bytes:
    if not allowed_roots:
        raise FetchError("file:// image URIs are disabled (no allowed_file_roots configured)")
    real = Path(path).resolve()
    if not any(real.is_relative_to(Path(root).resolve()) for root in allowed_roots):
        raise FetchError("image_uri points outside the allowed file roots")
    try:
        size = real.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"image_uri holds {size} bytes; the limit is {max_bytes}")
        return real.read_bytes()
    except OSError as exc:
        raise FetchError(f"cannot read image_uri: {exc.strerror}") from exc
