"""LibraryIndex deployment: the read path, multiplexed by library.

The multiplexed id is ``"<library_name>:<uid>"`` for a 1-shard library (``LibraryInfo.key``) and
``"<library_name>:<uid>:<shard>"`` for each shard of a sharded one (``LibraryInfo.shard_key``), so a
library that is deleted and created again never reuses a stale reader, and a replica holds a sharded
library's shards as separate models (each counts towards ``MAX_LIBRARIES_PER_REPLICA``). Routing by id is
only a preference: any replica may load any shard, and every answer first catches up with the store, so
all replicas agree. The ingress fans searches out to the shards and merges them (``index.query``: the
plan; ``deployments/searchers.py``: these methods as its per-shard searcher).

A dedicated replica (``dedicated=(library, shard)``, from ``AppArgs.dedicated_shards``) serves one shard
of one library and nothing else: it loads that shard in its constructor (when the library exists), so
Serve, which routes no request to a replica whose constructor has not returned, never sends it a search
it would have to load a big index for first. A library deleted and created again under the same name is
loaded again on its first request (a new uid).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import faiss
import numpy as np
from ray import serve

from index.clock import iso_time
from index.errors import LibraryNotFound
from index.query.plan import QueryVector, ShardRequest
from index.query.reader import LibraryReader, record_object
from index.query.shard import read_stored_vector, search_reader
from index.search.ann import IndexConfig
from index.search.scores import ScoreCalibration
from index.storage.backends import StorageSettings, open_storage
from index.storage.embedded.catalog import LibraryInfo

logger = logging.getLogger("ray.serve")

MAX_LIBRARIES_PER_REPLICA = 8
#: How many of its latest loads a replica remembers (``loads``).
LOADS_KEPT = 1000


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class LibraryIndex:
    def __init__(
        self,
        storage: StorageSettings,
        calibration: ScoreCalibration,
        index_config: IndexConfig,
        dedicated: tuple[str, int] | None = None,
        max_filter_work: int | None = None,
    ) -> None:
        self.storage = open_storage(storage)
        self.catalog = self.storage.catalog
        self.calibration = calibration
        self.index_config = index_config
        if index_config.search_threads:
            faiss.omp_set_num_threads(index_config.search_threads)  # this replica's process only
        self._loads: deque[str] = deque(maxlen=LOADS_KEPT)
        self.dedicated = dedicated
        # limits.max_filter_work, from the builder's args rather than per request: a request never carries
        # a keyword that an older replica lacks while a rolling update replaces them.
        self.max_filter_work = max_filter_work
        self._own: tuple[str, LibraryReader] | None = None
        self._own_lock = asyncio.Lock()
        if dedicated is not None:
            self._own = self._preload(*dedicated)

    def _preload(self, name: str, shard: int) -> tuple[str, LibraryReader] | None:
        """The dedicated shard, loaded before the constructor returns (so before Serve routes here)."""
        try:
            info = self.catalog.get(name)
        except LibraryNotFound:
            logger.warning("dedicated shard %d of %r: no such library yet; loaded on first use", shard, name)
            return None
        if shard >= info.shards:
            logger.warning(
                "dedicated shard %d of library %r: the library has %d shard(s); this replica serves nothing",
                shard,
                name,
                info.shards,
            )
            return None
        key = info.shard_key(shard)
        return key, self._open(info, shard, key)

    def _open(self, info: LibraryInfo, shard: int, key: str) -> LibraryReader:
        reader = LibraryReader(
            self.storage.library(info, shard), model_identity=info.model_identity, config=self.index_config
        )
        self._loads.append(key)
        return reader

    def _info(self, key: str) -> tuple[LibraryInfo, int]:
        """The library and shard ``key`` names, as the catalog has them now.

        Raises:
            LibraryNotFound: no such library, or one of that name created again since (another uid).
        """
        name, uid, shard = parse_key(key)
        info = self.catalog.get(name)
        if info.uid != uid or shard >= info.shards or info.shard_key(shard) != key:
            raise LibraryNotFound(name)
        return info, shard

    @serve.multiplexed(max_num_models_per_replica=MAX_LIBRARIES_PER_REPLICA)
    async def reader(self, key: str) -> LibraryReader:
        info, shard = await asyncio.to_thread(self._info, key)
        return await asyncio.to_thread(self._open, info, shard, key)

    async def _reader(self) -> LibraryReader:
        key = serve.get_multiplexed_model_id()
        if self.dedicated is None:
            return await self.reader(key)
        own = self._own
        if own is not None and own[0] == key:
            return own[1]
        async with self._own_lock:  # one load at a time; concurrent first requests share it
            if self._own is None or self._own[0] != key:
                info, shard = await asyncio.to_thread(self._info, key)
                if (info.name, shard) != self.dedicated:
                    # The ingress routes only this shard here; anything else is a wiring bug, not data.
                    raise RuntimeError(f"replica dedicated to {self.dedicated} was sent {key!r}")
                self._own = (key, await asyncio.to_thread(self._open, info, shard, key))
            return self._own[1]

    def loads(self) -> list[str]:
        """The keys this replica has loaded since it started, in order, the latest ``LOADS_KEPT`` (a key
        evicted and loaded again is listed again): which replica holds what, for tests and operators."""
        return list(self._loads)

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
        query = QueryVector(vector, vector_kind, query_kind)
        request = ShardRequest(top_k, node, min_score, return_frame, recall_target, self.max_filter_work)
        results = await asyncio.to_thread(search_reader, reader, self.calibration, query, request)
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
        return await asyncio.to_thread(read_stored_vector, reader, library, image_id, image_uri)

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
