"""VectorTable: filtered exact search against brute force, liveness, compaction."""

from __future__ import annotations

import numpy as np
import pytest

from filters import parse_filter
from index import table as table_mod
from index.store import Change
from index.table import VectorTable

DIM = 16


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def changes(x: np.ndarray, tags: list[dict], start_row: int = 1, seq: int = 1) -> list[Change]:
    return [
        Change(row_id=start_row + i, seq=seq, deleted=False, vector=x[i], vector_kind="whole", tags=tags[i])
        for i in range(len(x))
    ]


def brute(x: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> list[int]:
    scores = x @ q
    idx = [i for i in np.argsort(-scores, kind="stable") if keep[i]]
    return idx[:k]


@pytest.mark.parametrize("n", [50, 3000])
@pytest.mark.parametrize(
    "flt", [None, {"field": "c", "op": "=", "value": "a"}, {"field": "n", "op": "<", "value": 3}]
)
def test_search_matches_brute_force(n, flt, monkeypatch):
    x = vectors(n)
    tags = [{"c": "abc"[i % 3], "n": i % 10} for i in range(n)]
    t = VectorTable(DIM)
    t.apply(changes(x, tags))
    q = vectors(1, seed=9)[0]
    node = parse_filter(flt)
    keep = np.array(
        [flt is None or (t_["c"] == "a" if flt["field"] == "c" else t_["n"] < 3) for t_ in tags], dtype=bool
    )
    want = brute(x, q, keep, 10)
    # both the gather path and the bitmap-selector path must agree with brute force
    for gather_max in (0, 10**9):
        monkeypatch.setattr(table_mod, "EXACT_GATHER_MAX", gather_max)
        monkeypatch.setattr(table_mod, "EXACT_GATHER_FRACTION", 0.0)
        hits = t.search(q, 10, node)
        assert (hits.row_ids - 1).tolist() == want
        assert np.all(np.diff(hits.cosines) <= 1e-6)


def test_upsert_delete_and_compaction_keep_results():
    n = 400
    x = vectors(n)
    t = VectorTable(DIM)
    t.apply(changes(x, [{"i": i} for i in range(n)]))
    # overwrite half the rows with new vectors, delete a quarter
    y = vectors(n, seed=1)
    t.apply(changes(y[: n // 2], [{"i": i} for i in range(n // 2)], seq=2))
    t.apply(
        [
            Change(row_id=1 + i, seq=3, deleted=True, vector=None, vector_kind="whole", tags={})
            for i in range(300, 400)
        ]
    )
    assert t.live_count == 300
    assert len(t) == 300  # 200 + 100 dead slots -> compacted
    current = np.concatenate([y[:200], x[200:300]])
    q = vectors(1, seed=5)[0]
    hits = t.search(q, 20)
    assert (hits.row_ids - 1).tolist() == brute(current, q, np.ones(300, bool), 20)
    assert t.applied_seq == 3


def test_row_changed_twice_in_one_batch():
    x = vectors(3)
    t = VectorTable(DIM)
    batch = changes(x[:1], [{"v": 1}]) + changes(x[1:2], [{"v": 2}], seq=2)  # same row id 1
    t.apply(batch)
    assert t.live_count == 1
    hits = t.search(x[1], 5, parse_filter({"field": "v", "op": "=", "value": 2}))
    assert hits.row_ids.tolist() == [1]
    assert t.search(x[1], 5, parse_filter({"field": "v", "op": "=", "value": 1})).row_ids.tolist() == []


def test_vector_kind_separates_spaces():
    x = vectors(4)
    t = VectorTable(DIM)
    t.apply([Change(i + 1, 1, False, x[i], "face" if i % 2 else "whole", {}) for i in range(4)])
    assert sorted(t.search(x[0], 10, vector_kind="face").row_ids.tolist()) == [2, 4]
    assert sorted(t.search(x[0], 10, vector_kind="whole").row_ids.tolist()) == [1, 3]


def test_empty_and_k_larger_than_candidates():
    t = VectorTable(DIM)
    assert t.search(vectors(1)[0], 5).row_ids.tolist() == []
    t.apply(changes(vectors(3), [{}, {}, {}]))
    assert len(t.search(vectors(1)[0], 50).row_ids) == 3
