"""deployments.searchers: the keyword arguments sent to LibraryIndex replicas."""

from __future__ import annotations

import inspect

import numpy as np

from deployments.library_index import LibraryIndex
from deployments.searchers import _search_kwargs
from index.query.plan import QueryVector, ShardRequest

#: What ``LibraryIndex.search`` took before ``limits.max_filter_work`` existed. While a rolling update
#: replaces LibraryIndex replicas, a new Ingress still calls old ones: a keyword outside this set would
#: fail every search routed to them (TypeError) until they are gone.
SEARCH_KEYWORDS_OF_OLDER_REPLICAS = {
    "query_kind",
    "top_k",
    "node",
    "min_score",
    "return_frame",
    "recall_target",
}


def test_searches_send_only_keywords_older_library_index_replicas_accept() -> None:
    query = QueryVector(np.zeros(4, np.float32), "whole", "text")
    request = ShardRequest(top_k=5, recall_target=0.9, max_filter_work=1234)
    kwargs = _search_kwargs(query, request)
    assert set(kwargs) <= SEARCH_KEYWORDS_OF_OLDER_REPLICAS
    accepted = set(inspect.signature(LibraryIndex.func_or_class.search).parameters)
    assert set(kwargs) <= accepted


def test_the_filter_work_budget_reaches_the_library_index_through_its_constructor() -> None:
    """It is configuration (limits.max_filter_work), bound when the graph is built, not a request field."""
    params = inspect.signature(LibraryIndex.func_or_class.__init__).parameters
    assert "max_filter_work" in params
    assert "max_filter_work" not in inspect.signature(LibraryIndex.func_or_class.search).parameters
