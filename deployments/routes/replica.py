"""What the routes use of an Ingress replica: its handles, pools, limits and storage, and the request
steps several resources share (the one catalog read, decoding, fetching, detection and encoding).

The ``Ingress`` deployment (``deployments/ingress.py``) is a ``Replica``: it builds the handles and puts
itself on ``app.state.replica`` in its constructor; every route takes it through :data:`ReplicaDep`.

No ``from __future__ import annotations`` here: FastAPI reads :data:`ReplicaDep` from route signatures.
"""

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request
from PIL import Image
from ray import serve

from deployments.config import AppArgs, EncodeBatching
from deployments.readiness import DeploymentStates, GuardedHandle
from deployments.searchers import IndexHandles
from index.detect.modes import Embedded, ModePipeline
from index.errors import InvalidParameter, LibraryNotFound, PayloadTooLarge
from index.ingest.fetch import ConnectionPools, FetchError, FetchRefused, fetch_bytes
from index.model.imaging import ImageDecodeError, ImageTooLarge, decode_base64, decode_image
from index.model.spec import PreprocessSpec
from index.storage.backends import open_storage
from index.storage.embedded.catalog import LibraryInfo, check_served_model

logger = logging.getLogger("ray.serve")

#: The path prefix of every API route (the page and ``/health`` also answer at the root).
PREFIX = "/api/v1/operators/image-search"
#: Encoder calls one Ingress replica may have in flight per kind; items beyond wait here, in bigger batches.
ENCODE_CALLS_IN_FLIGHT = 16
_ENCODE_BATCH: dict[str, Any] = EncodeBatching().model_dump() | {
    "max_concurrent_batches": ENCODE_CALLS_IN_FLIGHT
}


class Replica:
    """One Ingress replica's state, and the steps its routes share.

    Args:
        encoder, writer, importer: guarded handles of those deployments.
        index: the LibraryIndex deployments (shared and dedicated).
        states: the replica's view of the application's deployments.
        args: the builder's args.
        preprocess, face_preprocess: how the models want their crops.
    """

    def __init__(
        self,
        *,
        encoder: GuardedHandle,
        index: IndexHandles,
        writer: GuardedHandle,
        importer: GuardedHandle,
        states: DeploymentStates,
        args: AppArgs,
        preprocess: PreprocessSpec,
        face_preprocess: PreprocessSpec | None = None,
    ) -> None:
        self.encoder, self.index, self.writer, self.importer = encoder, index, writer, importer
        self.states = states
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
        # reads the catalog once (``lookup``): in cluster mode that is a database round trip.
        self.storage = open_storage(args.storage_settings(), max_libraries=args.limits.max_libraries)
        self.storage_described = self.storage.settings.describe()  # for /health, without credentials
        self.catalog = self.storage.catalog
        # Detection and cropping are CPU work: they run here, in worker threads, next to decoding.
        self.pipeline = ModePipeline(preprocess, args.detection_config(), face_preprocess=face_preprocess)
        # Serve's batch queues are configured per replica from the builder's args.
        batched: tuple[Any, ...] = (self._encode_images, self._encode_faces, self.encode_text)
        for method in batched:
            method.set_max_batch_size(args.encode_batching.max_batch_size)
            method.set_batch_wait_timeout_s(args.encode_batching.batch_wait_timeout_s)
        self.model: dict[str, Any] | None = None
        self._prompt_vectors: np.ndarray | None = None

    # -- the library -----------------------------------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        """The Encoder's model (asked once per replica)."""
        if self.model is None:
            self.model = await self.encoder.info.remote()
        return self.model

    async def lookup(self, name: str) -> LibraryInfo | LibraryNotFound | InvalidParameter:
        """The library's descriptor, or the error that says why there is none (raised by ``checked``
        once the rest of the request was checked): the one catalog read of a request."""
        try:
            return await asyncio.to_thread(self.catalog.get, name)
        except (LibraryNotFound, InvalidParameter) as exc:
            return exc

    async def checked(
        self, found: LibraryInfo | LibraryNotFound | InvalidParameter, *, check_model: bool = True
    ) -> LibraryInfo:
        """``found`` itself (404 or 400 when it is an error); 409 when it was built with another model."""
        if isinstance(found, Exception):
            raise found
        if check_model:
            check_served_model(found, await self.model_info())
        return found

    async def library(self, name: str, *, check_model: bool = True) -> LibraryInfo:
        """The library's descriptor (404 when absent); 409 when it was built with another model."""
        return await self.checked(await self.lookup(name), check_model=check_model)

    # -- images in -------------------------------------------------------------------------------

    def decode_base64(self, text: str) -> bytes:
        """The bytes of an ``image_base64`` field (413 over ``limits.max_image_bytes``, else 400)."""
        try:
            return decode_base64(text, max_bytes=self.limits.max_image_bytes)
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"image_base64: {exc}") from None
        except ValueError as exc:
            raise InvalidParameter(f"image_base64: {exc}") from None

    async def fetch(self, image_uri: str) -> bytes:
        """The bytes at ``image_uri``, fetched under the deployment's policy (in the fetch threads)."""
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
            raise fetch_refused(exc) from None

    def _decode(self, data: bytes, field: str, side_hint: int) -> Image.Image:
        """Decode (runs in a worker thread)."""
        try:
            return decode_image(data, self.image_limits, min_side_hint=side_hint)
        except ImageTooLarge as exc:
            raise PayloadTooLarge(f"{field}: {exc}") from None
        except ImageDecodeError as exc:
            raise InvalidParameter(f"{field}: {exc}") from None

    async def decode_upload(
        self, data: bytes, field: str, library: LibraryInfo | Exception
    ) -> tuple[bytes, Image.Image]:
        """The original bytes and the decoded image (decoded off the event loop).

        The library's mode, when it exists, sets the decoding resolution (detection modes crop, so they
        need more pixels); a missing library is reported by the caller after the image was checked."""
        mode = library.mode if isinstance(library, LibraryInfo) else "general_search"
        hint = self.pipeline.decode_side_hint(mode)
        return data, await asyncio.to_thread(self._decode, data, field, hint)

    # -- embedding -------------------------------------------------------------------------------

    async def embed(self, image: Image.Image, mode: str, *, query: bool) -> Embedded:
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
    async def encode_text(self, texts: list[str]) -> list[np.ndarray]:
        """A text's unit vector (called with one text; batched with other requests' texts)."""
        return list(await self.encoder.embed_text_batch.remote(texts))

    async def _prompts(self) -> np.ndarray:
        """Unit vectors of the clip-regions prompts (computed once per replica)."""
        if self._prompt_vectors is None:
            texts = self.pipeline.prompts
            vectors = await asyncio.gather(*(self.encode_text(t) for t in texts))
            self._prompt_vectors = np.stack(vectors)
        return self._prompt_vectors


def fetch_refused(exc: FetchError) -> InvalidParameter:
    """The 400 for an ``image_uri`` that cannot be fetched (a refusal by the policy is logged)."""
    if isinstance(exc, FetchRefused):
        logger.info("refused to fetch image_uri: %s (%s)", exc.reason, exc.address or "-")
    return InvalidParameter(f"image_uri: {exc}; send image_base64 to upload the image instead")


def current_replica(request: Request) -> Replica:
    """The replica serving the request (``app.state.replica``, set by the Ingress constructor)."""
    replica: Replica = request.app.state.replica
    return replica


#: A route's parameter for the replica that serves it.
ReplicaDep = Annotated[Replica, Depends(current_replica)]
