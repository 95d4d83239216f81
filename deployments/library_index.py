"""LibraryIndex deployment: the read path, multiplexed by library.

The multiplexed id is ``"<library_name>:<uid>"`` for a 1-shard library (``LibraryInfo.key``) and
``"<library_name>:<uid>:<shard>"`` for each shard of a sharded one (``LibraryInfo.shard_key``), so a
library that is deleted and created again never reuses a stale reader, and a replica holds a sharded
library's shards as separate models (each counts towards ``MAX_LIBRARIES_PER_REPLICA``). Routing by id is
only a preference: any replica may load any shard, and every answer first catches up with the store, so
all replicas agree. The ingress fans searches out to the shards and merges them (``index.shards``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import faiss
import numpy as np
from ray import serve

from index.ann import IndexConfig
from index.clock import iso_time
from index.errors import ImageNotFound, LibraryNotFound
from index.reader import LibraryReader, record_object, result_objects
from index.scores import ScoreCalibration
from index.storage import StorageSettings, open_storage

MAX_LIBRARIES_PER_REPLICA = 8


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class LibraryIndex:
    def __init__(
        self, storage: StorageSettings, calibration: ScoreCalibration, index_config: IndexConfig
    ) -> None:
        self.storage = open_storage(storage)
        self.catalog = self.storage.catalog
        self.calibration = calibration
        self.index_config = index_config
        if index_config.search_threads:
            faiss.omp_set_num_threads(index_config.search_threads)  # this replica's process only

    @serve.multiplexed(max_num_models_per_replica=MAX_LIBRARIES_PER_REPLICA)
    async def reader(self, key: str) -> LibraryReader:
        name, uid, shard = parse_key(key)
        info = await asyncio.to_thread(self.catalog.get, name)
        if info.uid != uid or shard >= info.shards or info.shard_key(shard) != key:
            raise LibraryNotFound(name)
        return await asyncio.to_thread(
            LibraryReader,
            self.storage.library(info, shard),
            model_identity=info.model_identity,
            config=self.index_config,
        )

    async def _reader(self) -> LibraryReader:
        return await self.reader(serve.get_multiplexed_model_id())

    async def search(
        self,
        vector: np.ndarray,
        *,
        query_kind: str,
        top_k: int,
        node: object,
        vector_kind: str | None,
        min_score: float | None,
        return_frame: bool,
        recall_target: float | None = None,
    ) -> dict[str, Any]:
        """``{"results": [...], "replica": id, "applied_seq": n}``: the replica and the sequence it had
        caught up to travel with the answer, for logs and for the read-your-writes tests."""
        reader = await self._reader()
        results = await asyncio.to_thread(
            self._search,
            reader,
            vector,
            query_kind,
            top_k,
            node,
            vector_kind,
            min_score,
            return_frame,
            recall_target,
        )
        return {
            "results": results,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "applied_seq": reader.applied_seq,
        }

    async def stored_vector(self, image_id: str, image_uri: str | None) -> tuple[np.ndarray, str]:
        """The vector and vector kind of a stored record (its first uri when image_uri is None), from
        the shard that holds the id: what a search by id of a sharded library sends to every shard.

        Raises:
            ImageNotFound: no such live record.
        """
        reader = await self._reader()
        library = serve.get_multiplexed_model_id().partition(":")[0]
        records = await asyncio.to_thread(reader.get, image_id, image_uri)
        vector = await asyncio.to_thread(reader.vector_of, records[0].row_id) if records else None
        if vector is None:
            raise ImageNotFound(library, image_id, image_uri)
        return vector, records[0].vector_kind

    async def search_by_id(self, image_id: str, image_uri: str | None, **kwargs: Any) -> dict[str, Any]:
        """Search with the vector of a stored record (its first uri when image_uri is None): one call
        for a 1-shard library."""
        vector, vector_kind = await self.stored_vector(image_id, image_uri)
        return await self.search(vector, vector_kind=vector_kind, **kwargs)

    async def get_images(
        self, image_id: str, image_uri: str | None, return_frame: bool
    ) -> list[dict[str, Any]]:
        reader = await self._reader()

        def read() -> list[dict[str, Any]]:
            return [
                record_object(reader, rec, return_frame=return_frame)
                | {
                    "vector_kind": rec.vector_kind,
                    "detection": rec.extra,
                    "created_at": iso_time(rec.created_at),
                    "updated_at": iso_time(rec.updated_at),
                }
                for rec in reader.get(image_id, image_uri)
            ]

        return await asyncio.to_thread(read)

    def _search(
        self,
        reader: LibraryReader,
        vector: np.ndarray,
        query_kind: str,
        top_k: int,
        node: object,
        vector_kind: str | None,
        min_score: float | None,
        return_frame: bool,
        recall_target: float | None,
    ) -> list[dict[str, Any]]:
        hits = reader.search(vector, top_k, node, vector_kind, recall_target)
        scores = self.calibration.for_query(query_kind, hits.cosines)
        return result_objects(
            reader, hits, scores, min_score=min_score, return_frame=return_frame, with_rank=True
        )


def parse_key(key: str) -> tuple[str, str, int]:
    """``(name, uid, shard)`` of a multiplexed id (``name:uid`` is shard 0 of a 1-shard library).

    Raises:
        LibraryNotFound: the id names no library shard (the ingress only sends ids it made).
    """
    name, _, rest = key.partition(":")
    uid, _, shard = rest.partition(":")
    if not shard:
        return name, uid, 0
    if not shard.isdigit():
        raise LibraryNotFound(name)
    return name, uid, int(shard)
