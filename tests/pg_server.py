"""A throwaway PostgreSQL server for tests: Debian's binaries, a temporary directory, loopback only.

``initdb`` refuses to run as root (CI runs as root), so as root both it and ``pg_ctl`` run as the
package's ``postgres`` user through ``runuser``, on a directory that user owns. The server uses password
authentication (SCRAM) so that a wrong password is refused as it would be in production, listens on
127.0.0.1 at a free port and puts its unix socket in its own directory. It never syncs to disk: its
data is thrown away with it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

USER = "app"


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has ``initdb``, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """Start with :meth:`start`, always :meth:`stop` (which also removes every file it made)."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        self.bindir = bindir
        #: Commits flushed to disk as in production (benchmarks); tests turn that off for speed.
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="image-search-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self._as: list[str] = []
        self._started = False

    def url(self, *, password: str | None = None, options: str | None = None) -> str:
        """A ``postgresql://`` URL for the ``app`` user and database (``options``: libpq options)."""
        pw = quote(self.password if password is None else password, safe="")
        query = f"?options={quote(options, safe='')}" if options else ""
        return f"postgresql://{USER}:{pw}@127.0.0.1:{self.port}/{USER}{query}"

    def start(self) -> None:
        if os.geteuid() == 0:  # initdb refuses root: run the server as the package's user
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "-A", "scram-sha-256", f"--pwfile={pwfile}",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._started = True  # from here on, stop() must run pg_ctl stop even if start fails
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, USER,
                  env={"PGPASSWORD": self.password})  # fmt: skip

    def stop(self) -> None:
        try:
            if self._started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text()
        except FileNotFoundError:
            return ""

    def _run(self, tool: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> None:
        cmd = [*self._as, str(self.bindir / tool), *args]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=self.dir
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr.strip()}\n{self.log()}")
