"""VectorTable and its query planner: every path against brute force on small data, liveness, the
tail beside a base index, compaction, switching index kinds, all-or-nothing applies."""

from __future__ import annotations

import numpy as np
import pytest

import index.search.table as table_module
from filters import TagError, parse_filter
from filters.work import filter_work
from index.errors import InvalidParameter
from index.search.ann import IndexConfig
from index.search.changes import Change
from index.search.table import VectorTable

DIM = 16
N = 3000
# Generous search effort, so that on 3,000 rows the approximate kinds return the exact top-k and the
# tests can compare with brute force; nothing here measures recall.
ANN = dict(
    hnsw_ef_search=256,
    hnsw_ef_search_max=2048,
    ivf_nlist=16,
    ivf_nprobe=16,
    refine_factor=64,
    ivfpq_min_rows=1,
    pq_m=8,
    pq_nbits=6,
    filter_ivf_nprobe=4096,  # every list: the filter IVF is exact up to its re-rank
    calibration_queries=0,  # the fixed efforts above, not the calibrated ones (search/test_recall.py)
)
EXACT_ONLY = IndexConfig(exact_max_candidates=10**9, exact_max_fraction=1.0, **ANN)  # every filter exact
INDEX_ONLY = IndexConfig(
    exact_max_candidates=0, exact_max_fraction=0.0, exact_by_cost=False, **ANN
)  # never gather
DEFAULT = IndexConfig(**ANN)
KINDS = [None, "flat", "hnsw", "ivfpq"]  # None: no base index, every row in the exact tail


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def changes(x: np.ndarray, tags: list[dict], start_row: int = 1, seq: int = 1) -> list[Change]:
    return [
        Change(row_id=start_row + i, seq=seq, deleted=False, vector=x[i], vector_kind="whole", tags=tags[i])
        for i in range(len(x))
    ]


def deletes(row_ids, seq: int) -> list[Change]:
    return [
        Change(row_id=r, seq=seq, deleted=True, vector=None, vector_kind="whole", tags={}) for r in row_ids
    ]


def brute(x: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> list[int]:
    scores = x @ q
    idx = [i for i in np.argsort(-scores, kind="stable") if keep[i]]
    return idx[:k]


def row_tags(n: int) -> list[dict]:
    # "p" passes 50% / 10% / 1% / 0.1% of rows for p < 500 / 100 / 10 / 1
    return [{"c": "abc"[i % 3], "p": (i * 7919) % 1000, "l": ["x", f"y{i % 5}"]} for i in range(n)]


def table_of(x, tags, kind, config) -> VectorTable:
    t = VectorTable(DIM, config)
    t.apply(changes(x, tags))
    return t if kind is None else t.rebuilt(kind)


FILTERS = {
    "none": (None, lambda t: True),
    "half": ({"field": "p", "op": "<", "value": 500}, lambda t: t["p"] < 500),
    "tenth": ({"field": "p", "op": "<", "value": 100}, lambda t: t["p"] < 100),
    "1%": ({"field": "p", "op": "<", "value": 10}, lambda t: t["p"] < 10),
    "0.1%": ({"field": "p", "op": "<", "value": 1}, lambda t: t["p"] < 1),
    "3 conditions": (
        [
            {"field": "c", "op": "in", "value": ["a", "b"]},
            {"field": "l", "op": "=", "value": "y1"},
            {"field": "p", "op": ">=", "value": 200},
        ],
        lambda t: t["c"] in "ab" and "y1" in t["l"] and t["p"] >= 200,
    ),
}


@pytest.fixture(scope="module")
def data():
    return vectors(N), row_tags(N), vectors(5, seed=9)


@pytest.fixture(scope="module")
def built(data):
    """One table per kind over the whole data set (building IVF-PQ and HNSW is the slow part)."""
    x, tags, _ = data
    return {kind: table_of(x, tags, kind, DEFAULT) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", [EXACT_ONLY, INDEX_ONLY, DEFAULT], ids=["exact", "index", "planner"])
@pytest.mark.parametrize("name", list(FILTERS))
def test_every_path_returns_the_brute_force_top_k(data, built, kind, config, name):
    x, tags, queries = data
    flt, keep_fn = FILTERS[name]
    keep = np.array([keep_fn(t) for t in tags])
    t = built[kind]
    t.config = config  # the search thresholds only: the index is the same
    for q in queries:
        hits = t.search(q, 10, parse_filter(flt))
        assert (hits.row_ids - 1).tolist() == brute(x, q, keep, 10)
        assert hits.candidates == keep.sum()
        assert np.all(np.diff(hits.cosines) <= 1e-6)
        np.testing.assert_allclose(hits.cosines, x[hits.row_ids - 1] @ q, rtol=1e-5, atol=1e-5)
    if kind is None or (config is EXACT_ONLY and flt is not None):
        assert hits.path == "exact"
    elif config is INDEX_ONLY:
        assert hits.path in ("index", "index+exact")


@pytest.mark.parametrize("kind", KINDS)
def test_no_row_passes(data, built, kind):
    queries = data[2]
    t = built[kind]
    hits = t.search(queries[0], 10, parse_filter({"field": "p", "op": ">", "value": 5000}))
    assert (hits.row_ids.tolist(), hits.candidates, hits.path) == ([], 0, "empty")


def test_a_filter_over_max_filter_work_is_refused_before_it_runs(data, built, monkeypatch):
    queries = data[2]
    t = built[None]
    node = parse_filter(
        [{"field": "l", "op": "contains", "value": "y"}, {"field": "p", "op": "<", "value": 500}]
    )
    work = filter_work(node, t.tags)
    allowed = t.search(queries[0], 10, node, max_filter_work=work)
    assert allowed.row_ids.tolist() == t.search(queries[0], 10, node).row_ids.tolist()  # no bound: the same
    evaluated = []
    monkeypatch.setattr(table_module, "evaluate", lambda *args: evaluated.append(args))
    with pytest.raises(InvalidParameter, match=r"^tag_filter: .*budget of [\d,]+ \(max_filter_work\)"):
        t.search(queries[0], 10, node, max_filter_work=work - 1)
    assert evaluated == []


def test_planner_picks_exact_for_few_candidates_and_the_index_for_many(data):
    x, tags, queries = data
    config = IndexConfig(exact_max_candidates=100, exact_max_fraction=0.0, exact_by_cost=False, **ANN)
    t = table_of(x, tags, "hnsw", config)
    assert t.base.filter_ivf is not None  # filtered searches over many rows go to the filter IVF
    assert t.search(queries[0], 10, parse_filter(FILTERS["0.1%"][0])).path == "exact"  # 3 rows
    assert t.search(queries[0], 10, parse_filter(FILTERS["1%"][0])).path == "exact"  # 30 rows
    assert t.search(queries[0], 10, parse_filter(FILTERS["half"][0])).path == "index"
    assert t.search(queries[0], 10).path == "index"


def test_planner_picks_exact_when_it_costs_less_than_the_index_plan(data):
    """300 passing rows cost less to scan (2 x 300) than the filter IVF's plan here (every list: the
    centroids, 300 passing codes, 2,700 skipped, the re-rank); an HNSW search at efSearch 16 (about
    2 * 32 * 16 distances) costs less than all 3,000 rows."""
    x, tags, queries = data
    config = IndexConfig(exact_max_candidates=100, exact_max_fraction=0.0, **{**ANN, "hnsw_ef_search": 16})
    t = table_of(x, tags, "hnsw", config)
    assert t.search(queries[0], 10, parse_filter(FILTERS["tenth"][0])).path == "exact"
    assert t.search(queries[0], 10).path == "index"
    assert t.search(queries[0], 10, recall_target=1.0).path == "exact"


def test_fewer_index_hits_than_k_reruns_exactly(data, monkeypatch):
    """An approximate index that comes back short (a sparse filter can strand HNSW) is not trusted:
    the planner redoes the search exactly over every passing row."""
    x, tags, queries = data
    t = table_of(x, tags, "hnsw", INDEX_ONLY)
    real = t.base.search

    def short(q, k, bitmap, selectivity, config, plan=None):
        scores, slots = real(q, k, bitmap, selectivity, config, plan)
        slots = slots.copy()
        slots[k // 2 :] = -1
        return scores, slots

    monkeypatch.setattr(t.base, "search", short)
    flt, keep_fn = FILTERS["tenth"]
    hits = t.search(queries[0], 10, parse_filter(flt))
    assert hits.path == "index+exact"
    assert (hits.row_ids - 1).tolist() == brute(x, queries[0], np.array([keep_fn(r) for r in tags]), 10)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_tail_beside_a_base_with_deletes_and_upserts(data, kind):
    """Rows applied after the base was built live in the exact tail; deletes and upserts kill base
    slots; every search still equals brute force over the current rows, before and after the tail is
    absorbed into the index and after a compaction."""
    x, tags, queries = data
    base_rows = 2000
    t = table_of(x[:base_rows], tags[:base_rows], kind, DEFAULT)
    current = x.copy()
    t.apply(changes(x[base_rows:], tags[base_rows:], start_row=base_rows + 1, seq=2))  # tail
    moved = vectors(300, seed=3)  # upsert 300 base rows with new vectors: their slots move to the tail
    t.apply(changes(moved, tags[:300], start_row=1, seq=3))
    current[:300] = moved
    gone = np.r_[300:700, 2500:2600]  # delete rows from the base and from the tail
    t.apply(deletes((gone + 1).tolist(), seq=4))
    alive = np.ones(N, bool)
    alive[gone] = False
    assert t.live_count == alive.sum() and t.tail_count == 1300
    flt, keep_fn = FILTERS["half"]
    keep = alive & np.array([keep_fn(r) for r in tags])

    def check(table: VectorTable) -> None:
        for q in queries:
            assert (table.search(q, 10).row_ids - 1).tolist() == brute(current, q, alive, 10)
            assert (table.search(q, 10, parse_filter(flt)).row_ids - 1).tolist() == brute(
                current, q, keep, 10
            )

    check(t)
    t.absorb_tail()
    assert t.tail_count == 0 and len(t) == 3300
    check(t)
    compacted = t.rebuilt(kind)  # compaction: the dead slots are dropped
    assert len(compacted) == compacted.live_count == alive.sum()
    check(compacted)


def test_switching_index_kind_keeps_results(data):
    x, tags, queries = data
    t = table_of(x, tags, None, DEFAULT)
    t.apply(deletes(range(1, 200), seq=2))
    node = parse_filter(FILTERS["3 conditions"][0])
    want = [(t.search(q, 10).row_ids.tolist(), t.search(q, 10, node).row_ids.tolist()) for q in queries]
    for kind in ["flat", "hnsw", "ivfpq", "hnsw", "flat"]:
        t = t.rebuilt(kind)
        assert t.kind == kind and len(t) == N - 199
        got = [(t.search(q, 10).row_ids.tolist(), t.search(q, 10, node).row_ids.tolist()) for q in queries]
        assert got == want


def test_a_bad_row_applies_nothing_of_its_batch():
    """Regression: tags used to be appended row by row before the vectors, so a bad row mid-batch left
    tag slots and vector slots out of step and every later filter hit the wrong rows."""
    x = vectors(6)
    t = VectorTable(DIM)
    t.apply(changes(x[:2], [{"v": 0}, {"v": 1}]))
    bad = changes(x[2:5], [{"v": 2}, {"v": None}, {"v": 4}], start_row=3, seq=2)  # null is not a tag value
    bad.insert(0, Change(row_id=1, seq=2, deleted=True, vector=None, vector_kind="whole", tags={}))
    with pytest.raises(TagError):
        t.apply(bad)
    assert (len(t), len(t.tags), t.live_count, t.applied_seq) == (2, 2, 2, 1)
    assert t.search(x[0], 1).row_ids.tolist() == [1]  # the delete in the failed batch did not happen
    t.apply(changes(x[5:6], [{"v": 5}], start_row=6, seq=3))
    for v, row in [(0, 1), (1, 2), (5, 6)]:
        assert t.search(x[0], 5, parse_filter({"field": "v", "op": "=", "value": v})).row_ids.tolist() == [
            row
        ]


def test_a_failed_batch_is_reapplied_whole():
    """A batch that fails keeps applied_seq below its first seq, so a retry applies all of it."""
    x = vectors(3)
    t = VectorTable(DIM)
    good = changes(x, [{"v": 0}, {"v": 1}, {"v": 2}], seq=7)
    with pytest.raises(ValueError, match="shape"):
        t.apply([*good[:2], Change(4, 7, False, np.ones(DIM + 1, np.float32), "whole", {})])
    assert (len(t), t.applied_seq) == (0, 0)
    t.apply(good)
    assert (t.live_count, t.applied_seq) == (3, 7)


def test_row_changed_twice_in_one_batch():
    x = vectors(3)
    t = VectorTable(DIM)
    batch = changes(x[:1], [{"v": 1}]) + changes(x[1:2], [{"v": 2}], seq=2)  # same row id 1
    t.apply(batch)
    assert t.live_count == 1
    hits = t.search(x[1], 5, parse_filter({"field": "v", "op": "=", "value": 2}))
    assert hits.row_ids.tolist() == [1]
    assert t.search(x[1], 5, parse_filter({"field": "v", "op": "=", "value": 1})).row_ids.tolist() == []


@pytest.mark.parametrize("kind", KINDS)
def test_vector_kind_separates_spaces(kind):
    x = vectors(400)
    t = VectorTable(DIM, DEFAULT)
    t.apply([Change(i + 1, 1, False, x[i], "face" if i % 2 else "whole", {}) for i in range(400)])
    t = t if kind is None else t.rebuilt(kind)
    assert sorted(t.search(x[0], 1000, vector_kind="face").row_ids.tolist()) == list(range(2, 401, 2))
    assert sorted(t.search(x[0], 1000, vector_kind="whole").row_ids.tolist()) == list(range(1, 401, 2))
    assert t.search(x[0], 10, vector_kind="item").row_ids.tolist() == []


def test_empty_and_k_larger_than_candidates():
    t = VectorTable(DIM)
    assert t.search(vectors(1)[0], 5).row_ids.tolist() == []
    t.apply(changes(vectors(3), [{}, {}, {}]))
    assert len(t.search(vectors(1)[0], 50).row_ids) == 3


def test_absorbing_into_a_memory_mapped_base_is_refused(tmp_path, data):
    """FAISS aborts the process when a memory-mapped index grows: the table refuses first."""
    from index.search.ann import FlatBase

    x, tags, _ = data
    t = table_of(x[:100], tags[:100], "flat", DEFAULT)
    t.base.save(tmp_path)
    mapped = VectorTable.from_snapshot(
        FlatBase.load(tmp_path), t.row_ids, t.kinds, t.live, t.tags, t.applied_seq
    )
    mapped.apply(changes(x[100:110], tags[100:110], start_row=101, seq=2))
    with pytest.raises(RuntimeError, match="memory-mapped"):
        mapped.absorb_tail()
    assert mapped.search(x[105], 1).row_ids.tolist() == [106]


def test_hnsw_effort_rises_as_selectivity_falls():
    from index.search.ann import HnswBase

    ef = HnswBase.ef_for
    config = IndexConfig(hnsw_ef_search=64, hnsw_ef_search_max=768)
    efs = [ef(None, 10, s, config) for s in (1.0, 0.99, 0.5, 0.1, 0.01)]
    assert efs == [64, 65, 256, 768, 768]
    assert ef(None, 1000, 1.0, config) == 1000  # never below k
