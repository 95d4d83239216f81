"""Ingress deployment: the REST routes of ``../shared/spec/API.md`` on FastAPI.

It validates (pydantic at the edge, ``filters`` for tags and tag_filter), decodes and resizes uploads in
a worker thread (CPUs are here; the encoder only receives compact uint8 arrays), and forwards to the
Encoder, the LibraryIndex (reads) and the Writer (mutations).

No ``from __future__ import annotations`` here: FastAPI must see the real request-model types on the
route signatures that Serve's class-based view rewrites.
"""

import asyncio
import logging
import re
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.http import ApiKeyAuth, BodyLimit, envelope, error_response, install_error_handlers
from deployments.schemas import (
    AddImage,
    CreateLibrary,
    CreateTask,
    DeleteImage,
    DeleteLibrary,
    GetImage,
    SearchById,
    SearchByImage,
    SearchByText,
    SearchCommon,
    UpdateTags,
)
from filters import FilterError, TagError, parse_filter, validate_tags
from index.catalog import Catalog, LibraryInfo
from index.embedder import PreprocessSpec
from index.errors import (
    ImageNotFound,
    InvalidParameter,
    ModelMismatch,
    ModeNotSupported,
    PayloadTooLarge,
    TaskNotFound,
)
from index.fetch import FetchError
from index.imaging import ImageDecodeError, ImageTooLarge, decode_base64, decode_image, prepare_for_model
from index.store import NewRecord

logger = logging.getLogger("ray.serve")

PREFIX = "/api/v1/operators/image-search"
#: ``GET /library/list`` would shadow a library of this name.
RESERVED_LIBRARY_NAMES = frozenset({"list"})
#: Task ids are 32 hex digits (uuid4); anything else cannot name a task.
TASK_ID_RE = re.compile(r"[0-9a-f]{32}")

api = FastAPI(
    title="Image Search API",
    version="1.0",
    description="Search image libraries by image or by text, with tag filters. "
    "Every response is the envelope {status, message, data}.",
)
install_error_handlers(api)
api.add_middleware(BodyLimit)
api.add_middleware(ApiKeyAuth)  # added last = runs first: no body is read for a refused caller


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        index: DeploymentHandle,
        writer: DeploymentHandle,
        importer: DeploymentHandle,
        args: AppArgs,
        preprocess: PreprocessSpec,
    ) -> None:
        self.encoder = encoder
        self.index = index
        self.writer = writer
        self.importer = importer
        self.args = args
        self.fetch_policy = args.fetch_policy()
        self.limits = args.limits
        self.preprocess = preprocess
        self.catalog = Catalog(args.storage_root, max_libraries=args.limits.max_libraries)
        self._model: dict[str, Any] | None = None
        # Read per request by the middlewares (they are installed when the module is imported).
        api.state.max_body_bytes = args.limits.max_body_bytes
        api.state.api_keys = args.load_api_keys()

    # -- operations ------------------------------------------------------------------------------

    @api.get("/health", tags=["operations"])
    @api.get(PREFIX + "/health", tags=["operations"])
    async def health(self) -> JSONResponse:
        """200 when the graph is ready: the model, its device, whether weights are real, library count."""
        try:
            model = await self._model_info()
            data = {
                "ready": True,
                "model": model["model"],
                "pretrained": not model["random_weights"],
                "weights": model["pretrained"],
                "device": model["device"],
                "dim": model["dim"],
                "libraries": len(self.catalog.names()),
            }
            if model["random_weights"]:
                data["warning"] = "RANDOM WEIGHTS: embeddings are not meaningful (offline demo/test model)"
            return envelope(data)
        except Exception as exc:
            return error_response(exc)

    # -- libraries -------------------------------------------------------------------------------

    @api.post(PREFIX + "/library/create", tags=["libraries"])
    async def create_library(self, body: CreateLibrary) -> JSONResponse:
        try:
            if body.library_name in RESERVED_LIBRARY_NAMES:
                raise InvalidParameter(f"library_name {body.library_name!r} is reserved")
            model = await self._model_info()
            data = await self.writer.create_library.remote(
                body.library_name, body.mode, body.description, model
            )
            return envelope(data)
        except Exception as exc:
            return error_response(exc)

    @api.get(PREFIX + "/library/list", tags=["libraries"])
    async def list_libraries(self) -> JSONResponse:
        try:
            infos = await asyncio.to_thread(self.catalog.list)
            described = await asyncio.to_thread(lambda: [self.catalog.describe(i) for i in infos])
            return envelope({"libraries": described})
        except Exception as exc:
            return error_response(exc)

    @api.get(PREFIX + "/library/{library_name}", tags=["libraries"])
    async def get_library(self, library_name: str) -> JSONResponse:
        try:
            info = await self._library(library_name, check_model=False)
            return envelope(await asyncio.to_thread(self.catalog.describe, info))
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/library/delete", tags=["libraries"])
    async def delete_library(self, body: DeleteLibrary) -> JSONResponse:
        try:
            await self._library(body.library_name, check_model=False)
            await self.writer.delete_library.remote(body.library_name)
            return envelope({"library_name": body.library_name})
        except Exception as exc:
            return error_response(exc)

    # -- images ----------------------------------------------------------------------------------

    @api.post(PREFIX + "/image/add", tags=["images"])
    async def add_image(self, body: AddImage) -> JSONResponse:
        try:
            tags = self._tags(body.tags)
            # The request is checked whole (400) before the library is looked up (404); an uploaded image
            # is decoded here, a URI is only fetched once the library is known to exist.
            uploaded = None
            if body.image_base64 is not None:
                uploaded = await self._decode_upload(self._decode_base64(body.image_base64), "image_base64")
            info = await self._library(body.library_name)
            if uploaded is None:
                data = await self._fetch(body.image_uri)
                uploaded = await self._decode_upload(data, "image_uri")
            data, pixels = uploaded
            vector = await self.encoder.embed_image.remote(pixels)
            record = NewRecord(
                image_id=body.image_id,
                image_uri=body.image_uri,
                vector=vector,
                tags=tags,
                vector_kind="whole",
                frame=data if body.save_image else None,
            )
            created = await self.writer.add_images.remote(info.name, info.uid, [record])
            return envelope({"image_id": body.image_id, "image_uri": body.image_uri, "created": created[0]})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/image/get", tags=["images"])
    async def get_image(self, body: GetImage) -> JSONResponse:
        try:
            info = await self._library(body.library_name, check_model=False)
            images = await self._index(info).get_images.remote(
                body.image_id, body.image_uri, body.return_frame
            )
            if not images:
                raise ImageNotFound(info.name, body.image_id, body.image_uri)
            return envelope({"images": images})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/image/update_tags", tags=["images"])
    async def update_tags(self, body: UpdateTags) -> JSONResponse:
        try:
            tags = self._tags(body.tags)
            info = await self._library(body.library_name, check_model=False)
            n = await self.writer.update_tags.remote(info.name, info.uid, body.image_id, body.image_uri, tags)
            if n == 0:
                raise ImageNotFound(info.name, body.image_id, body.image_uri)
            return envelope({"updated": n})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/image/delete", tags=["images"])
    async def delete_image(self, body: DeleteImage) -> JSONResponse:
        try:
            info = await self._library(body.library_name, check_model=False)
            n = await self.writer.delete_images.remote(info.name, info.uid, body.image_id, body.image_uri)
            return envelope({"deleted": n})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/image/tasks/create", tags=["images"])
    async def create_task(self, body: CreateTask) -> JSONResponse:
        """Start a bulk import of a JSONL source; answers ``{"task_id"}`` at once."""
        try:
            try:
                self.fetch_policy.check_source(body.source)  # 400 before the library lookup (404)
            except FetchError as exc:
                raise InvalidParameter(f"source: {exc}") from None
            info = await self._library(body.library_name)
            task_id = await self.importer.create_task.remote(
                info.name, info.uid, body.source, body.save_image
            )
            return envelope({"task_id": task_id})
        except Exception as exc:
            return error_response(exc)

    @api.get(PREFIX + "/image/tasks/results/{task_id}", tags=["images"])
    async def task_results(self, task_id: str) -> JSONResponse:
        """State, counters and per-line errors of an import task."""
        try:
            if not TASK_ID_RE.fullmatch(task_id):
                raise TaskNotFound(task_id[:80])
            return envelope(await self.importer.get_task.remote(task_id))
        except Exception as exc:
            return error_response(exc)

    # -- search ----------------------------------------------------------------------------------

    @api.post(PREFIX + "/search/by-image", tags=["search"])
    async def search_by_image(self, body: SearchByImage) -> JSONResponse:
        try:
            node = self._search_params(body)
            _, pixels = await self._decode_upload(self._decode_base64(body.image_base64), "image_base64")
            info = await self._library(body.library_name)
            vector = await self.encoder.embed_image.remote(pixels)
            answer = await self._index(info).search.remote(
                vector, query_kind="image", vector_kind="whole", **self._search_kwargs(body, node)
            )
            return envelope({"results": answer["results"]})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/search/by-text", tags=["search"])
    async def search_by_text(self, body: SearchByText) -> JSONResponse:
        try:
            node = self._search_params(body)
            if len(body.query_text) > self.limits.max_text_chars:
                raise InvalidParameter(f"query_text: longer than {self.limits.max_text_chars} characters")
            if not body.query_text.strip():
                raise InvalidParameter("query_text: must contain a non-whitespace character")
            info = await self._library(body.library_name)
            if info.mode != "general_search":
                raise ModeNotSupported(
                    f"Image library {info.name!r} is in {info.mode} mode and does not support "
                    "text-to-image search."
                )
            vector = await self.encoder.embed_text.remote(body.query_text)
            answer = await self._index(info).search.remote(
                vector, query_kind="text", vector_kind="whole", **self._search_kwargs(body, node)
            )
            return envelope({"results": answer["results"]})
        except Exception as exc:
            return error_response(exc)

    @api.post(PREFIX + "/search/by-id", tags=["search"])
    async def search_by_id(self, body: SearchById) -> JSONResponse:
        try:
            node = self._search_params(body)
            info = await self._library(body.library_name)
            answer = await self._index(info).search_by_id.remote(
                body.image_id, body.image_uri, query_kind="image", **self._search_kwargs(body, node)
            )
            return envelope({"results": answer["results"]})
        except Exception as exc:
            return error_response(exc)

    # -- helpers ---------------------------------------------------------------------------------

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:
            self._model = await self.encoder.info.remote()
        return self._model

    async def _library(self, name: str, *, check_model: bool = True) -> LibraryInfo:
        """The library's descriptor (404 when absent); 409 when it was built with another model."""
        info = self.catalog.get(name)
        if check_model:
            model = await self._model_info()
            if info.model_identity != model["identity"]:
                raise ModelMismatch(name, info.model_identity, model["identity"])
        return info

    def _index(self, info: LibraryInfo) -> DeploymentHandle:
        return self.index.options(multiplexed_model_id=info.key)

    def _tags(self, raw: Any) -> dict[str, Any]:
        try:
            return validate_tags(raw, limits=self.limits.tag_limits())
        except TagError as exc:
            raise InvalidParameter(str(exc)) from None

    def _search_params(self, body: SearchCommon) -> object:
        if body.top_k > self.limits.max_top_k:
            raise InvalidParameter(f"top_k: must be between 1 and {self.limits.max_top_k}")
        try:
            return parse_filter(body.tag_filter, limits=self.limits.filter_limits())
        except FilterError as exc:
            raise InvalidParameter(str(exc)) from None

    @staticmethod
    def _search_kwargs(body: SearchCommon, node: object) -> dict[str, Any]:
        return {
            "top_k": body.top_k,
            "node": node,
            "min_score": body.min_score,
            "return_frame": body.return_frame,
        }

    def _decode_base64(self, text: str) -> bytes:
        try:
            return decode_base64(text, max_bytes=self.limits.max_image_bytes)
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"image_base64: {exc}") from None
        except ValueError as exc:
            raise InvalidParameter(f"image_base64: {exc}") from None

    async def _fetch(self, image_uri: str) -> bytes:
        try:
            return await asyncio.to_thread(
                self.fetch_policy.fetch_image, image_uri, max_bytes=self.limits.max_image_bytes
            )
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"image_uri: {exc}") from None
        except FetchError as exc:
            raise InvalidParameter(
                f"image_uri: {exc}; send image_base64 to upload the image instead"
            ) from None

    def _prepare(self, data: bytes, field: str) -> np.ndarray:
        """Decode and resize (runs in a worker thread)."""
        try:
            img = decode_image(data, self.limits.image_limits(), min_side_hint=max(self.preprocess.size))
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"{field}: {exc}") from None
        except ImageDecodeError as exc:
            raise InvalidParameter(f"{field}: {exc}") from None
        return prepare_for_model(img, self.preprocess)

    async def _decode_upload(self, data: bytes, field: str) -> tuple[bytes, np.ndarray]:
        """The original bytes and the model-sized uint8 pixels (decoded off the event loop)."""
        return data, await asyncio.to_thread(self._prepare, data, field)
