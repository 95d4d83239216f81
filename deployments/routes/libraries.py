"""Libraries: create, list, describe, delete (``/library/...``).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures.
"""

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.http import envelope
from deployments.routes.replica import PREFIX, ReplicaDep
from deployments.schemas import CreateLibrary, DeleteLibrary
from index.errors import InvalidParameter

#: ``GET /library/list`` would shadow a library of this name.
RESERVED_LIBRARY_NAMES = frozenset({"list"})

router = APIRouter(prefix=PREFIX, tags=["libraries"])


@router.post("/library/create")
async def create_library(body: CreateLibrary, replica: ReplicaDep) -> JSONResponse:
    if body.library_name in RESERVED_LIBRARY_NAMES:
        raise InvalidParameter(f"library_name {body.library_name!r} is reserved")
    model = await replica.model_info()
    if body.shards > replica.limits.max_shards:
        raise InvalidParameter(
            f"shards: must be between 1 and {replica.limits.max_shards} (limits.max_shards)"
        )
    data = await replica.writer.create_library.remote(
        body.library_name, body.mode, body.description, model, body.index_kind, body.shards
    )
    return envelope(data)


# Before GET /library/{library_name}: routes match in order.
@router.get("/library/list")
async def list_libraries(replica: ReplicaDep) -> JSONResponse:
    infos = await asyncio.to_thread(replica.catalog.list)
    described = await asyncio.to_thread(
        lambda: [replica.storage.describe(i, replica.args.index) for i in infos]
    )
    return envelope({"libraries": described})


@router.get("/library/{library_name}")
async def get_library(library_name: str, replica: ReplicaDep) -> JSONResponse:
    info = await replica.library(library_name, check_model=False)
    return envelope(await asyncio.to_thread(replica.storage.describe, info, replica.args.index))


@router.post("/library/delete")
async def delete_library(body: DeleteLibrary, replica: ReplicaDep) -> JSONResponse:
    await replica.library(body.library_name, check_model=False)
    await replica.writer.delete_library.remote(body.library_name)
    return envelope({"library_name": body.library_name})
