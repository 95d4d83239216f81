"""A scripted HTTP server for the client's transport tests (no Ray, no service)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Reply:
    http: int
    body: Any  # a dict is sent as JSON, a str as text/html
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Script:
    """Replies served in order (the last one repeats) and the requests that were received."""

    replies: list[Reply] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def next_reply(self) -> Reply:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@pytest.fixture
def scripted() -> Iterator[Script]:
    script = Script()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            script.received.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "json": json.loads(raw) if raw else None,
                }
            )
            reply = script.next_reply()
            time.sleep(reply.delay_s)
            if isinstance(reply.body, str):
                data, ctype = reply.body.encode(), "text/html"
            else:
                data, ctype = json.dumps(reply.body).encode(), "application/json"
            self.send_response(reply.http)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield script
    server.shutdown()
    server.server_close()


#: A library object as the service answers it (``POST /library/create``, ``GET /library/{name}``).
LIBRARY = {
    "library_name": "lib",
    "mode": "general_search",
    "image_count": 0,
    "created_at": "2026-01-01T00:00:00Z",
    "model": {"name": "tiny-random", "pretrained": "random", "dim": 64},
}


def ok(data: Any) -> Reply:
    return Reply(200, {"status": "SUCCESS", "message": None, "data": data})


def err(http: int, status: str, message: str) -> Reply:
    return Reply(http, {"status": status, "message": message, "data": None})
