"""The exact merge of shards' answers and the fan-out that fails whole (``index.query.merge``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from index.errors import ImageNotFound, Unavailable
from index.query.merge import RANK_KEY, gather_shards, merge_results


def _hit(image_id: str, cosine: float, uri: str = "u") -> dict[str, Any]:
    return {"image_id": image_id, "image_uri": uri, "score": max(cosine, 0.0), "tags": {}, RANK_KEY: cosine}


def test_merge_ranks_by_cosine_and_breaks_ties_by_id_then_uri() -> None:
    answers = [
        [_hit("c", 0.9), _hit("x", -0.1)],
        [_hit("b", 0.9, "u2"), _hit("b", 0.9, "u1"), _hit("y", -0.05)],
        [],
    ]
    merged = merge_results(answers, 5)
    assert [(r["image_id"], r["image_uri"]) for r in merged] == [
        ("b", "u1"),
        ("b", "u2"),
        ("c", "u"),
        ("y", "u"),  # both score 0; the cosine still ranks them
        ("x", "u"),
    ]
    assert all(RANK_KEY not in r for r in merged)
    assert len(merge_results(answers, 2)) == 2


async def _ok(k: int) -> list[int]:
    return [k]


async def _broken() -> list[int]:
    raise RuntimeError("replica lost its node")


def test_a_shard_that_fails_fails_the_request_with_503() -> None:
    assert asyncio.run(gather_shards([_ok(0), _ok(1)], library="lib")) == [[0], [1]]
    with pytest.raises(Unavailable, match=r"library 'lib': shard 1 of 3 cannot answer") as err:
        asyncio.run(gather_shards([_ok(0), _broken(), _ok(2)], library="lib"))
    assert err.value.http_status == 503

    async def not_found() -> list[int]:
        raise ImageNotFound("lib", "x")

    # a service error of a shard is the request's answer (the same on every shard)
    with pytest.raises(ImageNotFound):
        asyncio.run(gather_shards([_broken(), not_found()], library="lib"))


def test_the_failing_shard_is_named_by_its_number_in_the_library() -> None:
    """A plan that asks some of a library's shards names the shard that failed, of the library's count."""
    with pytest.raises(Unavailable, match=r"shard 5 of 8 cannot answer"):
        asyncio.run(gather_shards([_ok(2), _broken()], library="lib", shards=[2, 5], of=8))
