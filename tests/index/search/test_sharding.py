"""index.search.sharding: which shard holds an image id, fixed across processes and releases."""

from __future__ import annotations

import numpy as np
import pytest

from index.search.sharding import shard_of, split_by_shard


def test_routing_is_a_fixed_function_of_the_id() -> None:
    """The mapping must never change (records written by one release are looked up by the next): these
    values were computed once and are kept literally."""
    ids = ["a", "b", "img-0001", "img-0002", "photo/42.jpg", "ünïcødé", ""]
    assert [shard_of(i, 4) for i in ids] == EXPECTED_4
    assert [shard_of(i, 3) for i in ids] == EXPECTED_3
    assert [shard_of(i, 1) for i in ids] == [0] * len(ids)
    assert shard_of("img-0001", 64) == EXPECTED_64


EXPECTED_4 = [3, 1, 3, 3, 2, 1, 0]
EXPECTED_3 = [2, 2, 0, 0, 1, 2, 0]
EXPECTED_64 = 55


def test_routing_spreads_ids_and_groups_positions() -> None:
    ids = [f"id{i}" for i in range(4000)]
    counts = np.bincount([shard_of(i, 4) for i in ids], minlength=4)
    assert counts.min() > 900  # about 1,000 each
    groups = split_by_shard(ids[:50], 4)
    assert sorted(p for positions in groups.values() for p in positions) == list(range(50))
    assert all(shard_of(ids[p], 4) == k for k, positions in groups.items() for p in positions)
    with pytest.raises(ValueError, match="shards must be at least 1"):
        shard_of("a", 0)
