"""Import sources as bounded byte streams: :func:`open_source` opens a local file, an http(s) URI (under
the fetch policy of ``index.ingest.fetch``) or an object-store URI, and meters what it reads.

Every read goes through :class:`SourceMeter`, which enforces :class:`SourceLimits`:

* ``max_bytes``: bytes read from the source after decompression (an endless stream, a line that never
  ends, a gzip bomb);
* ``max_gzip_ratio``: for a ``.gz`` source, inflated bytes per compressed byte, checked once
  ``RATIO_GRACE`` bytes were inflated (a few MB of gzip must not turn into GBs of work);
* ``deadline_s`` and ``min_bytes_per_s`` for remote sources: an overall deadline, and a minimum
  transfer rate measured over the time spent waiting in reads (not while the import is busy with what
  it read), every ``rate_window_s`` of such time. A server dripping a byte every 29 s, each within the
  read timeout, is cut off after one window.
* a stop event (the task was cancelled): the next read raises :class:`SourceStopped`.

Reads from http(s) use ``read1`` (what one ``recv`` gives), so every byte that arrives is metered as
it arrives; a blocking ``read(n)`` would wait for ``n`` bytes first.
"""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from index.ingest.fetch import (
    CHUNK,
    FetchError,
    FetchPolicy,
    _describe,
    _open_http,
    check_source,
    is_local_source,
    split_uri,
)

#: Inflated bytes of a ``.gz`` source before the compression ratio is checked (the first blocks of a
#: file can compress far better than the rest).
RATIO_GRACE = 16 * 1024 * 1024


class SourceLimitExceeded(FetchError):
    """The source broke one of its :class:`SourceLimits`; the message names the limit."""


class SourceStopped(Exception):
    """The task reading the source was cancelled."""


@dataclass(frozen=True)
class SourceLimits:
    """Bounds on reading one import source (from ``ImportSettings``; ``None``: no such bound).

    Attributes:
        max_bytes: bytes read after decompression.
        max_gzip_ratio: inflated / compressed bytes of a ``.gz`` source.
        deadline_s: seconds from opening a remote source to its end.
        min_bytes_per_s: the slowest transfer rate accepted from a remote source.
        rate_window_s: seconds of waiting in reads over which the rate is measured.
    """

    max_bytes: int | None = None
    max_gzip_ratio: float | None = None
    deadline_s: float | None = None
    min_bytes_per_s: float | None = None
    rate_window_s: float = 60.0


class SourceMeter:
    """Counts a source's bytes on the wire and inflated, and raises when a limit is passed.

    Args:
        limits: the bounds.
        remote: apply the deadline and the transfer rate (not to local files).
        stop: set when the task is cancelled.
        clock: ``time.monotonic`` (tests inject).
    """

    def __init__(
        self,
        limits: SourceLimits,
        *,
        remote: bool,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.remote = remote
        self.stop = stop
        self.clock = clock
        self.opened = clock()
        self.wire_bytes = 0
        self.inflated_bytes = 0
        self._window_bytes = 0
        self._window_wait = 0.0

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise SourceStopped("the task was cancelled")

    def on_wire(self, n: int, waited_s: float) -> None:
        """``n`` bytes arrived from the source after waiting ``waited_s`` in the read."""
        self.wire_bytes += n
        if not self.remote:
            return
        lim = self.limits
        if lim.deadline_s is not None and self.clock() - self.opened > lim.deadline_s:
            raise SourceLimitExceeded(
                f"reading the source took longer than {lim.deadline_s:g} s (imports.source_deadline_s)"
            )
        if lim.min_bytes_per_s is None or n == 0:  # 0: the end of the stream, however slow the last read
            return
        self._window_bytes += n
        self._window_wait += waited_s
        if self._window_wait >= lim.rate_window_s:
            rate = self._window_bytes / self._window_wait
            if rate < lim.min_bytes_per_s:
                raise SourceLimitExceeded(
                    f"the source sent {rate:.1f} bytes/s over {self._window_wait:.0f} s of waiting, less "
                    f"than {lim.min_bytes_per_s:g} bytes/s (imports.min_source_bytes_per_s)"
                )
            self._window_bytes, self._window_wait = 0, 0.0

    def on_inflated(self, n: int, *, gzipped: bool) -> None:
        """``n`` more bytes of the source's content (after decompression)."""
        self.inflated_bytes += n
        lim = self.limits
        if lim.max_bytes is not None and self.inflated_bytes > lim.max_bytes:
            raise SourceLimitExceeded(
                f"the source holds more than {lim.max_bytes} bytes (imports.max_source_bytes)"
            )
        if (
            gzipped
            and lim.max_gzip_ratio is not None
            and self.inflated_bytes > RATIO_GRACE
            and self.inflated_bytes > lim.max_gzip_ratio * max(self.wire_bytes, 1)
        ):
            raise SourceLimitExceeded(
                f"the gzip source inflates more than {lim.max_gzip_ratio:g} times "
                f"({self.wire_bytes} bytes gave {self.inflated_bytes}; imports.max_gzip_ratio)"
            )


class _Metered(io.RawIOBase):
    """A raw stream over ``read(n)`` (at most ``n`` bytes, ``b""`` at the end) that reports to a meter."""

    def __init__(
        self, read: Callable[[int], bytes], report: Callable[[int, float], None], close: Callable[[], None]
    ) -> None:
        self._read = read
        self._report = report
        self._close = close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        start = time.monotonic()
        data = self._read(min(len(buffer), CHUNK))
        self._report(len(data), time.monotonic() - start)
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._close()
            finally:
                super().close()


def _http_read(resp: urllib3.BaseHTTPResponse) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        try:
            return resp.read1(n, decode_content=False)
        except (Urllib3Error, OSError) as exc:
            raise FetchError(f"reading source failed: {_describe(exc)}") from exc

    return read


def _http_close(resp: urllib3.BaseHTTPResponse, pool: urllib3.HTTPConnectionPool) -> Callable[[], None]:
    def close() -> None:
        try:
            resp.close()
        finally:
            resp.release_conn()
            pool.close()

    return close


def open_source(
    source: str,
    *,
    policy: FetchPolicy,
    limits: SourceLimits | None = None,
    stop: threading.Event | None = None,
) -> IO[bytes]:
    """Open an import source for streaming, as a binary file object with ``readline``.

    The policy is :func:`check_source`'s (it runs again here: a task may resume long after it was
    created); http(s) sources go through the same address checks, pinned connections and checked
    redirects as image fetches. A name ending in ``.gz`` is decompressed on the fly. Reads are metered
    against ``limits`` (see the module docstring) and stop once ``stop`` is set. The caller closes the
    stream.

    Raises:
        FetchError: refused or unreadable source; the message says why. Reading later raises
            :class:`SourceLimitExceeded` past a limit, :class:`SourceStopped` once stopped, or
            ``FetchError`` when the connection fails.
    """
    canonical = check_source(source, policy=policy)
    remote = not is_local_source(canonical)
    meter = SourceMeter(limits or SourceLimits(), remote=remote, stop=stop)
    gzipped = split_uri(canonical).path.endswith(".gz")
    read: Callable[[int], bytes]
    close: Callable[[], None]
    try:
        if not remote:
            f = open(canonical, "rb")  # noqa: SIM115 - closed by the returned stream
            read, close = f.read, f.close
        elif split_uri(canonical).scheme.lower() in policy.schemes:
            timeout_s = policy.source_timeout_s
            resp, pool = _open_http(canonical, policy=policy, timeout_s=timeout_s, deadline=None)
            resp.auto_close = False  # type: ignore[attr-defined]  # the reader must see EOF as b""
            read, close = _http_read(resp), _http_close(resp, pool)
        else:
            import fsspec

            obj = fsspec.open(canonical, "rb").open()
            read, close = obj.read, obj.close
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

    def on_wire(n: int, waited_s: float) -> None:
        meter.check_stop()
        meter.on_wire(n, waited_s)
        if not gzipped:
            meter.on_inflated(n, gzipped=False)

    wire: IO[bytes] = io.BufferedReader(_Metered(read, on_wire, close), CHUNK)
    if not gzipped:
        return wire
    inflated = gzip.GzipFile(fileobj=wire, mode="rb")

    def on_inflated(n: int, _waited_s: float) -> None:
        meter.check_stop()
        meter.on_inflated(n, gzipped=True)

    def close_both() -> None:
        try:
            inflated.close()
        finally:
            wire.close()

    return io.BufferedReader(_Metered(inflated.read, on_inflated, close_both), CHUNK)
