"""LibraryWriter deployment: the single writer (one replica) that every mutation goes through."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from index.search.ann import IndexConfig
from index.storage.backends import StorageSettings, open_storage
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Writer:
    def __init__(self, storage: StorageSettings, max_libraries: int, index_config: IndexConfig) -> None:
        self.core = LibraryWriter(open_storage(storage, max_libraries=max_libraries), config=index_config)

    async def create_library(
        self,
        name: str,
        mode: str,
        description: str | None,
        model: dict[str, Any],
        index_kind: str,
        shards: int = 1,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self.core.create_library, name, mode, description, model, index_kind, shards
        )

    async def delete_library(self, name: str) -> None:
        await asyncio.to_thread(self.core.delete_library, name)

    async def add_images(self, name: str, uid: str, records: list[NewRecord]) -> list[bool]:
        return await asyncio.to_thread(self.core.add_images, name, uid, records)

    async def update_tags(
        self, name: str, uid: str, image_id: str, image_uri: str | None, tags: dict[str, Any]
    ) -> int:
        return await asyncio.to_thread(self.core.update_tags, name, uid, image_id, image_uri, tags)

    async def delete_images(self, name: str, uid: str, image_id: str, image_uri: str | None) -> int:
        return await asyncio.to_thread(self.core.delete_images, name, uid, image_id, image_uri)

    def __del__(self) -> None:
        if hasattr(self, "core"):  # a constructor that failed (bad storage settings) left nothing to close
            self.core.close()
