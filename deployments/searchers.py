"""Serve handles as the query layer's per-shard searcher (``index.query.plan.ShardSearcher``).

A library's shard is served by the shared, multiplexed LibraryIndex deployment, or by a LibraryIndex
deployment of its own (``AppArgs.dedicated_shards``); either is called through a ``GuardedHandle``
(wait for a running replica, retry a read whose replica died) with the shard's multiplexed id.
"""

from __future__ import annotations

from typing import Any

from deployments.readiness import GuardedHandle
from index.query.plan import QueryVector, Result, ShardRequest, StoredVector
from index.storage.embedded.catalog import LibraryInfo


class IndexHandles:
    """The LibraryIndex deployments one ingress replica calls.

    Args:
        shared: the multiplexed LibraryIndex.
        dedicated: ``(library, shard) -> handle`` for the shards with a deployment of their own.
    """

    def __init__(self, shared: GuardedHandle, dedicated: dict[tuple[str, int], GuardedHandle]) -> None:
        self.shared = shared
        self.dedicated = dedicated

    def shard(self, info: LibraryInfo, shard: int = 0) -> GuardedHandle:
        """The handle that serves shard ``shard`` of ``info``, routed to its multiplexed id."""
        handle = self.dedicated.get((info.name, shard), self.shared)
        return handle.options(multiplexed_model_id=info.shard_key(shard))

    def searcher(self, info: LibraryInfo) -> LibraryShards:
        """The shards of ``info`` as a plan's searcher."""
        return LibraryShards(self, info)


def _search_kwargs(query: QueryVector | StoredVector, request: ShardRequest) -> dict[str, Any]:
    """``LibraryIndex.search``'s keyword arguments (its signature is kept for rolling updates, so
    ``request.max_filter_work`` does not travel: each LibraryIndex enforces the budget its builder args
    gave it, the same value)."""
    return {
        "query_kind": query.query_kind,
        "top_k": request.top_k,
        "node": request.node,
        "min_score": request.min_score,
        "return_frame": request.return_frame,
        "recall_target": request.recall_target,
    }


class LibraryShards:
    """One library's shards, each answered by a LibraryIndex replica (``ShardSearcher``)."""

    def __init__(self, handles: IndexHandles, info: LibraryInfo) -> None:
        self.handles = handles
        self.info = info

    async def search(self, shard: int, query: QueryVector, request: ShardRequest) -> list[Result]:
        answer = await self.handles.shard(self.info, shard).search.remote(
            query.vector, vector_kind=query.vector_kind, **_search_kwargs(query, request)
        )
        return list(answer["results"])

    async def stored_vector(self, query: StoredVector) -> QueryVector:
        vector, kind = await self.handles.shard(self.info, query.shard).stored_vector.remote(
            query.image_id, query.image_uri
        )
        return QueryVector(vector, kind, query.query_kind)

    async def search_stored(self, query: StoredVector, request: ShardRequest) -> list[Result]:
        answer = await self.handles.shard(self.info, query.shard).search_by_id.remote(
            query.image_id, query.image_uri, **_search_kwargs(query, request)
        )
        return list(answer["results"])
