"""Runs the cluster suite (``tests/cluster``) in a private network namespace, where it must pass.

A multi-node Ray cluster on one machine must stay on loopback: outside a namespace Ray advertises the
machine's interface address. So the suite runs as its own pytest session inside ``unshare --net`` (with
``ip link set lo up``); that session's fixtures start the nodes, Serve and the S3 server in the same
namespace, and this test asserts that the session passed. Where namespaces are not permitted (no root, no
``unshare``/``ip``) it skips with a reason that says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.cluster.conftest import INSIDE_ENV
from tests.cluster.harness import RUN_ENV, marked_processes

REPO = Path(__file__).resolve().parents[1]
#: 6-8 raylets, Serve, two apps, node failovers, PostgreSQL and the S3 server: ~6 min on 2 busy cores.
SUITE_TIMEOUT_S = 1500

pytestmark = pytest.mark.cluster


def _netns_refusal() -> str | None:
    """Why a private network namespace cannot be made here, or None when it can."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", "ip link set lo up"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"unshare --net --mount refused: {probe.stderr.strip()}"
    return None


def test_cluster_suite_passes_in_a_private_network_namespace() -> None:
    refusal = _netns_refusal()
    if refusal is not None:
        pytest.skip(f"the cluster suite needs network and mount namespaces (root): {refusal}")
    run_id = uuid.uuid4().hex[:12]
    # Captured logs at WARNING: at INFO the S3 server's request lines bury a failure's assertion.
    inner = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "log_level=WARNING",
        str(REPO / "tests" / "cluster"),
    ]  # fmt: skip
    env = os.environ | {
        INSIDE_ENV: "1",
        RUN_ENV: run_id,
        "RAY_AUTH_MODE": "disabled",  # loopback only, inside the namespace: nothing else can connect
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
    out = run.stdout + run.stderr
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    print("cluster suite:", summary[-1] if summary else "(no summary)")
    # the failures' assertion lines first (they survive any truncation), then the end of the output
    failures = "\n".join(ln for ln in out.splitlines() if ln.startswith("E ") or ln.startswith("FAILED"))
    assert run.returncode == 0, failures[-6000:] + "\n...\n" + out[-8000:]
    # the fixtures' teardown stopped every node process they started (raylets, workers, agents)
    assert marked_processes(run_id) == []
    assert summary and " passed" in summary[-1] and "skipped" not in summary[-1], out[-4000:]
