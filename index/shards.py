"""Sharded libraries: how the answers of every shard become one. Which shard holds an image id is
index/search/sharding.py.

A search goes to every shard with the same query, filter, ``top_k``, ``min_score`` and ``recall_target``;
each answers its own top-k, and :func:`merge_results` keeps the best ``top_k`` of their union, ranked by
the raw cosine each shard sends along (:data:`RANK_KEY`; scores are clipped at 0 and rounded, so they tie
where cosines do not). With exact indexes that is exactly the unsharded answer: any record of the global
top-k is in its own shard's top-k. Equal cosines are ordered by ``image_id`` then ``image_uri``, so the
merged order does not depend on which shard answered first.

A shard that cannot answer fails the whole request (:func:`gather_shards` raises ``Unavailable``):
a partial answer would silently miss records.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from index.errors import ServiceError, Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The key of a shard's result object that carries the hit's cosine (removed by :func:`merge_results`).
RANK_KEY = "cosine"


def result_order(result: dict[str, Any]) -> tuple[float, str, str]:
    """Sort key of a shard's result object: highest cosine first, ties by image_id then image_uri."""
    return (-float(result[RANK_KEY]), str(result["image_id"]), str(result["image_uri"]))


def merge_results(answers: Sequence[Sequence[dict[str, Any]]], top_k: int) -> list[dict[str, Any]]:
    """The best ``top_k`` result objects of all shards' answers (each already cut at ``min_score``, each
    carrying :data:`RANK_KEY`), without that key: the API's result objects."""
    merged = sorted((r for answer in answers for r in answer), key=result_order)[:top_k]
    return [{k: v for k, v in r.items() if k != RANK_KEY} for r in merged]


async def gather_shards(calls: Sequence[Awaitable[T]], *, library: str) -> list[T]:
    """Await one call per shard concurrently and return their answers in shard order.

    Raises:
        ServiceError: the first shard (in shard order) that raised one (a 404 or 400 is the same on
            every shard; ``Unavailable`` when the shard's storage is down).
        Unavailable: a shard failed otherwise (its replica died, its data could not be loaded): the
            request fails rather than answer without that shard's records.
    """
    answers = await asyncio.gather(*calls, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, ServiceError):
            raise answer
    for shard, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            logger.error(
                "library %s: shard %d of %d failed: %s: %s",
                library,
                shard,
                len(answers),
                type(answer).__name__,
                answer,
            )
            raise Unavailable(
                f"library {library!r}: shard {shard} of {len(answers)} cannot answer; retry later"
            ) from None
    return list(answers)  # type: ignore[arg-type]
