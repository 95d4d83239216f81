"""A search request as a plan: what to search with, which shards to ask, what each shard is asked, and
how their answers become one; run against any per-shard searcher.

A plan is data (:class:`SearchPlan`): the query (a vector, :class:`QueryVector`, or a stored record's
vector, :class:`StoredVector`), the library's shards to ask, and the per-shard request
(:class:`ShardRequest`: ``top_k``, filter, ``min_score``, ``recall_target``, ``return_frame``).
:func:`run_plan` carries it out against a :class:`ShardSearcher`, the interface one library's shards
answer through: LibraryIndex replicas behind Serve handles in the service
(``deployments/searchers.py``), readers in this process in tests and tools
(``index.query.shard.ReaderShards``).

Rounds:

1. By id only: the record's vector is read on the shard that holds it (``shard_of(image_id)``).
   When that shard is the only one asked (a 1-shard library), this round and the next are one call
   (``search_stored``): the shard reads the vector and searches with it.
2. Every shard asked searches with the vector (concurrently), and :func:`index.query.merge.merge_results`
   keeps the best ``top_k`` of their union, exactly the unsharded answer with exact indexes.

A shard that fails fails the plan (``Unavailable``, 503; a shard's ``ServiceError`` is the plan's
answer): never a partial answer. A plan that asks one shard makes one call and lets its errors through
as they are.

Grouping, cursors, facets and composed queries extend the plan: more fields on the request (what each
shard returns), more kinds of query (what the rounds compute), another merge (how answers combine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from index.query.merge import gather_shards, merge_results
from index.search.sharding import shard_of

#: One result object of a shard's answer: the API's fields, plus the raw cosine under ``RANK_KEY``.
Result = dict[str, Any]


@dataclass(frozen=True)
class QueryVector:
    """A query's vector and what it was embedded as.

    Args:
        vector: unit float32 vector of the library's dimension.
        vector_kind: the kind of records it may match (``whole``, ``item``, ``face``; None: any).
        query_kind: ``image`` or ``text``: which score calibration turns its cosines into scores.
    """

    vector: np.ndarray
    vector_kind: str | None
    query_kind: str


@dataclass(frozen=True)
class StoredVector:
    """The vector of a stored record (its first uri when ``image_uri`` is None), read on ``shard``.

    Raises (when read): ``ImageNotFound`` when no such live record exists.
    """

    image_id: str
    image_uri: str | None
    shard: int
    query_kind: str = "image"


@dataclass(frozen=True)
class ShardRequest:
    """What every shard asked is asked, besides the query: each answers its own best ``top_k`` of the
    records passing ``node`` (a parsed ``tag_filter``; None: all), cut at ``min_score``. A shard whose
    tags make ``node`` cost more than ``max_filter_work`` work units (`filters.work`; None: no bound)
    refuses it (InvalidParameter) before evaluating it."""

    top_k: int
    node: object = None
    min_score: float | None = None
    return_frame: bool = False
    recall_target: float | None = None
    max_filter_work: int | None = None


class ShardSearcher(Protocol):
    """One library's shards, as a plan asks them. Each method answers for one shard; a shard that cannot
    answer raises (a ``ServiceError`` for a 4xx/503 the client should see, anything else otherwise)."""

    async def search(self, shard: int, query: QueryVector, request: ShardRequest) -> list[Result]:
        """The shard's best ``request.top_k`` result objects for ``query``, best first, each carrying
        ``RANK_KEY``."""
        ...

    async def stored_vector(self, query: StoredVector) -> QueryVector:
        """The stored record's vector and kind, from ``query.shard`` (round 1 of a search by id)."""
        ...

    async def search_stored(self, query: StoredVector, request: ShardRequest) -> list[Result]:
        """Both rounds on ``query.shard`` in one call: read the record's vector, search with it."""
        ...


@dataclass(frozen=True)
class SearchPlan:
    """One search of one library.

    Args:
        library: the library's name (for errors and logs).
        shard_count: how many shards the library has.
        shards: the shards to ask, in order (every shard of the library, for a search).
        query: what to search with.
        request: what each shard is asked.
    """

    library: str
    shard_count: int
    shards: tuple[int, ...]
    query: QueryVector | StoredVector
    request: ShardRequest

    @classmethod
    def with_vector(
        cls, library: str, shard_count: int, query: QueryVector, request: ShardRequest
    ) -> SearchPlan:
        """Search every shard of the library with ``query``."""
        return cls(library, shard_count, tuple(range(shard_count)), query, request)

    @classmethod
    def by_id(
        cls, library: str, shard_count: int, image_id: str, image_uri: str | None, request: ShardRequest
    ) -> SearchPlan:
        """Search every shard of the library with the vector of a stored record, read on its shard.

        Raises:
            ValueError: ``shard_count`` is not a positive integer.
        """
        stored = StoredVector(image_id, image_uri, shard_of(image_id, shard_count))
        return cls(library, shard_count, tuple(range(shard_count)), stored, request)

    @property
    def rounds(self) -> int:
        """How many calls follow one another: 2 when a stored vector is read before the shards are asked
        (by id, on a library of several shards), else 1."""
        if isinstance(self.query, StoredVector) and self.shards != (self.query.shard,):
            return 2
        return 1


async def run_plan(plan: SearchPlan, searcher: ShardSearcher) -> list[Result]:
    """Carry ``plan`` out: the API's result objects, best first, at most ``plan.request.top_k``.

    Raises:
        ServiceError: a shard's (e.g. ``ImageNotFound`` from the record's shard, by id).
        Unavailable: a shard of several asked failed otherwise.
    """
    query = plan.query
    if isinstance(query, StoredVector):
        if plan.rounds == 1:
            answer = await searcher.search_stored(query, plan.request)
            return merge_results([answer], plan.request.top_k)
        query = await searcher.stored_vector(query)
    if len(plan.shards) == 1:
        answers = [await searcher.search(plan.shards[0], query, plan.request)]
    else:
        calls = [searcher.search(shard, query, plan.request) for shard in plan.shards]
        answers = await gather_shards(calls, library=plan.library, shards=plan.shards, of=plan.shard_count)
    return merge_results(answers, plan.request.top_k)
