"""The cluster harness does what the cluster suite relies on: separate nodes with their own resources, on
loopback only, replicas pinned by custom resources, node directories that other nodes cannot see, an
isolation checker that can fail, Serve rescheduling after a node dies, and an S3 server reachable
through fsspec from any node."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import ray
from ray import serve

from tests.cluster.conftest import HEAD_RESOURCES, WORKERS, get_json, wait_for
from tests.cluster.harness import LocalCluster, foreign_files, open_paths, replica_processes
from tests.cluster.probe import Probe
from tests.s3_server import S3

pytestmark = pytest.mark.cluster


def _probe_app(name: str, resources: dict[str, float]) -> str:
    """Deploy a one-replica Probe app ``name`` at ``/name`` that needs ``resources``; its route."""
    options = {"num_cpus": 0, "resources": resources}
    app = Probe.options(name="Probe", ray_actor_options=options).bind()  # type: ignore[attr-defined]
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"/{name}"


@pytest.fixture(scope="module")
def probes(cluster: LocalCluster) -> Iterator[dict[str, str]]:
    """One Probe app per worker node, pinned to it: node name -> app name."""
    apps = {node: f"probe_{node}" for node in WORKERS}
    for node, app in apps.items():
        _probe_app(app, {f"node_{node}": 0.01})
    yield apps
    for app in apps.values():
        serve.delete(app)


def _handle(app: str) -> serve.handle.DeploymentHandle:
    return serve.get_app_handle(app)


def test_nodes_are_alive_with_their_resources_on_loopback_only(cluster: LocalCluster) -> None:
    declared = {"head": HEAD_RESOURCES, **WORKERS}
    expected = {f"node_{name}" for name in declared}
    # nodes other tests add (the failover test's d and e) carry other resources
    alive = [n for n in ray.nodes() if n["Alive"] and expected & set(n["Resources"])]
    by_resource = {}
    for n in alive:
        custom = {k for k in n["Resources"] if k.startswith("node_")}
        assert len(custom) == 1, n["Resources"]
        by_resource[custom.pop()] = n
    assert len(alive) == len(by_resource) == 1 + len(WORKERS)
    assert set(by_resource) == expected
    for name, resources in declared.items():  # each node carries its roles (placement of cluster mode)
        assert {k: by_resource[f"node_{name}"]["Resources"].get(k) for k in resources} == resources
    assert "node:__internal_head__" in by_resource["node_head"]["Resources"]
    assert {n["NodeManagerAddress"] for n in alive} == {"127.0.0.1"}
    # a private network namespace: loopback is the only interface there is
    assert set(psutil.net_if_addrs()) == {"lo"}
    for name in cluster.nodes:
        assert cluster.node_processes(name), f"node {name} has no processes"
    # Ray recorded the cluster's address in the head's own temp dir, not in /tmp/ray for others to find
    recorded = cluster.nodes["head"].temp_dir / "ray_current_cluster"
    assert recorded.read_text().strip() == cluster.address


def test_each_replica_runs_on_the_node_its_resource_names(
    cluster: LocalCluster, probes: dict[str, str]
) -> None:
    for node, app in probes.items():
        where = get_json(f"/{app}")  # through the head's proxy
        assert where["node"] == node
        assert where["node_dir"] == str(cluster.nodes[node].data_dir)
        procs = replica_processes(cluster, app, "Probe")
        assert [p.pid for p in procs] == [where["pid"]]
        assert cluster.node_of(procs[0]) == node


def test_a_node_directory_is_private_to_its_node(cluster: LocalCluster, probes: dict[str, str]) -> None:
    token = uuid.uuid4().hex
    written = {
        node: _handle(app).write.remote("mine.txt", f"{node}:{token}").result()
        for node, app in probes.items()
    }
    for node, app in probes.items():
        handle = _handle(app)
        assert handle.read.remote(written[node]).result() == f"{node}:{token}"
        for other, path in written.items():
            if other != node:
                assert handle.read.remote(path).result() is None, f"node {node} sees {path} of node {other}"
        # the driver (head node, its own mount namespace) does not see it either...
        assert not Path(written[node]).exists()
        # ...yet the file is real: seen through the replica's own root, it is there
        pid = handle.where.remote().result()["pid"]
        assert Path(f"/proc/{pid}/root{written[node]}").read_text() == f"{node}:{token}"


def test_isolation_checker_passes_for_replicas_that_keep_to_their_node(
    cluster: LocalCluster, probes: dict[str, str]
) -> None:
    procs = [p for app in probes.values() for p in replica_processes(cluster, app, "Probe")]
    assert len(procs) == len(probes)
    for p in procs:
        # each replica does hold files under its own node's directory (its logs): allowed, not foreign
        own_root = cluster.nodes[cluster.node_of(p) or ""].root
        assert any(Path(path).is_relative_to(own_root) for path in open_paths(p)), p.pid
    assert foreign_files(cluster, procs) == []


def test_isolation_checker_fails_on_a_file_of_another_node(
    cluster: LocalCluster, probes: dict[str, str]
) -> None:
    # A file under node b's directory on the shared filesystem (outside b's tmpfs), so node a can open it:
    # what a deployment relying on a shared filesystem would do.
    shared = cluster.nodes["b"].root / f"shared-{uuid.uuid4().hex}.bin"
    shared.write_bytes(b"x")
    handle = _handle(probes["a"])
    pid = handle.hold.remote(str(shared)).result()
    try:
        procs = [p for app in probes.values() for p in replica_processes(cluster, app, "Probe")]
        assert foreign_files(cluster, procs) == [f"pid {pid} (node a) holds {shared} of node b"]
    finally:
        handle.release.remote().result()
        shared.unlink()
    assert foreign_files(cluster, procs) == []


def test_s3_round_trip_through_fsspec_and_a_conditional_put(cluster: LocalCluster, s3: S3) -> None:
    import fsspec
    from botocore.exceptions import ClientError

    fs = fsspec.filesystem("s3", **s3.storage_options)
    key = f"{s3.bucket}/snapshots/{uuid.uuid4().hex}/manifest.json"
    fs.pipe(key, b'{"seq": 1}')
    assert fs.cat(key) == b'{"seq": 1}'
    assert fs.ls(key.rsplit("/", 1)[0]) == [key]

    # a worker node reads it through the same loopback endpoint, with no file in common
    @ray.remote(num_cpus=0, resources={"node_b": 0.01})
    def read_on_node_b(path: str, options: dict[str, object]) -> bytes:
        import fsspec

        return fsspec.filesystem("s3", **options).cat(path)  # type: ignore[no-any-return]

    assert ray.get(read_on_node_b.remote(key, s3.storage_options), timeout=120) == b'{"seq": 1}'

    # conditional put, as a pointer swap would use it: the first create wins, the second gets 412
    client = s3.client()
    pointer = f"pointers/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3.bucket, Key=pointer, Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=s3.bucket, Key=pointer, Body=b"2", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=s3.bucket, Key=pointer)["Body"].read() == b"1"


def test_serve_reschedules_a_replica_when_its_node_dies(
    cluster: LocalCluster, node_kill: Callable[[str], None]
) -> None:
    # Two extra nodes share a resource; the replica needs all of it, so it lands on one of them. The
    # shared nodes a, b, c stay up for the other tests.
    for name in ("d", "e"):
        cluster.add_node(name, {f"node_{name}": 1.0, "spare": 1.0})
    route = _probe_app("failover", {"spare": 1.0})
    first = wait_for("the failover app answering", lambda: get_json(route))["node"]
    assert first in ("d", "e")
    survivor = "e" if first == "d" else "d"
    node_kill(first)
    assert cluster.node_processes(first) == []
    moved = wait_for(
        f"the replica answering from node {survivor}", lambda: get_json(route)["node"] == survivor
    )
    assert moved
    procs = replica_processes(cluster, "failover", "Probe")
    assert [cluster.node_of(p) for p in procs] == [survivor]
    assert foreign_files(cluster, procs) == []
    serve.delete("failover")
