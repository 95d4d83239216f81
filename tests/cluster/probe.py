"""A trivial Serve deployment for the cluster harness tests: it reports where it runs and touches files in
its node's private directory (``IMAGE_SEARCH_NODE_DIR``, inherited from its node's raylet)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from ray import serve
from starlette.requests import Request

from tests.cluster.harness import MARKER_ENV, NODE_DIR_ENV


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Probe:
    """Answers ``GET`` with where it runs; its methods write, read and hold files for the tests."""

    def __init__(self) -> None:
        self._held: list[IO[bytes]] = []

    def where(self) -> dict[str, Any]:
        """This replica's node name (from its node's marker), pid, and private directory."""
        return {
            "node": os.environ.get(MARKER_ENV, "").partition(":")[2],
            "pid": os.getpid(),
            "node_dir": os.environ.get(NODE_DIR_ENV),
        }

    def write(self, name: str, text: str) -> str:
        """Write ``text`` to ``name`` in this node's private directory; return the path."""
        path = Path(os.environ[NODE_DIR_ENV]) / name
        path.write_text(text)
        return str(path)

    def read(self, path: str) -> str | None:
        """The text at ``path`` as this replica sees it, or None when it sees no such file."""
        try:
            return Path(path).read_text()
        except FileNotFoundError:
            return None

    def hold(self, path: str) -> int:
        """Open ``path`` and keep it open (for the isolation checker's negative test); the pid."""
        self._held.append(open(path, "rb"))  # noqa: SIM115 - held on purpose until release()
        return os.getpid()

    def release(self) -> None:
        for f in self._held:
            f.close()
        self._held.clear()

    async def __call__(self, request: Request) -> dict[str, Any]:
        return self.where()
