"""The README's first command, run as written (no resource overrides), gives a service in which every
deployment has a running replica and every route answers (``tests/app/demo_scenario.py``).

The command listens on port 8000 and starts its own Ray; it runs inside a private network namespace
(``unshare --net``, loopback only) so that neither can clash with anything else on the machine. Where
namespaces are not permitted it runs on the machine's loopback if port 8000 is free.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Ray start, the model, every route, an import task and the shutdown take ~40 s on 2 busy cores.
DEMO_TIMEOUT_S = 420


def _netns_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_demo_command_serves_every_route(tmp_path: Path) -> None:
    scenario = [sys.executable, "-m", "tests.app.demo_scenario", str(tmp_path)]
    if _netns_works():
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *scenario]
    elif _port_free(8000):
        cmd = scenario
    else:
        pytest.skip("no network namespace here (unshare --net refused) and port 8000 is taken")
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert run.returncode == 0 and "DEMO OK" in run.stdout, run.stdout[-8000:] + run.stderr[-4000:]
