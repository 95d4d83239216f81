"""Search structures, floor 1: plain vectors and numbers, no storage, no model.

- ``ann``: the ANN kinds (flat, HNSW, IVF-PQ) behind one ``AnnBase``, ``IndexConfig`` and ``choose_kind``.
- ``table``: ``VectorTable``, slot-aligned vectors, tag columns and a live bitmap over one base; it
  applies a change feed (``changes``: ``Change``, ``VECTOR_KINDS``) and answers filtered searches.
- ``calibration``: the recall ladders that pick a search plan per filter selectivity.
- ``scores``: ``ScoreCalibration``, raw cosine -> the API's score.
- ``sharding``: ``shard_of``, which shard of a library holds an image id (``MAX_SHARDS``).

Names load on first use (``index.lazy_export``): ``index.search.sharding`` does not load FAISS.
"""

from __future__ import annotations

from typing import Any

from index import lazy_export

_EXPORTS = {
    "AnnBase": "ann",
    "DEFAULT_CONFIG": "ann",
    "IndexConfig": "ann",
    "KINDS": "ann",
    "build_base": "ann",
    "choose_kind": "ann",
    "SearchHits": "table",
    "VectorTable": "table",
    "VECTOR_KINDS": "changes",
    "Change": "changes",
    "Calibration": "calibration",
    "calibrate": "calibration",
    "ScoreCalibration": "scores",
    "MAX_SHARDS": "sharding",
    "shard_of": "sharding",
    "split_by_shard": "sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
