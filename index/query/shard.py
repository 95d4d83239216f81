"""One shard's answers from its reader: what a LibraryIndex replica computes for a plan's calls, and
:class:`ReaderShards`, a :class:`~index.query.plan.ShardSearcher` over readers in this process (tests,
tools)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from index.errors import ImageNotFound
from index.query.plan import QueryVector, Result, ShardRequest, StoredVector
from index.query.reader import LibraryReader, result_objects
from index.search.scores import ScoreCalibration


def search_reader(
    reader: LibraryReader, calibration: ScoreCalibration, query: QueryVector, request: ShardRequest
) -> list[Result]:
    """The shard's best ``request.top_k`` result objects (catch-up, planner, records from the store),
    scored for the query's kind and cut at ``min_score``, each carrying ``RANK_KEY``."""
    hits = reader.search(
        query.vector,
        request.top_k,
        request.node,
        query.vector_kind,
        request.recall_target,
        max_filter_work=request.max_filter_work,
    )
    scores = calibration.for_query(query.query_kind, hits.cosines)
    return result_objects(
        reader, hits, scores, min_score=request.min_score, return_frame=request.return_frame, with_rank=True
    )


def read_stored_vector(
    reader: LibraryReader, library: str, image_id: str, image_uri: str | None
) -> tuple[np.ndarray, str]:
    """The vector and vector kind of a stored record (its first uri when ``image_uri`` is None).

    Raises:
        ImageNotFound: no such live record in this shard.
    """
    records = reader.get(image_id, image_uri)
    vector: np.ndarray | None = reader.vector_of(records[0].row_id) if records else None
    if vector is None:
        raise ImageNotFound(library, image_id, image_uri)
    return vector, records[0].vector_kind


class ReaderShards:
    """The shards of one library as readers in this process, answering as LibraryIndex replicas do.

    Args:
        library: the library's name (for errors).
        readers: one per shard, in shard order.
        calibration: the score calibration the service uses.
    """

    def __init__(
        self, library: str, readers: Sequence[LibraryReader], calibration: ScoreCalibration | None = None
    ) -> None:
        self.library = library
        self.readers = list(readers)
        self.calibration = calibration or ScoreCalibration()

    async def search(self, shard: int, query: QueryVector, request: ShardRequest) -> list[Result]:
        return search_reader(self.readers[shard], self.calibration, query, request)

    async def stored_vector(self, query: StoredVector) -> QueryVector:
        reader = self.readers[query.shard]
        vector, kind = read_stored_vector(reader, self.library, query.image_id, query.image_uri)
        return QueryVector(vector, kind, query.query_kind)

    async def search_stored(self, query: StoredVector, request: ShardRequest) -> list[Result]:
        return await self.search(query.shard, await self.stored_vector(query), request)
