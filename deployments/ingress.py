"""Ingress deployment: the REST routes of ``../shared/spec/API.md`` on FastAPI.

It validates (pydantic at the edge, ``filters`` for tags and tag_filter), decodes uploads and runs the
library mode's detection and cropping (``index.detect.modes.ModePipeline``) in worker threads (CPUs are here;
the encoder only receives compact uint8 arrays), and forwards to the Encoder, the LibraryIndex (reads)
and the Writer (mutations).

No ``from __future__ import annotations`` here: FastAPI must see the real request-model types on the
route signatures that Serve's class-based view rewrites.
"""

import asyncio
import contextlib
import functools
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs, EncodeBatching
from deployments.http import (
    ApiKeyAuth,
    BodyLimit,
    ConcurrencyLimit,
    RequestLog,
    RequestRecorder,
    UnhandledErrors,
    envelope,
    install_error_handlers,
)
from deployments.readiness import DeploymentStates, GuardedHandle, controller_details
from deployments.schemas import (
    AddImage,
    CancelTask,
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
from index.detect.modes import Embedded, ModePipeline
from index.errors import (
    ImageNotFound,
    InvalidParameter,
    LibraryNotFound,
    ModeNotSupported,
    PayloadTooLarge,
    TaskNotFound,
    Unavailable,
)
from index.ingest.fetch import ConnectionPools, FetchError, FetchRefused, check_source, check_uri, fetch_bytes
from index.model.imaging import ImageDecodeError, ImageTooLarge, decode_base64, decode_image
from index.model.spec import PreprocessSpec
from index.search.sharding import shard_of
from index.shards import gather_shards, merge_results
from index.storage.backends import open_storage
from index.storage.embedded.catalog import LibraryInfo, check_served_model
from index.storage.embedded.store import NewRecord

logger = logging.getLogger("ray.serve")

PREFIX = "/api/v1/operators/image-search"
#: ``GET /library/list`` would shadow a library of this name.
RESERVED_LIBRARY_NAMES = frozenset({"list"})
#: Task ids are 32 hex digits (uuid4); anything else cannot name a task.
TASK_ID_RE = re.compile(r"[0-9a-f]{32}")
#: Encoder calls one Ingress replica may have in flight per kind; items beyond wait here, in bigger batches.
ENCODE_CALLS_IN_FLIGHT = 16
RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: embeddings are not meaningful (offline demo/test model)"
_ENCODE_BATCH: dict[str, Any] = EncodeBatching().model_dump() | {
    "max_concurrent_batches": ENCODE_CALLS_IN_FLIGHT
}


async def note_library(request: Request) -> None:
    """Put the request's ``library_name`` (path or JSON body) where the request log finds it.

    A dependency of every route: it runs after FastAPI has parsed the body (``request.json()`` returns
    that cached parse) and before the body is validated, so invalid requests are attributed too.
    """
    name = request.path_params.get("library_name")
    if name is None and request.method == "POST":
        try:
            body = await request.json()
        except Exception:  # not JSON: FastAPI answers 400 for it; there is no name to log
            body = None
        name = body.get("library_name") if isinstance(body, dict) else None
    if isinstance(name, str):
        request.state.library_name = name


async def read_deployment_states(request: Request) -> None:
    """Bring the replica's view of the deployments up to date (in the background once it has one), so
    that a call to a deployment with no running replica is refused at once (`GuardedHandle`)."""
    await request.app.state.deployment_states.current()


api = FastAPI(
    title="Image Search API",
    version="1.0",
    description="Search image libraries by image or by text, with tag filters. "
    "Every response is the envelope {status, message, data}.",
    dependencies=[Depends(note_library), Depends(read_deployment_states)],
)
install_error_handlers(api)
#: The web page's files (plain HTML/JS/CSS, no build step), installed as package data.
STATIC_DIR = Path(__file__).parent / "static"
# Mounted at /static (not /): a catch-all mount would shadow the API routes Serve appends after it.
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
# add_middleware puts each new one outside the previous: RequestLog runs first and sees every answer;
# ApiKeyAuth refuses a caller before any body is read or any concurrency slot is taken; UnhandledErrors,
# innermost, answers what no exception handler took.
api.add_middleware(UnhandledErrors)
api.add_middleware(BodyLimit)
api.add_middleware(ConcurrencyLimit)
api.add_middleware(ApiKeyAuth)
api.add_middleware(RequestLog)


# max_ongoing_requests sits above limits.max_concurrent_requests (64 by default): the ingress sheds load
# itself with the envelope before Serve's proxy would queue (or answer its own plain-text 503).
# graceful_shutdown_timeout_s: a replica being replaced (rolling update, downscale) finishes the requests
# it holds; one may wait limits.unavailable_wait_s for another deployment's replica, twice (by-id on a
# sharded library), so Serve's default 20 s would kill it mid-request (a plain-text 500 from the proxy).
@serve.deployment(
    ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=80, graceful_shutdown_timeout_s=60
)
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
        face_preprocess: PreprocessSpec | None = None,
        dedicated: list[tuple[str, int, DeploymentHandle]] | None = None,
    ) -> None:
        # Every call to another deployment is refused with 503 UNAVAILABLE while it has no running
        # replica, instead of waiting for one until the proxy times out.
        self.states = DeploymentStates(serve.get_replica_context().app_name, controller_details)
        # Every call to another deployment waits at most limits.unavailable_wait_s for a running replica,
        # then is refused with 503 UNAVAILABLE. Reads and encoding are idempotent: a call whose replica
        # died (its node was lost) is sent again; writes are not (the first may have committed).
        wait_s = args.limits.unavailable_wait_s
        self.encoder, self.index = (
            GuardedHandle(h, h.deployment_name, self.states, wait_s=wait_s, retries=2)
            for h in (encoder, index)
        )
        self.writer, self.importer = (
            GuardedHandle(h, h.deployment_name, self.states, wait_s=wait_s) for h in (writer, importer)
        )
        # Shards with LibraryIndex deployments of their own (AppArgs.dedicated_shards); every other shard
        # goes to the shared, multiplexed LibraryIndex.
        self.dedicated = {
            (library, shard): GuardedHandle(h, h.deployment_name, self.states, wait_s=wait_s, retries=2)
            for library, shard, h in dedicated or ()
        }
        self.args = args
        self.fetch_policy = args.fetch_policy()
        # image_uri fetches wait on the network: their own threads (one per request the replica may hold,
        # so a slow image store never queues the decoding and detection work of asyncio's default pool),
        # and keep-alive connections shared across requests.
        self._fetch_threads = ThreadPoolExecutor(
            args.limits.max_concurrent_requests, thread_name_prefix="ingress-fetch"
        )
        self._connections = ConnectionPools(per_host=args.limits.max_concurrent_requests)
        self.limits = args.limits
        self.image_limits = args.image_limits()
        # Embedded: files under storage_root; cluster mode: a connection pool to PostgreSQL. Each request
        # reads the catalog once (``_lookup``): in cluster mode that is a database round trip.
        self.storage = open_storage(args.storage_settings(), max_libraries=args.limits.max_libraries)
        self._storage_described = self.storage.settings.describe()  # for /health, without credentials
        self.catalog = self.storage.catalog
        # Detection and cropping are CPU work: they run here, in worker threads, next to decoding.
        self.pipeline = ModePipeline(preprocess, args.detection_config(), face_preprocess=face_preprocess)
        # Serve's batch queues are configured per replica from the builder's args.
        batched: tuple[Any, ...] = (self._encode_images, self._encode_faces, self._encode_texts)
        for method in batched:
            method.set_max_batch_size(args.encode_batching.max_batch_size)
            method.set_batch_wait_timeout_s(args.encode_batching.batch_wait_timeout_s)
        self._model: dict[str, Any] | None = None
        self._prompt_vectors: np.ndarray | None = None
        # Read per request by the middlewares (they are installed when the module is imported).
        api.state.max_body_bytes = args.limits.max_body_bytes
        api.state.max_concurrent_requests = args.limits.max_concurrent_requests
        api.state.api_keys = args.load_api_keys()
        api.state.request_recorder = RequestRecorder.for_replica()
        api.state.deployment_states = self.states

    # -- web page --------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The search page; it loads ``/static/*`` and calls the API with the key the user enters."""
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    # -- operations ------------------------------------------------------------------------------

    @api.get("/health", tags=["operations"])
    @api.get(PREFIX + "/health", tags=["operations"])
    async def health(self) -> JSONResponse:
        """200 when every deployment has a running replica, else 503 ``UNAVAILABLE`` with the same data:
        each deployment's state, and the model, its device, whether weights are real, library count."""
        ready, deployments, reasons = self.states.report()
        data: dict[str, Any] = {"ready": ready, "deployments": deployments}
        model = None  # the Encoder is down: reported under "deployments" (and no wait for it here)
        if self._model is not None or self.encoder.available():
            with contextlib.suppress(Unavailable):
                model = await self._model_info()
        if model is not None:
            data |= {
                "model": model["model"],
                "pretrained": not model["random_weights"],
                "weights": model["pretrained"],
                "device": model["device"],
                "dim": model["dim"],
                "detection": self.pipeline.describe() | {"face_model": model.get("face_identity")},
            }
            if model["random_weights"]:
                data["warning"] = RANDOM_WEIGHTS_WARNING
        data["storage"] = self._storage_described
        try:
            data["libraries"] = len(await asyncio.to_thread(self.catalog.names))
        except Unavailable as exc:  # cluster mode: the database is down
            ready = data["ready"] = False
            reasons.append(f"storage: {exc}")
        if not ready:
            return envelope(data, status=Unavailable.status, message="; ".join(reasons), http=503)
        return envelope(data)

    # -- libraries -------------------------------------------------------------------------------

    @api.post(PREFIX + "/library/create", tags=["libraries"])
    async def create_library(self, body: CreateLibrary) -> JSONResponse:
        if body.library_name in RESERVED_LIBRARY_NAMES:
            raise InvalidParameter(f"library_name {body.library_name!r} is reserved")
        model = await self._model_info()
        if body.shards > self.limits.max_shards:
            raise InvalidParameter(
                f"shards: must be between 1 and {self.limits.max_shards} (limits.max_shards)"
            )
        data = await self.writer.create_library.remote(
            body.library_name, body.mode, body.description, model, body.index_kind, body.shards
        )
        return envelope(data)

    @api.get(PREFIX + "/library/list", tags=["libraries"])
    async def list_libraries(self) -> JSONResponse:
        infos = await asyncio.to_thread(self.catalog.list)
        described = await asyncio.to_thread(
            lambda: [self.storage.describe(i, self.args.index) for i in infos]
        )
        return envelope({"libraries": described})

    @api.get(PREFIX + "/library/{library_name}", tags=["libraries"])
    async def get_library(self, library_name: str) -> JSONResponse:
        info = await self._library(library_name, check_model=False)
        return envelope(await asyncio.to_thread(self.storage.describe, info, self.args.index))

    @api.post(PREFIX + "/library/delete", tags=["libraries"])
    async def delete_library(self, body: DeleteLibrary) -> JSONResponse:
        await self._library(body.library_name, check_model=False)
        await self.writer.delete_library.remote(body.library_name)
        return envelope({"library_name": body.library_name})

    # -- images ----------------------------------------------------------------------------------

    @api.post(PREFIX + "/image/add", tags=["images"])
    async def add_image(self, body: AddImage) -> JSONResponse:
        tags = self._tags(body.tags)
        # The request is checked whole (400) before the library is looked up (404); an uploaded image
        # is decoded here, a URI is only fetched once the library is known to exist.
        uploaded = None
        found = await self._lookup(body.library_name)
        if body.image_base64 is not None:
            uploaded = await self._decode_upload(
                self._decode_base64(body.image_base64), "image_base64", found
            )
        else:
            try:
                check_uri(body.image_uri, policy=self.fetch_policy)  # a refusal needs no library (400 first)
            except FetchError as exc:
                raise self._fetch_refused(exc) from None
        info = await self._checked(found)
        if uploaded is None:
            fetched = await self._fetch(body.image_uri)
            uploaded = await self._decode_upload(fetched, "image_uri", info)
        data, image = uploaded
        embedded = await self._embed(image, info.mode, query=False)
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
        created = await self.writer.add_images.remote(info.name, info.uid, [record])
        return envelope({"image_id": body.image_id, "image_uri": body.image_uri, "created": created[0]})

    @api.post(PREFIX + "/image/get", tags=["images"])
    async def get_image(self, body: GetImage) -> JSONResponse:
        info = await self._library(body.library_name, check_model=False)
        index = self._index(info, shard_of(body.image_id, info.shards))
        images = await index.get_images.remote(body.image_id, body.image_uri, body.return_frame)
        if not images:
            raise ImageNotFound(info.name, body.image_id, body.image_uri)
        return envelope({"images": images})

    @api.post(PREFIX + "/image/update_tags", tags=["images"])
    async def update_tags(self, body: UpdateTags) -> JSONResponse:
        tags = self._tags(body.tags)
        info = await self._library(body.library_name, check_model=False)
        n = await self.writer.update_tags.remote(info.name, info.uid, body.image_id, body.image_uri, tags)
        if n == 0:
            raise ImageNotFound(info.name, body.image_id, body.image_uri)
        return envelope({"updated": n})

    @api.post(PREFIX + "/image/delete", tags=["images"])
    async def delete_image(self, body: DeleteImage) -> JSONResponse:
        info = await self._library(body.library_name, check_model=False)
        n = await self.writer.delete_images.remote(info.name, info.uid, body.image_id, body.image_uri)
        return envelope({"deleted": n})

    @api.post(PREFIX + "/image/tasks/create", tags=["images"])
    async def create_task(self, body: CreateTask) -> JSONResponse:
        """Start a bulk import of a JSONL source; answers ``{"task_id"}`` at once."""
        try:
            check_source(body.source, policy=self.fetch_policy)  # 400 before the library lookup (404)
        except FetchError as exc:
            raise InvalidParameter(f"source: {exc}") from None
        info = await self._library(body.library_name)
        task_id = await self.importer.create_task.remote(info.name, info.uid, body.source, body.save_image)
        return envelope({"task_id": task_id})

    @api.get(PREFIX + "/image/tasks/results/{task_id}", tags=["images"])
    async def task_results(self, task_id: str) -> JSONResponse:
        """State, counters and per-line errors of an import task."""
        if not TASK_ID_RE.fullmatch(task_id):
            raise TaskNotFound(task_id[:80])
        return envelope(await self.importer.get_task.remote(task_id))

    @api.post(PREFIX + "/image/tasks/cancel", tags=["images"])
    async def cancel_task(self, body: CancelTask) -> JSONResponse:
        """Cancel a pending or running import task; a finished one is answered unchanged."""
        if not TASK_ID_RE.fullmatch(body.task_id):
            raise TaskNotFound(body.task_id[:80])
        return envelope(await self.importer.cancel_task.remote(body.task_id))

    # -- search ----------------------------------------------------------------------------------

    @api.post(PREFIX + "/search/by-image", tags=["search"])
    async def search_by_image(self, body: SearchByImage) -> JSONResponse:
        node = self._search_params(body)
        raw = self._decode_base64(body.image_base64)
        found = await self._lookup(body.library_name)
        _, image = await self._decode_upload(raw, "image_base64", found)
        info = await self._checked(found)
        embedded = await self._embed(image, info.mode, query=True)
        results: list[Any] = []
        if embedded.vector is not None:  # None: an item_search query in which no item was found
            results = await self._search(
                info,
                embedded.vector,
                query_kind="image",
                vector_kind=embedded.vector_kind,
                **self._search_kwargs(body, node),
            )
        data: dict[str, Any] = {"results": results}
        if info.mode != "general_search":  # documented extension: what the query was embedded as
            data["query_kind"] = embedded.vector_kind
            data["query_box"] = embedded.box
        return envelope(data)

    @api.post(PREFIX + "/search/by-text", tags=["search"])
    async def search_by_text(self, body: SearchByText) -> JSONResponse:
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
        vector = await self._encode_texts(body.query_text)
        results = await self._search(
            info, vector, query_kind="text", vector_kind="whole", **self._search_kwargs(body, node)
        )
        return envelope({"results": results})

    @api.post(PREFIX + "/search/by-id", tags=["search"])
    async def search_by_id(self, body: SearchById) -> JSONResponse:
        node = self._search_params(body)
        info = await self._library(body.library_name)
        kwargs = self._search_kwargs(body, node)
        if info.shards == 1:  # one call: the replica reads the vector and searches with it
            answer = await self._index(info).search_by_id.remote(
                body.image_id, body.image_uri, query_kind="image", **kwargs
            )
            return envelope({"results": merge_results([answer["results"]], kwargs["top_k"])})
        # The vector from the id's shard, then every shard searches with it.
        vector, vector_kind = await self._index(
            info, shard_of(body.image_id, info.shards)
        ).stored_vector.remote(body.image_id, body.image_uri)
        results = await self._search(info, vector, query_kind="image", vector_kind=vector_kind, **kwargs)
        return envelope({"results": results})

    # -- helpers ---------------------------------------------------------------------------------

    async def _model_info(self) -> dict[str, Any]:
        if self._model is None:
            self._model = await self.encoder.info.remote()
        return self._model

    async def _lookup(self, name: str) -> LibraryInfo | LibraryNotFound | InvalidParameter:
        """The library's descriptor, or the error that says why there is none (raised by ``_checked``
        once the rest of the request was checked): the one catalog read of a request."""
        try:
            return await asyncio.to_thread(self.catalog.get, name)
        except (LibraryNotFound, InvalidParameter) as exc:
            return exc

    async def _checked(
        self, found: LibraryInfo | LibraryNotFound | InvalidParameter, *, check_model: bool = True
    ) -> LibraryInfo:
        """``found`` itself (404 or 400 when it is an error); 409 when it was built with another model."""
        if isinstance(found, Exception):
            raise found
        if check_model:
            check_served_model(found, await self._model_info())
        return found

    async def _library(self, name: str, *, check_model: bool = True) -> LibraryInfo:
        """The library's descriptor (404 when absent); 409 when it was built with another model."""
        return await self._checked(await self._lookup(name), check_model=check_model)

    def _index(self, info: LibraryInfo, shard: int = 0) -> GuardedHandle:
        handle = self.dedicated.get((info.name, shard), self.index)
        return handle.options(multiplexed_model_id=info.shard_key(shard))

    async def _search(self, info: LibraryInfo, vector: np.ndarray, **kwargs: Any) -> list[dict[str, Any]]:
        """Search every shard of the library with the same arguments, concurrently, and merge their
        answers by cosine (``index.shards``). A 1-shard library is one call, as before shards existed;
        a shard that cannot answer fails a sharded library's request with 503 ``UNAVAILABLE``."""
        if info.shards == 1:
            answers = [(await self._index(info).search.remote(vector, **kwargs))["results"]]
        else:
            calls = [self._index(info, k).search.remote(vector, **kwargs) for k in range(info.shards)]
            answers = [a["results"] for a in await gather_shards(calls, library=info.name)]
        return merge_results(answers, kwargs["top_k"])

    def _tags(self, raw: Any) -> dict[str, Any]:
        try:
            return validate_tags(raw, limits=self.limits.tag_limits())
        except TagError as exc:
            raise InvalidParameter(str(exc)) from None

    def _top_k(self, body: SearchCommon) -> int:
        # An omitted top_k takes the contract's default (10), lowered to a smaller configured maximum:
        # a client that sent nothing must not be told its top_k is out of range.
        if "top_k" not in body.model_fields_set:
            return min(body.top_k, self.limits.max_top_k)
        return body.top_k

    def _search_params(self, body: SearchCommon) -> object:
        if self._top_k(body) > self.limits.max_top_k:
            raise InvalidParameter(f"top_k: must be between 1 and {self.limits.max_top_k}")
        try:
            return parse_filter(body.tag_filter, limits=self.limits.filter_limits())
        except FilterError as exc:
            raise InvalidParameter(str(exc)) from None

    def _search_kwargs(self, body: SearchCommon, node: object) -> dict[str, Any]:
        return {
            "top_k": self._top_k(body),
            "node": node,
            "min_score": body.min_score,
            "return_frame": body.return_frame,
            "recall_target": body.recall_target,
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
            return await asyncio.get_running_loop().run_in_executor(
                self._fetch_threads,
                functools.partial(
                    fetch_bytes,
                    image_uri,
                    policy=self.fetch_policy,
                    max_bytes=self.limits.max_image_bytes,
                    timeout_s=self.limits.fetch_timeout_s,
                    pools=self._connections,
                ),
            )
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"image_uri: {exc}") from None
        except FetchError as exc:
            raise self._fetch_refused(exc) from None

    @staticmethod
    def _fetch_refused(exc: FetchError) -> InvalidParameter:
        if isinstance(exc, FetchRefused):
            logger.info("refused to fetch image_uri: %s (%s)", exc.reason, exc.address or "-")
        return InvalidParameter(f"image_uri: {exc}; send image_base64 to upload the image instead")

    def _decode(self, data: bytes, field: str, side_hint: int) -> Image.Image:
        """Decode (runs in a worker thread)."""
        try:
            return decode_image(data, self.image_limits, min_side_hint=side_hint)
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"{field}: {exc}") from None
        except ImageDecodeError as exc:
            raise InvalidParameter(f"{field}: {exc}") from None

    async def _decode_upload(
        self, data: bytes, field: str, library: LibraryInfo | Exception
    ) -> tuple[bytes, Image.Image]:
        """The original bytes and the decoded image (decoded off the event loop).

        The library's mode, when it exists, sets the decoding resolution (detection modes crop, so they
        need more pixels); a missing library is reported by the caller after the image was checked."""
        mode = library.mode if isinstance(library, LibraryInfo) else "general_search"
        hint = self.pipeline.decode_side_hint(mode)
        return data, await asyncio.to_thread(self._decode, data, field, hint)

    async def _embed(self, image: Image.Image, mode: str, *, query: bool) -> Embedded:
        """Detect and crop for the library's mode (worker thread), then encode the crops (Encoder)."""
        plan = await asyncio.to_thread(self.pipeline.plan, image, mode, query=query)
        # Several crops (clip-regions candidates) go out at once and share an Encoder call with other
        # requests' items. Face crops go to the face path: the face-embedding model when one is
        # configured, else CLIP.
        encode = self._encode_faces if plan.vector_kind == "face" else self._encode_images
        vectors = list(await asyncio.gather(*(encode(c) for c in plan.crops)))
        prompts = await self._prompts() if plan.candidates else None
        return self.pipeline.finish(plan, vectors, prompts, query=query)

    # One Encoder call per batch of concurrent requests' items (AppArgs.encode_batching sets size and wait
    # per replica, in __init__). Many batches may be in flight: the Encoder merges them into its passes.
    @serve.batch(**_ENCODE_BATCH)
    async def _encode_images(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return list(await self.encoder.embed_image_batch.remote(np.stack(crops)))

    @serve.batch(**_ENCODE_BATCH)
    async def _encode_faces(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return list(await self.encoder.embed_face_batch.remote(np.stack(crops)))

    @serve.batch(**_ENCODE_BATCH)
    async def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(await self.encoder.embed_text_batch.remote(texts))

    async def _prompts(self) -> np.ndarray:
        """Unit vectors of the clip-regions prompts (computed once per replica)."""
        if self._prompt_vectors is None:
            texts = self.pipeline.prompts
            vectors = await asyncio.gather(*(self._encode_texts(t) for t in texts))
            self._prompt_vectors = np.stack(vectors)
        return self._prompt_vectors
