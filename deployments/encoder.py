"""Encoder deployment: the open_clip model behind ``@serve.batch``, one replica per GPU (or CPU slot).

Images arrive as compact ``uint8`` arrays already resized by the ingress; normalisation happens on the
device inside ``ClipEmbedder``. Images, face crops and texts batch separately (three batch queues). Face
crops go to the optional face-embedding model (``face_model``: a second open_clip checkpoint, loaded the
same way as the main one), or to the main model when none is configured. The forward pass
runs in a worker thread so the event loop keeps accepting requests and forming the next batch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from index.embedder import ClipEmbedder, ModelSpec

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01


class EncoderConfig(BaseModel):
    """``user_config`` of the Encoder: changes apply to running replicas without a restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_TIMEOUT_S, ge=0.0, le=1.0)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,
    user_config=EncoderConfig().model_dump(),
)
class Encoder:
    def __init__(self, spec: ModelSpec, face_spec: ModelSpec | None = None) -> None:
        self.embedder = ClipEmbedder.load(spec)
        self.embedder.warmup()
        self.face = ClipEmbedder.load(face_spec) if face_spec is not None else None
        if self.face is not None:
            self.face.warmup()
        self.config = EncoderConfig()
        logger.info("encoder ready: %s; face model: %s", self.embedder.info, self.face and self.face.info)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Validation errors fail the deploy loudly instead of silently keeping old values.
        self.config = EncoderConfig.model_validate(user_config)
        for method in (self.embed_image, self.embed_face, self.embed_text):
            method.set_max_batch_size(self.config.max_batch_size)  # type: ignore[union-attr]
            method.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)  # type: ignore[union-attr]

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def embed_image(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Batch contract: a list of (H, W, 3) uint8 arrays in, a list of unit vectors out, same order."""
        vectors = await asyncio.to_thread(self.embedder.encode_images, np.stack(images))
        return list(vectors)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def embed_face(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Batch contract as ``embed_image``, for face crops (prepared for the face model, if any)."""
        embedder = self.face or self.embedder
        vectors = await asyncio.to_thread(embedder.encode_images, np.stack(images))
        return list(vectors)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        """Batch contract: a list of strings in, a list of unit vectors out, same order."""
        vectors = await asyncio.to_thread(self.embedder.encode_texts, texts)
        return list(vectors)

    def info(self) -> dict[str, Any]:
        face = self.face.info if self.face is not None else None
        return dict(self.embedder.info) | {
            "batch": self.config.model_dump(),
            "face_identity": face["identity"] if face else None,
            "face_info": face,
        }

    def check_health(self) -> None:
        """Cheap on purpose: Serve calls it every few seconds."""
