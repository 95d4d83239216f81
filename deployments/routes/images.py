"""Images: add (upload or fetch, detect, encode, write), get, update tags, delete (``/image/...``).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures.
"""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.config import Limits
from deployments.http import envelope
from deployments.routes.replica import PREFIX, ReplicaDep, fetch_refused
from deployments.schemas import AddImage, DeleteImage, GetImage, UpdateTags
from filters import TagError, validate_tags
from index.errors import ImageNotFound, InvalidParameter
from index.ingest.fetch import FetchError, check_uri
from index.search.sharding import shard_of
from index.storage.embedded.store import NewRecord

router = APIRouter(prefix=PREFIX, tags=["images"])


def checked_tags(raw: Any, limits: Limits) -> dict[str, Any]:
    """``tags`` validated (400 naming the bad path)."""
    try:
        return validate_tags(raw, limits=limits.tag_limits())
    except TagError as exc:
        raise InvalidParameter(str(exc)) from None


@router.post("/image/add")
async def add_image(body: AddImage, replica: ReplicaDep) -> JSONResponse:
    tags = checked_tags(body.tags, replica.limits)
    # The request is checked whole (400) before the library is looked up (404); an uploaded image
    # is decoded here, a URI is only fetched once the library is known to exist.
    uploaded = None
    found = await replica.lookup(body.library_name)
    if body.image_base64 is not None:
        uploaded = await replica.decode_upload(
            replica.decode_base64(body.image_base64), "image_base64", found
        )
    else:
        try:
            check_uri(body.image_uri, policy=replica.fetch_policy)  # a refusal needs no library (400 first)
        except FetchError as exc:
            raise fetch_refused(exc) from None
    info = await replica.checked(found)
    if uploaded is None:
        fetched = await replica.fetch(body.image_uri)
        uploaded = await replica.decode_upload(fetched, "image_uri", info)
    data, image = uploaded
    embedded = await replica.embed(image, info.mode, query=False)
    if embedded.vector is None or embedded.vector_kind is None:  # imports always embed something
        raise RuntimeError(f"no vector for an import into a {info.mode} library")
    record = NewRecord(
        image_id=body.image_id,
        image_uri=body.image_uri,
        vector=embedded.vector,
        tags=tags,
        vector_kind=embedded.vector_kind,
        frame=data if body.save_image else None,
        extra=embedded.extra,
    )
    created = await replica.writer.add_images.remote(info.name, info.uid, [record])
    return envelope({"image_id": body.image_id, "image_uri": body.image_uri, "created": created[0]})


@router.post("/image/get")
async def get_image(body: GetImage, replica: ReplicaDep) -> JSONResponse:
    info = await replica.library(body.library_name, check_model=False)
    index = replica.index.shard(info, shard_of(body.image_id, info.shards))
    images = await index.get_images.remote(body.image_id, body.image_uri, body.return_frame)
    if not images:
        raise ImageNotFound(info.name, body.image_id, body.image_uri)
    return envelope({"images": images})


@router.post("/image/update_tags")
async def update_tags(body: UpdateTags, replica: ReplicaDep) -> JSONResponse:
    tags = checked_tags(body.tags, replica.limits)
    info = await replica.library(body.library_name, check_model=False)
    n = await replica.writer.update_tags.remote(info.name, info.uid, body.image_id, body.image_uri, tags)
    if n == 0:
        raise ImageNotFound(info.name, body.image_id, body.image_uri)
    return envelope({"updated": n})


@router.post("/image/delete")
async def delete_image(body: DeleteImage, replica: ReplicaDep) -> JSONResponse:
    info = await replica.library(body.library_name, check_model=False)
    n = await replica.writer.delete_images.remote(info.name, info.uid, body.image_id, body.image_uri)
    return envelope({"deleted": n})
