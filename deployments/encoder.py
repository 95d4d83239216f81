"""Encoder deployment: the open_clip model, one replica per GPU (or CPU slot).

Callers send batches they formed (``embed_image_batch``, ``embed_face_batch``, ``embed_text_batch``:
uint8 ``(B, H, W, 3)`` at the model size, or a list of texts) and get ``(B, dim)`` unit vectors. Every
batch goes through one :class:`~index.model.batching.MergingBatcher`, which merges the batches waiting
for the model into passes of up to ``max_batch_size`` and runs at most ``max_concurrent_batches`` at once
(``user_config``, changeable without a restart). Face crops go to the optional face model, else the main
one. Rationale: docs/ARCHITECTURE.md, "index.model.batching and the Encoder".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.metrics import Gauge, Histogram

from deployments.autoscaling import ONGOING_ITEMS_METRIC
from index.model.batching import MergingBatcher
from index.model.embedder import ClipEmbedder, describe_input, replica_device
from index.model.spec import ModelSpec

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_CONCURRENT_BATCHES = 1

KINDS = ("image", "face", "text")
BATCH_SIZE_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LATENCY_BUCKETS_MS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


class EncoderConfig(BaseModel):
    """``user_config`` of the Encoder: changes apply to running replicas without a restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024, description="items per forward pass")
    max_concurrent_batches: int = Field(
        DEFAULT_MAX_CONCURRENT_BATCHES,
        ge=1,
        le=8,
        description=(
            "forward passes running at once: 2 on a GPU (host work overlaps device work); on a CPU the"
            " passes share the replica's threads (num_cpus), so 1 or 2 there"
        ),
    )


class EncoderMetrics:
    """The Encoder's own Prometheus metrics (``ray.serve.metrics``; Serve adds deployment/replica tags).

    Created per replica in ``Encoder.__init__``, never at import. They describe the forward passes after
    merging and what a caller waits in total.
    """

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "image_search_encoder_batch_size",
            description="Items per forward pass (after merging the batches that waited for the model).",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("kind",),
        )
        self.forward_ms = Histogram(
            "image_search_encoder_forward_ms",
            description="Wall time of one forward pass, in milliseconds.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("kind",),
        )
        self.request_ms = Histogram(
            "image_search_encoder_request_ms",
            description="Encode latency seen by a caller: batch wait + queue for the model + forward pass.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("kind",),
        )
        self.ongoing_gauge = Gauge(
            "image_search_encoder_ongoing_items",
            description="Items (images, crops, texts) in this replica, waiting or being encoded.",
            tag_keys=("kind",),
        )
        self.queue_gauge = Gauge(
            "image_search_encoder_queue_depth",
            description="Items in this replica not yet in a forward pass.",
            tag_keys=("kind",),
        )
        self.ongoing = dict.fromkeys(KINDS, 0)
        self.running = dict.fromkeys(KINDS, 0)
        self.calls = dict.fromkeys(KINDS, 0)

    @contextmanager
    def request(self, kind: str, items: int = 1) -> Iterator[None]:
        """Count one call of ``kind`` carrying ``items`` items from arrival to answer; observe its latency."""
        start = time.perf_counter()
        self.ongoing[kind] += items
        self.calls[kind] += 1
        self._set_gauges(kind)
        try:
            yield
        finally:
            self.ongoing[kind] -= items
            self.request_ms.observe((time.perf_counter() - start) * 1000, tags={"kind": kind})
            self._set_gauges(kind)

    def ongoing_items(self) -> int:
        """Items of every kind in this replica, waiting or being encoded (the autoscaling signal)."""
        return sum(self.ongoing.values())

    def batch_started(self, kind: str, size: int) -> None:
        """A forward pass of ``size`` items begins (MergingBatcher observer)."""
        self.running[kind] += size
        self.batch_size.observe(size, tags={"kind": kind})
        self._set_gauges(kind)

    def batch_finished(self, kind: str, size: int, seconds: float) -> None:
        """A forward pass of ``size`` items ended after ``seconds`` (MergingBatcher observer)."""
        self.running[kind] -= size
        self.forward_ms.observe(seconds * 1000, tags={"kind": kind})
        self._set_gauges(kind)

    def queue_depth(self, kind: str) -> int:
        """Items of ``kind`` in this replica that are not in a forward pass yet."""
        return max(self.ongoing[kind] - self.running[kind], 0)

    def _set_gauges(self, kind: str) -> None:
        self.ongoing_gauge.set(self.ongoing[kind], tags={"kind": kind})
        self.queue_gauge.set(self.queue_depth(kind), tags={"kind": kind})


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,
    user_config=EncoderConfig().model_dump(),
)
class Encoder:
    def __init__(self, spec: ModelSpec, face_spec: ModelSpec | None = None) -> None:
        device = replica_device(spec.device, _assigned_gpus(), torch.cuda.is_available())
        if device != spec.device:
            logger.warning("this replica has no GPU assigned: encoding on the CPU (device=%r)", device)
            spec = replace(spec, device=device)
            face_spec = replace(face_spec, device=device) if face_spec is not None else None
        self.embedder = ClipEmbedder.load(spec)
        self.embedder.warmup()
        self.face = ClipEmbedder.load(face_spec) if face_spec is not None else None
        if self.face is not None:
            self.face.warmup()
        self.config = EncoderConfig()
        # The replica's CPU budget (Ray sets OMP_NUM_THREADS from num_cpus), shared out among the forward
        # passes allowed to run at once; None on a GPU.
        self._cpu_threads = torch.get_num_threads() if device == "cpu" else None
        self._threads_per_pass = pass_threads(self._cpu_threads, self.config.max_concurrent_batches)
        self.metrics = EncoderMetrics()
        self.batcher = MergingBatcher(
            {"image": self._encode_images, "face": self._encode_faces, "text": self._encode_texts},
            max_batch_size=self.config.max_batch_size,
            max_concurrent=self.config.max_concurrent_batches,
            observer=self.metrics,
        )
        self._image_shape = (*spec.preprocess.size, 3)
        self._face_shape = (*(face_spec or spec).preprocess.size, 3)
        logger.info("encoder ready: %s; face model: %s", self.embedder.info, self.face and self.face.info)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config``; a bad one fails the deploy loudly instead of keeping old values."""
        config = EncoderConfig.model_validate(user_config)
        self._threads_per_pass = pass_threads(self._cpu_threads, config.max_concurrent_batches)
        self.batcher.configure(
            max_batch_size=config.max_batch_size, max_concurrent=config.max_concurrent_batches
        )
        self.config = config

    async def embed_image_batch(self, images: np.ndarray) -> np.ndarray:
        """A batch the caller already formed, ``(B, H, W, 3)`` uint8 -> ``(B, dim)`` unit vectors.

        The Ingress (its requests' items, gathered) and the Importer (an import's images) call this; one
        handle call per batch keeps Serve's per-call overhead off the critical path.

        Raises:
            ValueError: for anything but a non-empty uint8 array of shape ``(B, *image shape)``.
        """
        _check_image_batch("embed_image_batch", images, self._image_shape)
        return await self._run_batch("image", list(images))

    async def embed_face_batch(self, images: np.ndarray) -> np.ndarray:
        """``embed_image_batch`` for face crops (the face model's input shape).

        Raises:
            ValueError: for anything but a non-empty uint8 array of shape ``(B, *face input shape)``.
        """
        _check_image_batch("embed_face_batch", images, self._face_shape)
        return await self._run_batch("face", list(images))

    async def embed_text_batch(self, texts: list[str]) -> np.ndarray:
        """A batch of texts the caller already formed -> ``(B, dim)`` unit vectors.

        Raises:
            ValueError: for anything but a non-empty list of ``str``.
        """
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            if not isinstance(texts, list):
                got = type(texts).__name__
            else:
                got = next((f"a {type(t).__name__} item" for t in texts if not isinstance(t, str)), "none")
            raise ValueError(f"embed_text_batch expects a non-empty list of str; got {got}")
        return await self._run_batch("text", texts)

    async def _run_batch(self, kind: str, items: list[Any]) -> np.ndarray:
        """A caller's pre-formed batch through the merging batcher, counted as its items."""
        with self.metrics.request(kind, len(items)):
            vectors = await self.batcher.run(kind, items)
        return np.stack(vectors)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (``deployments.autoscaling``): items in this replica.

        Callers send batches (the ingress gathers concurrent requests into one call), so Serve's own
        count of ongoing calls says little about the load; the items those calls carry do.
        """
        return {ONGOING_ITEMS_METRIC: float(self.metrics.ongoing_items())}

    def _encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        return self.embedder.encode_images(np.stack(images), threads=self._threads_per_pass)

    def _encode_faces(self, images: list[np.ndarray]) -> np.ndarray:
        return (self.face or self.embedder).encode_images(np.stack(images), threads=self._threads_per_pass)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode_texts(texts, threads=self._threads_per_pass)

    def info(self) -> dict[str, Any]:
        """What is loaded, the batching knobs in force, and counters (for /health, tests, benchmarks)."""
        face = self.face.info if self.face is not None else None
        return dict(self.embedder.info) | {
            "batch": self.config.model_dump(),
            "cpu_threads_per_pass": self._threads_per_pass,
            "face_identity": face["identity"] if face else None,
            "face_info": face,
            "stats": {
                kind: {"calls": self.metrics.calls[kind], **s} for kind, s in self.batcher.stats().items()
            },
            "pid": os.getpid(),
        }

    def check_health(self) -> None:
        """Cheap on purpose: Serve calls it every few seconds."""


def pass_threads(cpu_threads: int | None, max_concurrent_batches: int) -> int | None:
    """Intra-op threads of each CPU forward pass: the replica's threads shared among concurrent passes.

    ``None`` (a GPU replica) stays ``None``. Every pass gets at least one thread, so more concurrent
    passes than threads oversubscribe the cores, as asked.
    """
    if cpu_threads is None:
        return None
    return max(1, cpu_threads // max_concurrent_batches)


def _assigned_gpus() -> list[str]:
    """GPU ids Ray assigned to this replica (Ray leaves every GPU visible to a replica with num_gpus 0)."""
    if not ray.is_initialized():  # a plain instance outside Ray (tests): nothing was assigned
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def _check_image_batch(method: str, images: Any, shape: tuple[int, ...]) -> None:
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != shape
        or len(images) == 0
    ):
        dims = ", ".join(map(str, shape))
        raise ValueError(
            f"{method} expects a non-empty uint8 array of shape (B, {dims}); got {describe_input(images)}"
        )
