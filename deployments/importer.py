"""Importer deployment: one replica that runs bulk import tasks (``index.ingest.ImportRunner``) and
resumes unfinished ones when it starts; it reaches the Encoder and the Writer through handles. Why its
own deployment: docs/ARCHITECTURE.md, "Bulk import".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.http import unwrap
from index.ingest.importer import ImportRunner
from index.model.spec import PreprocessSpec
from index.storage.backends import open_storage
from index.storage.embedded.store import NewRecord

logger = logging.getLogger("ray.serve")


# Default requests of the whole graph: Encoder 1 + Importer, Ingress, LibraryIndex, Writer 0.25 each = 2
# CPUs, so that the offline demo starts every deployment on a 2-core machine; serve_config.yaml sizes
# production replicas.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Importer:
    def __init__(
        self, encoder: DeploymentHandle, writer: DeploymentHandle, args: AppArgs, preprocess: PreprocessSpec
    ) -> None:
        self.encoder = encoder
        self.writer = writer
        self.storage = open_storage(args.storage_settings(), max_libraries=args.limits.max_libraries)
        self.store = self.storage.task_store(max_errors=args.imports.max_task_errors)
        self.runner = ImportRunner(
            tasks=self.store,
            catalog=self.storage.catalog,
            encode=self._encode,
            write=self._write,
            preprocess=preprocess,
            settings=args.imports,
            image_limits=args.image_limits(),
            tag_limits=args.limits.tag_limits(),
            policy=args.fetch_policy(),
        )
        # Serve runs the constructor on the replica's event loop: the runner lives on that loop, and
        # resumes unfinished tasks without waiting for a request.
        self._started = asyncio.get_running_loop().create_task(self.runner.start())

    async def create_task(self, library_name: str, library_uid: str, source: str, save_image: bool) -> str:
        await self._started
        task = await self.runner.create(library_name, library_uid, source, save_image)
        return task.task_id

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self.runner.describe(task_id)

    async def cancel_task(self, task_id: str) -> dict[str, Any]:
        await self._started
        return await self.runner.cancel(task_id)

    async def _encode(self, batch: np.ndarray) -> np.ndarray:
        try:
            return await self.encoder.embed_image_batch.remote(batch)
        except Exception as exc:
            raise unwrap(exc) from None

    async def _write(self, name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        try:
            return await self.writer.add_images.remote(name, uid, records)
        except Exception as exc:
            raise unwrap(exc) from None  # LibraryNotFound arrives wrapped in Ray's task error

    def check_health(self) -> None:
        if self._started.done() and (self._started.exception() is not None or not self.runner.healthy):
            raise RuntimeError("the import scheduler stopped; the replica will be restarted")

    async def __del__(self) -> None:
        # Graceful shutdown: stop tasks where they are; the next replica resumes from the last commit.
        await self.runner.close()
        self.store.close()
        self.storage.close()
