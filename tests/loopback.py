"""A loopback HTTP server for tests: synthetic images, JSONL sources, and a gate to hold answers.

``/img/<seed>.png`` answers ``tests.images`` pattern ``seed`` as PNG; ``/gated/<seed>.png`` the same, but
only once ``gate`` is set (so a test can watch an import that is still running); ``/files/<name>``
answers bytes put in ``files``; anything else is 404. ``hits`` counts requests per path, ``clients`` the
requests per client address (one entry per connection). With ``keep_alive`` it speaks HTTP/1.1 and keeps
connections open between requests.
"""

from __future__ import annotations

import collections
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.images import encode, pattern


class Loopback:
    def __init__(self, base: str) -> None:
        self.base = base
        self.gate = threading.Event()
        self.files: dict[str, bytes] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.clients: collections.Counter[tuple[str, int]] = collections.Counter()

    def img(self, seed: int, *, gated: bool = False) -> str:
        return f"{self.base}/{'gated' if gated else 'img'}/{seed}.png"


@contextmanager
def loopback_server(*, keep_alive: bool = False) -> Iterator[Loopback]:
    state: Loopback

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def do_GET(self) -> None:
            state.hits[self.path] += 1
            state.clients[self.client_address] += 1
            parts = self.path.strip("/").split("/")
            body = None
            if len(parts) == 2 and parts[0] in ("img", "gated") and parts[1].endswith(".png"):
                if parts[0] == "gated" and not state.gate.wait(timeout=120):
                    self.send_error(503)
                    return
                body = encode(pattern(int(parts[1][:-4])))
            elif len(parts) == 2 and parts[0] == "files":
                body = state.files.get(parts[1])
            if body is None:
                self.send_error(404)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client went away (a test restarted the app mid-request)
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state = Loopback(f"http://127.0.0.1:{server.server_address[1]}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        state.gate.set()
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """An http URL on a loopback port nobody listens on (connection refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing.png"
