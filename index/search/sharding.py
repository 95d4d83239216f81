"""Shard routing: which shard of a sharded library holds an image id.

A library of S shards keeps each record in shard ``shard_of(image_id, S)``: a stable hash of the id's
UTF-8 bytes (BLAKE2b, 8 bytes, big-endian, mod S), never Python's ``hash`` (salted per process), so the
mapping is the same in every process, on every node and after every restart; all uris of an id land in
the same shard, so a get, an update or a delete touches one shard only. How the shards' answers are
merged is index/query/merge.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

#: The most shards any library may have (``shards`` of ``POST /library/create``); a deployment may
#: allow fewer (``limits.max_shards``).
MAX_SHARDS = 64


def shard_of(image_id: str, shards: int) -> int:
    """The shard (0..shards-1) that holds every record of ``image_id``.

    Raises:
        ValueError: ``shards`` is not a positive integer.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if shards == 1:
        return 0
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def split_by_shard(image_ids: Iterable[str], shards: int) -> dict[int, list[int]]:
    """Positions of ``image_ids`` grouped by shard (positions ascending within each shard)."""
    out: dict[int, list[int]] = {}
    for i, image_id in enumerate(image_ids):
        out.setdefault(shard_of(image_id, shards), []).append(i)
    return out
