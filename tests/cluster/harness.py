"""A real multi-node Ray cluster on one machine, each node with a private directory (no Ray needed to import).

Every node is a ``ray start --block`` process of its own, started under ``unshare -m --propagation
private`` with a tmpfs mounted over the node's ``data`` directory: the raylet, its agents and every
worker it spawns see their own copy of ``ROOT/<node>/data``, and no other node's files. Ray's own
files (sockets, logs) sit beside it in ``ROOT/<node>/ray`` on the shared filesystem, so that the
driver can reach the head's sockets and a failing test can read a node's logs.

Meant to run inside a private network namespace (``unshare --net``, see ``tests/test_cluster_suite.py``):
every node binds 127.0.0.1, and fixed ports (GCS, dashboard agent) cannot clash with anything else on the
machine. Authentication is off (``RAY_AUTH_MODE=disabled``): nothing outside the namespace can connect.

Every process of a node carries ``MARKER_ENV=<run>:<node>`` in its environment (Ray's workers inherit the
raylet's), which is how ``node_processes`` finds them, ``kill_node`` kills them and ``shutdown`` leaves
nothing behind; each node has its own ``--temp-dir``, so ``/tmp/ray/ray_current_cluster`` is never
written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
MARKER_ENV = "IMAGE_SEARCH_CLUSTER_NODE"
#: Where set, the run id every cluster of this process takes (the outer test checks nothing is left).
RUN_ENV = "IMAGE_SEARCH_CLUSTER_RUN"
#: The node's private directory, as its processes see it (each Ray worker inherits it from its raylet).
NODE_DIR_ENV = "IMAGE_SEARCH_NODE_DIR"
GCS_PORT = 6379
#: Ray's object store per node: small, since four raylets share the machine's memory.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
#: A node registers with the GCS within seconds on an idle machine; the 2 shared cores are slower.
NODE_START_DEADLINE_S = 120


class ClusterError(RuntimeError):
    """A node did not start, or did not stop, as asked."""


@dataclass
class Node:
    """One Ray node: its name, its custom resources, and its directories."""

    name: str
    resources: dict[str, float]
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    alive: bool = False

    @property
    def data_dir(self) -> Path:
        """The node's private directory (a tmpfs of its own mount namespace)."""
        return self.root / "data"

    @property
    def temp_dir(self) -> Path:
        """Ray's ``--temp-dir`` for this node (sockets, logs), on the shared filesystem."""
        return self.root / "ray"


@dataclass
class LocalCluster:
    """Head + worker nodes started by ``ray start``; see the module docstring.

    Args:
        base: a fresh directory; node ``N``'s directories go to ``base/N``. Keep it short: Ray's Unix
            socket paths under it must fit in 107 bytes.
        head_cpus: CPUs the head advertises (Serve's controller and proxy ask for none).
    """

    base: Path
    head_cpus: int = 1
    run_id: str = field(default_factory=lambda: os.environ.get(RUN_ENV) or uuid.uuid4().hex[:12])
    nodes: dict[str, Node] = field(default_factory=dict)
    _next_port: int = 20000

    @property
    def address(self) -> str:
        return f"127.0.0.1:{GCS_PORT}"

    def marker(self, name: str) -> str:
        return f"{self.run_id}:{name}"

    def _ports(self) -> list[str]:
        # Several raylets on one address: each needs its own agent, metrics and manager ports.
        names = [
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        ]
        out = []
        for flag in names:
            out.append(f"{flag}={self._next_port}")
            self._next_port += 1
        # workers of different nodes must not race for the same port range either
        out += [f"--min-worker-port={self._next_port}", f"--max-worker-port={self._next_port + 199}"]
        self._next_port += 200
        return out

    def start_head(self, resources: dict[str, float] | None = None) -> Node:
        """Start the head node (GCS + raylet) in a private mount namespace; wait until it is up."""
        args = [
            "--head",
            f"--port={GCS_PORT}",
            f"--num-cpus={self.head_cpus}",
            "--include-dashboard=false",
        ]
        return self._start("head", resources or {}, args)

    def add_node(self, name: str, resources: dict[str, float], num_cpus: int = 1) -> Node:
        """Start a worker node with these custom resources; wait until the GCS counts it alive."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists already")
        return self._start(name, resources, [f"--address={self.address}", f"--num-cpus={num_cpus}"])

    def _start(self, name: str, resources: dict[str, float], args: list[str]) -> Node:
        node = Node(name=name, resources=dict(resources), root=self.base / name)
        node.data_dir.mkdir(parents=True)
        node.temp_dir.mkdir(parents=True)
        ray_bin = str(Path(sys.executable).parent / "ray")
        argv = [
            ray_bin,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={node.temp_dir}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
            f"--resources={json.dumps(resources)}",
            *self._ports(),
            *args,
        ]
        env = os.environ | {
            MARKER_ENV: self.marker(name),
            NODE_DIR_ENV: str(node.data_dir),
            # Temporary files (cluster mode's default cache_dir among them) on the node's private tmpfs,
            # as on a real node's local disk.
            "TMPDIR": str(node.data_dir),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(REPO),
        }
        env.pop("RAY_ADDRESS", None)
        # The tmpfs exists only in this node's mount namespace: every process of the node sees it.
        wrapped = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64m tmpfs "$1" && shift && exec "$@"',
            "sh",
            str(node.data_dir),
            *argv,
        ]
        log = open(node.root / "ray_start.log", "wb")  # noqa: SIM115 - the child holds it
        with log:
            node.proc = subprocess.Popen(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.nodes[name] = node
        self._wait_alive(node)
        node.alive = True
        return node

    def _alive_resources(self) -> list[dict[str, float]]:
        """Resources of the nodes the GCS counts alive, asked in a subprocess (no driver needed)."""
        code = (
            "import json, ray;"
            "from ray._raylet import GcsClient;"
            f"c = GcsClient(address={self.address!r});"
            "print(json.dumps([dict(n.resources_total) for n in c.get_all_node_info().values()"
            " if n.state == 0]))"
        )
        env = os.environ | {"RAY_AUTH_MODE": "disabled"}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
        if out.returncode != 0:
            return []
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def _wait_alive(self, node: Node) -> None:
        end = time.monotonic() + NODE_START_DEADLINE_S
        while time.monotonic() < end:
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise ClusterError(
                    f"node {node.name} exited ({node.proc.returncode}):\n{self.log(node.name)}"
                )
            alive = self._alive_resources()
            # a node with no custom resource counts once the GCS answers with any node alive
            if alive and all(any(r.get(k, 0) >= v for r in alive) for k, v in node.resources.items()):
                return
            time.sleep(1.0)
        raise ClusterError(f"node {node.name} not up in {NODE_START_DEADLINE_S}s:\n{self.log(node.name)}")

    def log(self, name: str, tail: int = 4000) -> str:
        """The tail of a node's ``ray start`` output and of its raylet log."""
        node = self.nodes[name]
        parts = [(node.root / "ray_start.log").read_bytes()[-tail:].decode(errors="replace")]
        for raylet in node.temp_dir.glob("session_*/logs/raylet.out"):
            parts.append(raylet.read_bytes()[-tail:].decode(errors="replace"))
        return "\n".join(parts)

    def node_processes(self, name: str) -> list[psutil.Process]:
        """Every live process of node ``name`` (the ``ray start`` process, GCS, raylet, agents, workers)."""
        marker = self.marker(name)
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                if p.environ().get(MARKER_ENV) == marker:
                    found.append(p)
        return found

    def node_of(self, proc: psutil.Process) -> str | None:
        """The name of the node ``proc`` belongs to, or None when it is no process of this cluster."""
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            run, _, name = proc.environ().get(MARKER_ENV, "").partition(":")
            if run == self.run_id:
                return name
        return None

    def kill_node(self, name: str) -> None:
        """Kill node ``name`` as a crash would (SIGKILL to its raylet and every worker), and wait until
        none of its processes is left."""
        node = self.nodes[name]
        if name == "head":
            raise ValueError("kill_node kills worker nodes; the head goes with shutdown()")
        victims = self.node_processes(name)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(victims, timeout=30)
        if alive:
            raise ClusterError(f"node {name}: processes survived SIGKILL: {[p.pid for p in alive]}")
        if node.proc is not None:
            node.proc.wait(10)
        node.alive = False

    def shutdown(self) -> None:
        """Kill every process of every node (workers first, the head last), then remove the directories."""
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            victims = self.node_processes(name)
            for p in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(victims, timeout=30)
            proc = self.nodes[name].proc
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
            self.nodes[name].alive = False
        shutil.rmtree(self.base, ignore_errors=True)


def new_cluster_dir() -> Path:
    """A short fresh directory for a cluster's nodes (Ray's socket paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))


def open_paths(proc: psutil.Process) -> set[str]:
    """Files ``proc`` holds open or memory-mapped, and its working directory."""
    paths = {f.path for f in proc.open_files()}
    paths |= {m.path for m in proc.memory_maps() if m.path.startswith("/")}
    paths.add(proc.cwd())
    return paths


def foreign_files(cluster: LocalCluster, procs: list[psutil.Process]) -> list[str]:
    """Each file one of ``procs`` holds that lies under another node's directory, as
    ``"pid P (node X) holds PATH of node Y"``; an empty list when every process keeps to its own node."""
    found = []
    for proc in procs:
        own = cluster.node_of(proc)
        if own is None:
            raise ValueError(f"pid {proc.pid} is no process of this cluster")
        for path in sorted(open_paths(proc)):
            for name, node in cluster.nodes.items():
                if name != own and Path(path).is_relative_to(node.root):
                    found.append(f"pid {proc.pid} (node {own}) holds {path} of node {name}")
    return found


def marked_processes(run_id: str) -> list[psutil.Process]:
    """Every live process of every node of the clusters with this run id."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if p.environ().get(MARKER_ENV, "").partition(":")[0] == run_id:
                found.append(p)
    return found


def replica_processes(cluster: LocalCluster, app: str, deployment: str) -> list[psutil.Process]:
    """The processes of a Serve deployment's replicas in ``cluster``, by the title Ray gives a replica
    actor: ``ray::ServeReplica:<app>:<deployment>`` when idle, ``ray::SERVE_REPLICA::...:ServeReplica:
    <app>:<deployment>.<method>`` while it runs a method. Only this cluster's processes count: another
    Ray instance on the machine (the outer test session's) may run an app of the same name."""
    title = re.compile(rf"ServeReplica:{re.escape(app)}:{re.escape(deployment)}(\.|\s|$)")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and title.search(cmd) and cluster.node_of(p) is not None:
            found.append(p)
    return found
