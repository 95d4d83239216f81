"""Shared keep-alive connections (ConnectionPools): reused across fetches, never across host names, and
never a way around the address check, which still runs on every fetch."""

from __future__ import annotations

import pytest

from index.ingest.fetch import ConnectionPools, FetchPolicy, FetchRefused, fetch_bytes
from tests.loopback import loopback_server


def policy_for(table: dict[str, list[str]], **kwargs: object) -> FetchPolicy:
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("NXDOMAIN")
        return list(table[host])

    return FetchPolicy(resolver=resolve, **kwargs)  # type: ignore[arg-type]


def url(server, host: str, seed: int) -> str:
    return server.img(seed).replace("127.0.0.1", host)


@pytest.mark.parametrize("shared", [True, False])
def test_fetches_share_one_connection_only_with_pools(shared: bool) -> None:
    policy = policy_for({"img.test": ["127.0.0.1"]}, allowed_networks=("127.0.0.1/32",))
    pools = ConnectionPools() if shared else None
    with loopback_server(keep_alive=True) as server:
        bodies = [
            fetch_bytes(url(server, "img.test", i), policy=policy, max_bytes=10**6, timeout_s=5, pools=pools)
            for i in range(5)
        ]
        connections = len(server.clients)
    assert all(b.startswith(b"\x89PNG") for b in bodies)
    assert connections == (1 if shared else 5)
    if pools is not None:
        pools.close()


def test_a_pooled_connection_never_skips_the_address_check() -> None:
    table = {"img.test": ["127.0.0.1"]}
    allowed = policy_for(table, allowed_networks=("127.0.0.1/32",))
    pools = ConnectionPools()
    with loopback_server(keep_alive=True) as server:
        fetch_bytes(url(server, "img.test", 1), policy=allowed, max_bytes=10**6, timeout_s=5, pools=pools)
        # the same pools under the default policy: loopback is refused although a connection is open
        with pytest.raises(FetchRefused, match="not a public address"):
            fetch_bytes(
                url(server, "img.test", 2),
                policy=policy_for(table),
                max_bytes=10**6,
                timeout_s=5,
                pools=pools,
            )
        # the name now resolves to a private address: refused, the open connection to 127.0.0.1 unused
        table["img.test"] = ["10.0.0.7"]
        with pytest.raises(FetchRefused):
            fetch_bytes(url(server, "img.test", 3), policy=allowed, max_bytes=10**6, timeout_s=5, pools=pools)
        assert sum(server.clients.values()) == 1
    pools.close()


def test_connections_are_kept_per_host_name_and_bounded() -> None:
    names = {f"h{i}.test": ["127.0.0.1"] for i in range(3)}
    policy = policy_for(names, allowed_networks=("127.0.0.1/32",))
    pools = ConnectionPools(max_hosts=2)
    with loopback_server(keep_alive=True) as server:
        fetch_bytes(url(server, "h0.test", 1), policy=policy, max_bytes=10**6, timeout_s=5, pools=pools)
        fetch_bytes(url(server, "h1.test", 1), policy=policy, max_bytes=10**6, timeout_s=5, pools=pools)
        assert len(pools) == 2 and len(server.clients) == 2  # same address, two names: two connections
        fetch_bytes(url(server, "h2.test", 1), policy=policy, max_bytes=10**6, timeout_s=5, pools=pools)
        assert len(pools) == 2  # the least recently used host's pool was closed
    pools.close()
    assert len(pools) == 0
