"""The query layer: a library's read path (``reader``: snapshot + catch-up + search), one shard's answer
(``shard``), the cross-shard plan (``plan``: query, shards to ask, per-shard request, rounds) and the
exact merge (``merge``). Plain Python: the ingress adapts HTTP to it and Serve handles to its
``ShardSearcher`` interface (``deployments/searchers.py``)."""

from index.query.merge import RANK_KEY, gather_shards, merge_results, result_order
from index.query.plan import (
    QueryVector,
    Result,
    SearchPlan,
    ShardRequest,
    ShardSearcher,
    StoredVector,
    run_plan,
)
from index.query.reader import LibraryReader, load_table, record_object, result_objects
from index.query.shard import ReaderShards, read_stored_vector, search_reader

__all__ = [
    "RANK_KEY",
    "LibraryReader",
    "QueryVector",
    "ReaderShards",
    "Result",
    "SearchPlan",
    "ShardRequest",
    "ShardSearcher",
    "StoredVector",
    "gather_shards",
    "load_table",
    "merge_results",
    "read_stored_vector",
    "record_object",
    "result_objects",
    "result_order",
    "run_plan",
    "search_reader",
]
