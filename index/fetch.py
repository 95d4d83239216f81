"""Fetching what clients point at by URI: images (``image_uri`` without ``image_base64``) and the JSONL
sources of import tasks. Every fetch policy of the service lives in this module.

* ``http(s)://``: connect/read timeouts, an overall deadline and a size cap; through a pooled
  ``requests.Session`` with urllib3 retries (connection errors, 429 and 5xx, honouring Retry-After)
  when the caller passes one (the importer does; see :func:`make_session`).
* ``file://`` (and a bare absolute path for import sources): only inside configured roots, resolved
  first so that ``..`` and symlinks cannot escape.
* object stores (``s3://``, ``gs://``, ``az://`` ...): through ``fsspec``, only for the protocols the
  operator lists. The protocol's own package (``s3fs``, ``gcsfs``, ``adlfs``) must be installed; without it
  the fetch fails with fsspec's "install ..." message. Credentials come from the environment, the way
  each of those packages reads them.

Anything else is refused.
"""

from __future__ import annotations

import gzip
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from index.imaging import ImageTooLarge

CHUNK = 64 * 1024
#: Object-store protocols fsspec serves and that are allowed unless configured otherwise.
DEFAULT_OBJECT_STORE_PROTOCOLS = ("s3", "gs", "gcs", "az", "abfs", "abfss")


class FetchError(ValueError):
    """The URI could not be fetched; the message says why."""


def make_session(*, retries: int, pool_size: int) -> requests.Session:
    """A pooled HTTP session that retries connection errors and 429/500/502/503/504 answers.

    Backoff is exponential from 0.2 s and honours ``Retry-After``. One session is shared by the threads
    of a worker pool (connection reuse matters when thousands of images come from one host).
    """
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=0.2,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer's status is reported as such, not as a retry error
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch_bytes(
    uri: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_file_roots: Sequence[str] = (),
    object_store_protocols: Sequence[str] = (),
    session: requests.Session | None = None,
) -> bytes:
    """Return the bytes ``uri`` points to.

    Args:
        uri: ``http(s)://``, ``file://`` or an object-store URI.
        max_bytes: the most bytes accepted.
        timeout_s: connect/read timeout and overall deadline of an http(s) fetch.
        allowed_file_roots: directories ``file://`` URIs may point into (none: ``file://`` refused).
        object_store_protocols: fsspec protocols accepted (none: object-store URIs refused).
        session: the HTTP session to use (pooling, retries); ``None``: a one-off request, no retries.

    Raises:
        FetchError: unsupported scheme, refused path, network error, non-2xx answer, deadline passed.
        ImageTooLarge: more than ``max_bytes``.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return _fetch_http(uri, max_bytes=max_bytes, timeout_s=timeout_s, session=session)
    if parts.scheme == "file":
        return _read_file(unquote(parts.path), max_bytes=max_bytes, allowed_roots=allowed_file_roots)
    if parts.scheme and parts.scheme in object_store_protocols:
        return _read_object(uri, max_bytes=max_bytes)
    raise FetchError(
        f"cannot fetch image_uri with scheme {parts.scheme or '(none)'!r}: send image_base64, or use an "
        "http(s):// URI, file:// under an allowed root"
        + (
            f", or one of {', '.join(p + '://' for p in object_store_protocols)}"
            if object_store_protocols
            else ""
        )
    )


def _fetch_http(uri: str, *, max_bytes: int, timeout_s: float, session: requests.Session | None) -> bytes:
    deadline = time.monotonic() + timeout_s
    get = session.get if session is not None else requests.get
    try:
        with get(uri, stream=True, timeout=timeout_s, allow_redirects=True) as resp:
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
        raise FetchError(f"fetching image_uri failed: {_network_reason(exc)}") from exc


def _network_reason(exc: requests.RequestException) -> str:
    """A short reason without the URL-and-object dump requests puts in its messages."""
    if isinstance(exc, requests.exceptions.RetryError):
        return "too many error answers (retried)"
    if isinstance(exc, requests.ConnectTimeout | requests.ReadTimeout):
        return f"{type(exc).__name__} (timed out)"
    if isinstance(exc, requests.ConnectionError):
        return "ConnectionError (host unreachable or connection refused)"
    return type(exc).__name__


def _inside(path: str, roots: Sequence[str], what: str) -> Path:
    """``path`` resolved, if it lies inside one of ``roots``; FetchError otherwise."""
    real = Path(path).resolve()
    if not any(real.is_relative_to(Path(root).resolve()) for root in roots):
        raise FetchError(f"{what} points outside the allowed file roots")
    return real


def _read_file(path: str, *, max_bytes: int, allowed_roots: Sequence[str]) -> bytes:
    if not allowed_roots:
        raise FetchError("file:// image URIs are disabled (no allowed_file_roots configured)")
    real = _inside(path, allowed_roots, "image_uri")
    try:
        size = real.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"image_uri holds {size} bytes; the limit is {max_bytes}")
        return real.read_bytes()
    except OSError as exc:
        raise FetchError(f"cannot read image_uri: {exc.strerror}") from exc


def _read_object(uri: str, *, max_bytes: int) -> bytes:
    import fsspec  # imported on use: most deployments never read from an object store

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except ImportError as exc:  # fsspec's "Install s3fs to access S3"
        raise FetchError(f"cannot read image_uri: {exc}") from exc
    except FileNotFoundError as exc:
        raise FetchError("cannot read image_uri: no such object") from exc
    except Exception as exc:  # each fsspec backend raises its own types (botocore, aiohttp, ...)
        raise FetchError(f"cannot read image_uri: {type(exc).__name__}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image_uri holds more than {max_bytes} bytes")
    return data


# -- import sources ------------------------------------------------------------------------------


def check_source(source: str, *, import_roots: Sequence[str], object_store_protocols: Sequence[str]) -> str:
    """Check that an import ``source`` is one the service may read; return its canonical form.

    A local file is given as an absolute path or a ``file://`` URI and must lie inside ``import_roots``
    (it is returned as the resolved absolute path, and must exist); ``http(s)://`` URIs are returned as
    given; object-store URIs must use one of ``object_store_protocols``.

    Raises:
        FetchError: the message says what is wrong with ``source``.
    """
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        if not parts.netloc:
            raise FetchError(f"source {source[:200]!r} has no host")
        return source
    if parts.scheme in ("", "file"):
        path = unquote(parts.path) if parts.scheme == "file" else source
        if not path.startswith("/"):
            raise FetchError(
                "source must be an absolute path, a file:// URI, an http(s):// URI or an object-store URI"
            )
        if not import_roots:
            raise FetchError("local import sources are disabled (no import_roots configured)")
        real = _inside(path, import_roots, "source")
        if not real.is_file():
            raise FetchError(f"source {path!r} is not a readable file")
        return str(real)
    if parts.scheme in object_store_protocols:
        return source
    allowed = ["http://", "https://", "a path under import_roots"]
    allowed += [p + "://" for p in object_store_protocols]
    raise FetchError(f"source scheme {parts.scheme!r} is not accepted; use {', '.join(allowed)}")


def is_local_source(source: str) -> bool:
    """Whether a source returned by :func:`check_source` is a local file (cheap to read twice)."""
    return source.startswith("/")


def open_source(
    source: str,
    *,
    import_roots: Sequence[str],
    object_store_protocols: Sequence[str],
    timeout_s: float,
    session: requests.Session | None = None,
) -> IO[bytes]:
    """Open an import source for streaming, as a binary file object with ``readline``.

    The policy is :func:`check_source`'s (it runs again here: a task may resume long after it was
    created). A name ending in ``.gz`` is decompressed on the fly. The caller closes the stream.

    Raises:
        FetchError: refused or unreadable source; the message says why.
    """
    canonical = check_source(source, import_roots=import_roots, object_store_protocols=object_store_protocols)
    stream: IO[bytes]
    try:
        if is_local_source(canonical):
            stream = open(canonical, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        elif urlsplit(canonical).scheme in ("http", "https"):
            stream = _open_http(canonical, timeout_s=timeout_s, session=session)
        else:
            import fsspec

            # fsspec's buffered files have no readline(limit); io.BufferedReader adds it
            stream = io.BufferedReader(fsspec.open(canonical, "rb").open(), CHUNK)
    except FetchError:
        raise
    except ImportError as exc:
        raise FetchError(f"cannot read source: {exc}") from exc
    except FileNotFoundError as exc:
        raise FetchError("cannot read source: no such file or object") from exc
    except OSError as exc:
        raise FetchError(f"cannot read source: {exc.strerror or exc}") from exc
    except Exception as exc:  # fsspec backends raise their own types
        raise FetchError(f"cannot read source: {type(exc).__name__}: {exc}") from exc
    if urlsplit(canonical).path.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return stream


def _open_http(uri: str, *, timeout_s: float, session: requests.Session | None) -> IO[bytes]:
    get = session.get if session is not None else requests.get
    try:
        resp = get(uri, stream=True, timeout=timeout_s, allow_redirects=True)
    except requests.RequestException as exc:
        raise FetchError(f"fetching source failed: {_network_reason(exc)}") from exc
    if not 200 <= resp.status_code < 300:
        resp.close()
        raise FetchError(f"fetching source answered HTTP {resp.status_code}")
    resp.raw.decode_content = True  # undo a Content-Encoding: gzip the server applied
    resp.raw.auto_close = False  # io.BufferedReader must see EOF as b"", not as a closed file
    return io.BufferedReader(resp.raw, CHUNK)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FetchPolicy:
    """Where the service may read from, in one object (the importer carries it to its worker threads).

    Attributes:
        timeout_s: connect/read timeout and overall deadline of one http(s) image fetch.
        allowed_file_roots: directories ``file://`` image URIs may point into.
        import_roots: directories local import sources may lie in.
        object_store_protocols: fsspec protocols accepted for images and import sources.
        source_timeout_s: connect/read timeout of an http(s) import source (no overall deadline: a large
            file may stream for hours).
    """

    timeout_s: float = 10.0
    allowed_file_roots: tuple[str, ...] = ()
    import_roots: tuple[str, ...] = ()
    object_store_protocols: tuple[str, ...] = DEFAULT_OBJECT_STORE_PROTOCOLS
    source_timeout_s: float = 30.0

    def fetch_image(self, uri: str, *, max_bytes: int, session: requests.Session | None = None) -> bytes:
        """:func:`fetch_bytes` under this policy."""
        return fetch_bytes(
            uri,
            max_bytes=max_bytes,
            timeout_s=self.timeout_s,
            allowed_file_roots=self.allowed_file_roots,
            object_store_protocols=self.object_store_protocols,
            session=session,
        )

    def check_source(self, source: str) -> str:
        """:func:`check_source` under this policy."""
        return check_source(
            source, import_roots=self.import_roots, object_store_protocols=self.object_store_protocols
        )

    def open_source(self, source: str, *, session: requests.Session | None = None) -> IO[bytes]:
        """:func:`open_source` under this policy."""
        return open_source(
            source,
            import_roots=self.import_roots,
            object_store_protocols=self.object_store_protocols,
            timeout_s=self.source_timeout_s,
            session=session,
        )
