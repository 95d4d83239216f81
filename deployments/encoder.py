"""Encoder deployment: the open_clip model behind ``@serve.batch``, one replica per GPU (or CPU slot).

Images arrive as compact ``uint8`` arrays already resized by the ingress; normalisation happens on the
device inside ``ClipEmbedder``. Images and texts batch separately (two batch queues). The forward pass
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
    def __init__(self, spec: ModelSpec) -> None:
        self.embedder = ClipEmbedder.load(spec)
        self.embedder.warmup()
        self.config = EncoderConfig()
        # On a CPU, torch already uses every core for one forward pass: two import batches at once
        # would only oversubscribe them. On a GPU, overlapping calls hide transfers, so no lock there.
        self._import_lock = asyncio.Lock() if self.embedder.info["device"] == "cpu" else None
        logger.info("encoder ready: %s", self.embedder.info)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Validation errors fail the deploy loudly instead of silently keeping old values.
        self.config = EncoderConfig.model_validate(user_config)
        for method in (self.embed_image, self.embed_text):
            method.set_max_batch_size(self.config.max_batch_size)  # type: ignore[attr-defined]
            method.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def embed_image(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Batch contract: a list of (H, W, 3) uint8 arrays in, a list of unit vectors out, same order."""
        vectors = await asyncio.to_thread(self.embedder.encode_images, np.stack(images))
        return list(vectors)

    async def embed_image_batch(self, images: np.ndarray) -> np.ndarray:
        """A batch the caller already formed, ``(B, H, W, 3)`` uint8 -> ``(B, dim)`` unit vectors.

        For bulk imports: one call per batch instead of one per image keeps the per-call overhead of the
        handle off the import's critical path. It bypasses the ``embed_image`` queue, so it never delays
        interactive requests behind a long import batch queue; both share the device.
        """
        if self._import_lock is None:
            return await asyncio.to_thread(self.embedder.encode_images, images)
        async with self._import_lock:
            return await asyncio.to_thread(self.embedder.encode_images, images)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:
        """Batch contract: a list of strings in, a list of unit vectors out, same order."""
        vectors = await asyncio.to_thread(self.embedder.encode_texts, texts)
        return list(vectors)

    def info(self) -> dict[str, Any]:
        return dict(self.embedder.info) | {"batch": self.config.model_dump()}

    def check_health(self) -> None:
        """Cheap on purpose: Serve calls it every few seconds."""
