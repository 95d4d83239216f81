"""Import sources under their limits: size after decompression, gzip ratio, deadline, transfer rate, stop."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from index.ingest.fetch import FetchPolicy
from index.ingest.lines import ByteBudget, LineReader, TooManyBlankLines
from index.ingest.sources import (
    RATIO_GRACE,
    SourceLimitExceeded,
    SourceLimits,
    SourceMeter,
    SourceStopped,
    open_source,
)

MiB = 1024 * 1024


def read_all(stream: IO[bytes]) -> int:
    n = 0
    while chunk := stream.read(64 * 1024):
        n += len(chunk)
    return n


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path


def policy(inbox: Path) -> FetchPolicy:
    return FetchPolicy(import_roots=(str(inbox),), allowed_networks=("127.0.0.0/8",))


def test_a_gzip_bomb_is_stopped_by_the_ratio_limit(inbox: Path) -> None:
    """The issue's bomb: a gzip of ``A``s inflates about 1000:1; at most 100:1 is read past 16 MiB."""
    path = inbox / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(64):
            f.write(b"A" * MiB)
    assert path.stat().st_size < 100_000
    limits = SourceLimits(max_gzip_ratio=100)
    with (
        open_source(str(path), policy=policy(inbox), limits=limits) as s,
        pytest.raises(SourceLimitExceeded, match="inflates more than 100 times"),
    ):
        read_all(s)
    with open_source(str(path), policy=policy(inbox), limits=SourceLimits(max_gzip_ratio=5000)) as s:
        assert read_all(s) == 64 * MiB  # a ratio it is allowed


def test_a_compressible_source_under_the_grace_is_read(inbox: Path) -> None:
    path = inbox / "small.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * (RATIO_GRACE // 2)))
    with open_source(str(path), policy=policy(inbox), limits=SourceLimits(max_gzip_ratio=2)) as s:
        assert read_all(s) == RATIO_GRACE // 2


@pytest.mark.parametrize("name", ["big.jsonl", "big.jsonl.gz"])
def test_the_size_limit_counts_bytes_after_decompression(inbox: Path, name: str) -> None:
    data = b'{"a": 1}\n' * 200_000
    (inbox / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    limits = SourceLimits(max_bytes=10**6)
    with (
        open_source(str(inbox / name), policy=policy(inbox), limits=limits) as s,
        pytest.raises(SourceLimitExceeded, match=r"more than 1000000 bytes \(imports.max_source_bytes\)"),
    ):
        read_all(s)


def test_the_rate_is_measured_over_time_spent_waiting_in_reads() -> None:
    now = [0.0]
    limits = SourceLimits(min_bytes_per_s=100, rate_window_s=60, deadline_s=1000)
    meter = SourceMeter(limits, remote=True, clock=lambda: now[0])
    for _ in range(10):  # fast reads, then a long pause of the consumer: not the source's fault
        meter.on_wire(1000, 0.01)
    now[0] = 500.0
    meter.on_wire(1000, 0.01)
    drips = 0
    with pytest.raises(SourceLimitExceeded, match="less than 100 bytes/s"):
        while drips < 10:  # a byte every 29 s: cut off by the end of the next full window
            drips += 1
            meter.on_wire(1, 29.0)
    assert drips <= 6  # at most two windows of 60 s (the first still held the fast bytes)
    now[0] = 1001.0
    with pytest.raises(SourceLimitExceeded, match="longer than 1000 s"):
        meter.on_wire(1000, 0.0)


def test_local_files_have_no_deadline_or_rate() -> None:
    meter = SourceMeter(SourceLimits(min_bytes_per_s=100, rate_window_s=1, deadline_s=0.001), remote=False)
    time.sleep(0.01)
    meter.on_wire(1, 5.0)
    meter.on_wire(1, 5.0)


@contextmanager
def drip_server(interval_s: float) -> Iterator[str]:
    """An http server that answers 200 and then sends one byte of a JSONL line every ``interval_s``."""
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            try:
                while not done.wait(interval_s):
                    self.wfile.write(b"{")
                    self.wfile.flush()
            except OSError:  # the client hung up: what the test expects
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/drip.jsonl"
    finally:
        done.set()
        server.shutdown()
        server.server_close()


def test_a_dripping_http_source_is_cut_off(inbox: Path) -> None:
    """The issue's stall, scaled down: a byte every 0.1 s (each within the read timeout) against a minimum
    of 100 bytes/s over 1 s of waiting; before, such a source was never cut off."""
    limits = SourceLimits(min_bytes_per_s=100, rate_window_s=1.0, deadline_s=600)
    with drip_server(0.1) as url:
        start = time.monotonic()
        with open_source(url, policy=policy(inbox), limits=limits) as s:
            reader = LineReader(s, max_line_bytes=1000)
            slow = r"less than 100 bytes/s \(imports.min_source_bytes_per_s\)"
            with pytest.raises(SourceLimitExceeded, match=slow):
                reader.read_chunk(10)
        assert time.monotonic() - start < 5


def test_the_deadline_cuts_off_a_remote_source_that_keeps_its_rate(inbox: Path) -> None:
    limits = SourceLimits(deadline_s=0.5)
    with (
        drip_server(0.05) as url,
        open_source(url, policy=policy(inbox), limits=limits) as s,
        pytest.raises(SourceLimitExceeded, match=r"longer than 0\.5 s"),
    ):
        read_all(s)


def test_a_stopped_source_raises_at_its_next_read(inbox: Path) -> None:
    (inbox / "a.jsonl").write_bytes(b"{}\n" * 100_000)
    stop = threading.Event()
    with open_source(str(inbox / "a.jsonl"), policy=policy(inbox), stop=stop) as s:
        s.read(10)
        stop.set()
        with pytest.raises(SourceStopped):
            read_all(s)


# -- the line reader's bounds ----------------------------------------------------------------------


def test_blank_lines_count_against_their_limit(inbox: Path) -> None:
    """The issue's stall: a 4 KB gzip of 4 MiB of newlines kept the reader busy for seconds and gave
    nothing; now the reader gives up after max_blank_lines."""
    path = inbox / "nl.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * (4 * MiB)))
    start = time.process_time()
    with (
        open_source(str(path), policy=policy(inbox)) as s,
        pytest.raises(TooManyBlankLines, match=r"more than 1000 blank lines \(imports.max_blank_lines\)"),
    ):
        LineReader(s, max_line_bytes=100, max_blank_lines=1000).read_chunk(10)
    assert time.process_time() - start < 0.5


def test_the_reader_takes_each_line_from_the_budget_and_starves_when_it_is_full() -> None:
    import io

    parent = ByteBudget(100)
    budget = ByteBudget(60, parent=parent)
    other = ByteBudget(100, parent=parent)
    data = b"".join(b"%09d\n" % i for i in range(20))  # lines of 9 bytes
    r = LineReader(io.BytesIO(data), max_line_bytes=9, budget=budget)
    first = r.read_chunk(100)
    # a line is read only with room for a whole max-length line (11 bytes with "\r\n"), then holds its 9
    assert len(first) == 6 and r.starved and budget.used == 54 and parent.used == 54
    assert not other.try_take(50)  # the runner's budget is shared
    budget.give(54)
    assert len(r.read_chunk(2)) == 2 and not r.starved
    budget.close()  # the task ended: its bytes go back to the runner at once, later calls change nothing
    assert parent.used == 0
    budget.give(18)
    assert parent.used == 0 and r.read_chunk(5) == [] and r.starved


def test_a_chunked_http_source_is_read_whole(inbox: Path) -> None:
    """http sources are read with read1 (so every byte is metered as it arrives): chunked bodies too."""

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                line = b'{"i": %d}\n' % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.jsonl"
        with open_source(url, policy=policy(inbox), limits=SourceLimits(min_bytes_per_s=1)) as s:
            lines = LineReader(s, max_line_bytes=100).read_chunk(10)
    finally:
        server.shutdown()
        server.server_close()
    assert [raw for _, raw in lines] == [b'{"i": %d}' % i for i in range(5)]
