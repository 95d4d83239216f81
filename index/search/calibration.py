"""Self-calibration: the search settings that reach a recall target, measured on a library's own data.

A fixed efSearch or nprobe holds its recall only on the data it was tuned on (issue 14: the filter IVF's
fixed nprobe 32 gave recall@10 0.38 at a 10% filter on harder data). So when the writer builds a
snapshot it measures, on the library's own vectors, the recall@10 of every effort on a ladder
(`AnnBase.ladder`: efSearch for the HNSW graph, passing candidates scored for an IVF) unfiltered and
under random-subset filters at a few selectivities (``IndexConfig.calibration_selectivities``), with
exact search as the truth, and records the ladders in the snapshot's manifest. At query time
`Calibration.plan` picks, for the request's recall target and the filter's selectivity, the cheapest
recorded setting whose measured recall reaches the target (plus ``calibration_margin``), or the exact
path when none does.

The queries are *held out*: vectors of the library that are not in the index while it is measured (the
writer adds them right after). A stored vector used as its own query flatters an HNSW graph, whose
links lead straight to its neighbours (measured here on the 256-d-latent data at 100k rows: recall@10
0.64 against 0.45 for fresh queries at efSearch 16). Everything is seeded: the same base, queries and
config give the same ladders, so a reader reloading a snapshot reproduces the recorded recall.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from index.search.ann import EXACT, EXACT_ROW_COST, AnnBase, IndexConfig, Plan

logger = logging.getLogger(__name__)

K = 10
#: A ladder stops once a step measures this recall: nothing above it is worth its cost.
RECALL_CEILING = 0.999
#: Selectivities at or above this use the unfiltered ladder (a filter that passes nearly every row, or
#: the live bitmap of a library with a few deleted rows).
UNFILTERED_FROM = 0.9


@dataclass(frozen=True)
class Step:
    method: str  # "hnsw" or "ivf" (`index.search.ann.Plan`)
    value: int  # efSearch, or passing candidates scored
    recall: float  # measured recall@10


@dataclass(frozen=True)
class Bucket:
    selectivity: float  # 1.0: unfiltered
    rows: int  # rows that passed the filter
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Calibration:
    """Recall ladders measured on one base (recorded in the snapshot manifest as `to_dict`)."""

    k: int
    queries: int
    rows: int  # slots of the base when measured
    seconds: float
    buckets: tuple[Bucket, ...]  # unfiltered first, then by falling selectivity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        buckets = tuple(
            Bucket(b["selectivity"], b["rows"], tuple(Step(**s) for s in b["steps"])) for b in d["buckets"]
        )
        return cls(d["k"], d["queries"], d["rows"], d["seconds"], buckets)

    def plan(self, base: AnnBase, k: int, selectivity: float, target: float, config: IndexConfig) -> Plan:
        """The cheapest recorded setting reaching ``target`` at ``selectivity`` (`EXACT` when none does).

        Unfiltered (or nearly: ``selectivity >= UNFILTERED_FROM``): any step of the unfiltered ladder,
        an HNSW efSearch scaled by ``1 / s**2``. Filtered: per method (HNSW efSearch, IVF candidates),
        `_filtered_effort`. Of the methods, the one `AnnBase.cost` expects to be cheaper.
        """
        need = min(target + config.calibration_margin, 1.0)
        s = max(selectivity, 1e-9)
        plans: list[Plan] = []
        if s >= UNFILTERED_FROM:
            for step in self.buckets[0].steps:
                if step.recall >= need:
                    # a few rows filtered out (deleted ones, say): the graph walks past them (ef / s**2)
                    value = step.value if step.method != "hnsw" else int(np.ceil(step.value / s**2))
                    plans.append(Plan(step.method, value))
        else:
            methods = sorted({step.method for step in self.buckets[0].steps})
            for method in methods:
                # Below filter_ivf_max_selectivity a filter goes to the IVF, which counts the rows that
                # pass near the query: a graph walk can strand where a filter correlated with the data
                # passes nothing nearby, and random-subset calibration does not see that.
                if method == "hnsw" and "ivf" in methods and s < config.filter_ivf_max_selectivity:
                    continue
                effort = self._filtered_effort(method, s, need)
                if effort is not None:
                    plans.append(Plan(method, effort))
        if not plans:
            return EXACT
        return min(plans, key=lambda p: (base.cost(p, k, s, config), p.method))

    def _filtered_effort(self, method: str, s: float, need: float) -> int | None:
        """The effort ``method`` needs to reach ``need`` under a filter passing ``s`` (None: a
        calibrated selectivity it depends on never reached ``need`` with ``method``).

        Calibrated selectivities within 5% count as equal. An IVF scoring a fixed number of passing
        rows needs more as a filter loosens (the rows come from fewer lists), up to the unfiltered
        effort, which a filter correlated with the data reaches locally (the query's neighbourhood
        passes whole): the largest effort at every selectivity >= s and at the nearest below. An HNSW
        graph needs more as a filter tightens: the effort at the nearest selectivity <= s, or below
        every calibrated one the lowest one's grown by ``sqrt(lowest / s)``.
        """
        filtered = self.buckets[1:]
        if method == "ivf":
            sides = [(b, 1.0) for b in self.buckets if b.selectivity >= s * 0.95]
            below = [b for b in filtered if b.selectivity < s * 0.95]
            if below:
                sides.append((max(below, key=lambda b: b.selectivity), 1.0))
        else:
            below = [b for b in filtered if b.selectivity <= s * 1.05]
            if below:
                sides = [(max(below, key=lambda b: b.selectivity), 1.0)]
            else:
                low = min(self.buckets, key=lambda b: b.selectivity)
                sides = [(low, float(np.sqrt(max(low.selectivity / s, 1.0))))]
        values = []
        for bucket, grow in sides:
            value = _cheapest(bucket.steps, method, need)
            if value is None:
                return None
            values.append(int(np.ceil(value * grow)))
        return max(values)

    def describe(self, target: float, config: IndexConfig) -> dict[str, Any]:
        """What ``GET /library/{name}`` reports: per calibrated selectivity and method, the smallest
        effort measured to reach the target and the recall measured with it (the planner takes the
        cheaper method; none listed: the exact path)."""
        need = min(target + config.calibration_margin, 1.0)
        rows = []
        for bucket in self.buckets:
            settings = []
            for method in sorted({s.method for s in bucket.steps}):
                step = next((s for s in bucket.steps if s.method == method and s.recall >= need), None)
                if step is not None:  # a ladder is cheapest first: its first step reaching the target
                    settings.append({"method": method, "value": step.value, "recall": step.recall})
            rows.append(
                {
                    "selectivity": bucket.selectivity,
                    "rows": bucket.rows,
                    "settings": settings,
                    "best_measured_recall": max((s.recall for s in bucket.steps), default=None),
                }
            )
        return {
            "recall_target": target,
            "queries": self.queries,
            "rows": self.rows,
            "seconds": self.seconds,
            "unfiltered": rows[0],
            "filtered": rows[1:],
        }


def _cheapest(steps: tuple[Step, ...], method: str, need: float) -> int | None:
    values = [s.value for s in steps if s.method == method and s.recall >= need]
    return min(values) if values else None


def holdout(n: int, config: IndexConfig) -> np.ndarray:
    """Sorted positions of the rows (of ``n``) held out as calibration queries: ``calibration_queries``
    of them, at most a tenth of the rows (seeded)."""
    return sample(n, min(config.calibration_queries, n // 10))


def sample(n: int, count: int) -> np.ndarray:
    """``count`` sorted positions of ``n`` (all of them when fewer), drawn with a fixed seed."""
    count = max(0, min(count, n))
    return np.sort(np.random.default_rng(0).choice(n, count, replace=False))


def calibrate(
    base: AnnBase, queries: np.ndarray, live: np.ndarray | None, config: IndexConfig
) -> Calibration | None:
    """Measure recall@10 ladders of ``base`` with ``queries`` (vectors *not* in it) against exact search.

    Args:
        base: the index, all of whose slots are searched (dead ones masked by ``live``).
        queries: float32 (q, dim) held-out vectors.
        live: bool per slot of ``base`` (None: all live).
        config: ladders, selectivities, the exact path's threshold (a selectivity whose rows the
            planner would search exactly anyway is not calibrated).

    Returns:
        The ladders, or None when the base has no approximate method (flat) or there are no queries.
    """
    if not base.methods(False) or len(queries) == 0 or base.ntotal == 0:
        return None
    started = time.perf_counter()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = base.ntotal
    live_mask = np.ones(n, dtype=bool) if live is None else np.asarray(live[:n], dtype=bool)
    rng = np.random.default_rng(0)
    exact_max = max(config.exact_max_candidates, int(config.exact_max_fraction * n))
    masks: list[tuple[float, np.ndarray]] = [(1.0, live_mask)]
    for s in sorted({float(s) for s in config.calibration_selectivities if 0.0 < s < 1.0}, reverse=True):
        mask = live_mask & (rng.random(n) < s)
        if np.count_nonzero(mask) > exact_max:  # else the planner searches those rows exactly
            masks.append((s, mask))
    truths = _exact_topk(queries, base.vectors(), [m for _, m in masks], K)
    buckets = []
    for (s, mask), truth in zip(masks, truths, strict=True):
        rows = int(np.count_nonzero(mask))
        bits = None if rows == n else np.packbits(mask, bitorder="little")
        fraction = rows / n
        steps: list[Step] = []
        for method in base.methods(filtered=s < 1.0):
            for value in base.ladder(method, K, config):
                plan = Plan(method, value)
                if steps and base.cost(plan, K, fraction, config) > EXACT_ROW_COST * rows:
                    break  # dearer than the exact path: the planner would never pick it
                r = measure(base, queries, truth, bits, fraction, config, plan)
                steps.append(Step(method, value, r))
                if r >= RECALL_CEILING:
                    break
        buckets.append(Bucket(s, rows, tuple(steps)))
    seconds = round(time.perf_counter() - started, 2)
    cal = Calibration(K, len(queries), n, seconds, tuple(buckets))
    logger.info(
        "calibrated %s index over %d slots with %d held-out queries in %.1fs: %s",
        base.kind,
        n,
        len(queries),
        seconds,
        "; ".join(
            f"s={b.selectivity}: " + ", ".join(f"{x.method} {x.value}->{x.recall:.3f}" for x in b.steps)
            for b in buckets
        ),
    )
    return cal


def measure(
    base: AnnBase,
    queries: np.ndarray,
    truth: np.ndarray,
    bits: np.ndarray | None,
    selectivity: float,
    config: IndexConfig,
    plan: Plan,
) -> float:
    """Recall@K of ``plan`` over ``queries`` (one search each, as the reader runs them)."""
    hits = total = 0
    for q, want in zip(queries, truth, strict=True):
        _, got = base.search(q.reshape(1, -1), K, bits, selectivity, config, plan)
        want = want[want >= 0]
        hits += len(np.intersect1d(got[got >= 0], want))
        total += len(want)
    return round(hits / max(total, 1), 4)


def _exact_topk(
    queries: np.ndarray, vectors: np.ndarray, masks: list[np.ndarray], k: int, chunk: int = 65536
) -> list[np.ndarray]:
    """Exact top-k slots of each query among each mask's slots, in one pass over ``vectors``
    (one matrix product per chunk of rows, shared by all masks). -1 where fewer than k pass."""
    nq = len(queries)
    best_s = [np.full((nq, k), -np.inf, dtype=np.float32) for _ in masks]
    best_i = [np.full((nq, k), -1, dtype=np.int64) for _ in masks]
    for start in range(0, len(vectors), chunk):
        block = np.asarray(vectors[start : start + chunk], dtype=np.float32)
        scores = queries @ block.T  # (nq, rows in chunk)
        ids = np.arange(start, start + len(block), dtype=np.int64)
        for j, mask in enumerate(masks):
            sub = np.where(mask[start : start + len(block)], scores, -np.inf)
            all_s = np.concatenate([best_s[j], sub], axis=1)
            all_i = np.concatenate([best_i[j], np.broadcast_to(ids, sub.shape)], axis=1)
            top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
            best_s[j] = np.take_along_axis(all_s, top, axis=1)
            best_i[j] = np.take_along_axis(all_i, top, axis=1)
    return [np.where(np.isfinite(s), i, -1) for s, i in zip(best_s, best_i, strict=True)]
