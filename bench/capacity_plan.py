"""Capacity plan for a large library (docs/capacity.md): nodes, RAM, disk, shards, replicas, build time
and query latency per index kind, from figures measured by the benchmarks and a few stated assumptions.

    python bench/capacity_plan.py bench/results/capacity_inputs.json            # markdown table
    python bench/capacity_plan.py bench/results/capacity_inputs.json --json     # every computed figure

The input JSON has two sections: ``measured`` (figures taken from benchmark results on this project's
machine, each with its source) and ``assumed`` (the target deployment: library size, node size,
replicas, limits). Formulas (per kind k; N images, R replicas of every shard):

    ram_per_vector[k]  = index_bytes[k] + table_bytes                (resident, per replica)
    shard_build_h(r)   = r * build_s_per_M[k] / 1e6 * measured_cores / build_cores
                         * scale_build[k](r / build_rows[k]) / 3600
    shard_p50(r)       = p50[k] * scale_latency[k](r / p50_rows[k])
    S[k]               = the smallest S whose shards (r = N / S rows each) meet every limit:
                         r * ram_per_vector[k] <= shard_ram_fraction * node_ram * usable_fraction,
                         shard_build_h(r) <= max_shard_build_hours, shard_p50(r) <= max_shard_p50_ms
    ram_total          = R * N * ram_per_vector[k]
    nodes              = max(R, ceil(ram_total / (node_ram * usable_fraction)),
                             ceil(R * S / shard_readers_per_node))
    disk_per_node      = R * N * snapshot_bytes[k] / nodes        (each replica's local snapshot cache)
    disk_primary       = N * (record_bytes + snapshot_bytes[k])   (PostgreSQL rows, object-store snapshots)
    build_core_h       = S * shard_build_h(N / S) * build_cores
    build_wall_h       = S * shard_build_h(N / S)                 (one writer, one snapshot at a time:
                                                                   what the code does today)
    build_wall_h_par   = ceil(S / parallel_builders) * shard_build_h(N / S)   (not built: shards built
                                                                   on several nodes at once)
    search_p50         = shard_p50(N / S) * straggler(S) + merge_ms_per_shard * S + hop_ms
    straggler(S)       = 1 + (measured_ratio - 1) * log2(S) / log2(S_measured)
                         (measured_ratio: slowest-of-S shard + merge over one shard call, at S_measured)
    scale: linear (flat scan), sqrt (IVF: ~sqrt(n) lists), log (HNSW), const

Build-time scaling with cores (``build_cores``/``measured_cores``) and the per-hop latency are
assumptions, not measurements; so is everything under ``assumed``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def scale(kind: str, ratio: float) -> float:
    """How a kind's per-shard cost grows with its rows (``ratio`` = rows / measured rows): ``linear``
    (a flat scan), ``sqrt`` (IVF: lists ~ sqrt(n), so a search scans and an add assigns against ~sqrt(n)
    per vector), ``log`` (HNSW: graph depth), ``const``."""
    if kind == "linear":
        return ratio
    if kind == "sqrt":
        return math.sqrt(ratio)
    if kind == "log":
        return max(1.0 + math.log(max(ratio, 1e-9)) / math.log(1e6), 0.1)  # log(n) / log(n0), n0 ~ 1M
    if kind == "const":
        return 1.0
    raise ValueError(f"unknown scaling {kind!r}")


def plan(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per index kind: the smallest shard count meeting every per-shard limit, and its cost."""
    m, a = inputs["measured"], inputs["assumed"]
    n = float(a["images"])
    replicas = int(a["replicas"])
    usable = a["node_ram_gib"] * GIB * a["usable_ram_fraction"]
    fan = m["fanout"]
    rows = []
    for kind, k in m["kinds"].items():
        ram_pv = k["index_bytes_per_vector"] + m["table_bytes_per_vector"]

        def build_h(shard_rows: float, k: dict[str, Any] = k) -> float:
            per_vector = k["build_s_per_million"] / 1e6 * m["measured_cores"] / a["build_cores"]
            return shard_rows * per_vector * scale(k["build_scaling"], shard_rows / k["build_rows"]) / 3600

        def shard_p50(shard_rows: float, k: dict[str, Any] = k) -> float:
            return k["p50_ms"] * scale(k["latency_scaling"], shard_rows / k["p50_rows"])

        limits = {
            "ram": lambda r, ram_pv=ram_pv: r * ram_pv <= a["shard_ram_fraction"] * usable,
            "build time": lambda r: build_h(r) <= a["max_shard_build_hours"],
            "latency": lambda r: shard_p50(r) <= a["max_shard_p50_ms"],
        }
        shards, limited_by = 1, "none"
        while shards < 100_000:
            failing = [name for name, ok in limits.items() if not ok(n / shards)]
            if not failing:
                break
            limited_by = failing[0]
            shards += 1
        shard_rows = n / shards
        ram_total = replicas * n * ram_pv
        nodes = max(
            replicas,
            math.ceil(ram_total / usable),
            math.ceil(replicas * shards / a["shard_readers_per_node"]),
        )
        straggler = 1.0
        if shards > 1:
            straggler = 1 + (fan["straggler_ratio"] - 1) * math.log2(shards) / math.log2(
                fan["measured_shards"]
            )
        rows.append(
            {
                "kind": kind,
                "ram_bytes_per_vector": round(ram_pv, 1),
                "shards": shards,
                "shards_over_limit": shards > a["max_shards"],
                "shard_rows_m": round(shard_rows / 1e6, 2),
                "limited_by": limited_by,
                "replicas": replicas,
                "ram_total_gib": round(ram_total / GIB, 1),
                "nodes": nodes,
                "ram_per_node_gib": round(ram_total / nodes / GIB, 1),
                "disk_per_node_gib": round(replicas * n * k["snapshot_bytes_per_vector"] / nodes / GIB, 1),
                "disk_primary_gib": round(
                    n * (m["record_bytes_per_vector"] + k["snapshot_bytes_per_vector"]) / GIB, 1
                ),
                "build_core_hours": round(shards * build_h(shard_rows) * a["build_cores"], 1),
                "shard_build_h": round(build_h(shard_rows), 2),
                "build_wall_h_one_writer": round(shards * build_h(shard_rows), 1),
                "build_wall_h_parallel": round(
                    math.ceil(shards / a["parallel_builders"]) * build_h(shard_rows), 1
                ),
                "shard_p50_ms": round(shard_p50(shard_rows), 2),
                "search_p50_ms": round(
                    shard_p50(shard_rows) * straggler + fan["merge_ms_per_shard"] * shards + a["hop_ms"], 2
                ),
            }
        )
    return rows


COLUMNS = [
    ("kind", "kind"),
    ("ram_bytes_per_vector", "RAM B/vector"),
    ("shards", "shards"),
    ("shard_rows_m", "rows/shard (M)"),
    ("limited_by", "shard size set by"),
    ("replicas", "replicas"),
    ("ram_total_gib", "RAM total GiB"),
    ("nodes", "nodes"),
    ("ram_per_node_gib", "RAM/node GiB"),
    ("disk_per_node_gib", "disk/node GiB"),
    ("disk_primary_gib", "primary storage GiB"),
    ("build_core_hours", "build core-h"),
    ("build_wall_h_one_writer", "build wall h (one writer)"),
    ("build_wall_h_parallel", "build wall h (parallel)"),
    ("search_p50_ms", "search p50 ms"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = (
        "|" + "|".join("---" if key == "kind" or key == "limited_by" else "---:" for key, _ in COLUMNS) + "|"
    )
    body = []
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            if key == "shards" and r["shards_over_limit"]:
                v = f"{v} (> max)"
            cells.append(f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--json", action="store_true", help="every computed figure, as JSON")
    args = parser.parse_args()
    rows = plan(json.loads(args.inputs.read_text()))
    sys.stdout.write((json.dumps(rows, indent=1) if args.json else markdown(rows)) + "\n")


if __name__ == "__main__":
    main()
