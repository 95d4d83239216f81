"""Search: by image, by text, by id (``/search/...``). Each route checks the request, embeds the query
(or names the stored record) and runs a plan of the query layer (``index.query``) against the library's
shards (``deployments/searchers.py``).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures.
"""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.config import Limits
from deployments.http import envelope
from deployments.routes.replica import PREFIX, ReplicaDep
from deployments.schemas import SearchById, SearchByImage, SearchByText, SearchCommon
from filters import FilterError, parse_filter
from index.errors import InvalidParameter, ModeNotSupported
from index.query import QueryVector, Result, SearchPlan, ShardRequest, run_plan

router = APIRouter(prefix=PREFIX, tags=["search"])


def shard_request(body: SearchCommon, limits: Limits) -> ShardRequest:
    """What every shard is asked, from the request's common fields (400 naming the bad field)."""
    # An omitted top_k takes the contract's default (10), lowered to a smaller configured maximum:
    # a client that sent nothing must not be told its top_k is out of range.
    top_k = body.top_k if "top_k" in body.model_fields_set else min(body.top_k, limits.max_top_k)
    if top_k > limits.max_top_k:
        raise InvalidParameter(f"top_k: must be between 1 and {limits.max_top_k}")
    try:
        node = parse_filter(body.tag_filter, limits=limits.filter_limits())
    except FilterError as exc:
        raise InvalidParameter(str(exc)) from None
    return ShardRequest(
        top_k=top_k,
        node=node,
        min_score=body.min_score,
        return_frame=body.return_frame,
        recall_target=body.recall_target,
        max_filter_work=limits.max_filter_work,
    )


@router.post("/search/by-image")
async def search_by_image(body: SearchByImage, replica: ReplicaDep) -> JSONResponse:
    request = shard_request(body, replica.limits)
    raw = replica.decode_base64(body.image_base64)
    found = await replica.lookup(body.library_name)
    _, image = await replica.decode_upload(raw, "image_base64", found)
    info = await replica.checked(found)
    embedded = await replica.embed(image, info.mode, query=True)
    results: list[Result] = []
    if embedded.vector is not None:  # None: an item_search query in which no item was found
        query = QueryVector(embedded.vector, embedded.vector_kind, "image")
        plan = SearchPlan.with_vector(info.name, info.shards, query, request)
        results = await run_plan(plan, replica.index.searcher(info))
    data: dict[str, Any] = {"results": results}
    if info.mode != "general_search":  # documented extension: what the query was embedded as
        data["query_kind"] = embedded.vector_kind
        data["query_box"] = embedded.box
    return envelope(data)


@router.post("/search/by-text")
async def search_by_text(body: SearchByText, replica: ReplicaDep) -> JSONResponse:
    request = shard_request(body, replica.limits)
    if len(body.query_text) > replica.limits.max_text_chars:
        raise InvalidParameter(f"query_text: longer than {replica.limits.max_text_chars} characters")
    if not body.query_text.strip():
        raise InvalidParameter("query_text: must contain a non-whitespace character")
    info = await replica.library(body.library_name)
    if info.mode != "general_search":
        raise ModeNotSupported(
            f"Image library {info.name!r} is in {info.mode} mode and does not support text-to-image search."
        )
    query = QueryVector(await replica.encode_text(body.query_text), "whole", "text")
    plan = SearchPlan.with_vector(info.name, info.shards, query, request)
    return envelope({"results": await run_plan(plan, replica.index.searcher(info))})


@router.post("/search/by-id")
async def search_by_id(body: SearchById, replica: ReplicaDep) -> JSONResponse:
    request = shard_request(body, replica.limits)
    info = await replica.library(body.library_name)
    # The vector from the id's shard, then every shard searches with it (one call for a 1-shard library).
    plan = SearchPlan.by_id(info.name, info.shards, body.image_id, body.image_uri, request)
    return envelope({"results": await run_plan(plan, replica.index.searcher(info))})
