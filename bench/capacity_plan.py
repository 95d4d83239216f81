"""Capacity plan for a large library (docs/capacity.md): nodes, RAM, disk, shards, replicas, build time
and query latency per index kind, from figures measured by the benchmarks and a few stated assumptions.

    python bench/capacity_plan.py bench/results/capacity_inputs.json            # markdown table
    python bench/capacity_plan.py bench/results/capacity_inputs.json --json     # every computed figure

The input JSON has two sections: ``measured`` (figures taken from benchmark results on this project's
machine, each with its source) and ``assumed`` (the target deployment: library size, node size,
replicas, limits). Formulas (per kind k; N images, R replicas of every shard):

    ram_per_vector[k]  = index_bytes[k] + table_bytes                      (resident, per replica)
    shard_rows_ram     = shard_ram_fraction * node_ram * usable_fraction / ram_per_vector[k]
    shard_rows_build   = max_shard_build_h * 3600 / (build_s_per_M[k] / 1e6 * measured_cores / build_cores)
    S[k]               = ceil(N / min(shard_rows_ram, shard_rows_build))   (at least 1)
    shard_rows         = N / S
    ram_total          = R * N * ram_per_vector[k]
    nodes              = max(R, ceil(ram_total / (node_ram * usable_fraction)),
                             ceil(R * S / max_replicas_per_node))
    disk_per_node      = R * N * snapshot_bytes[k] / nodes      (each replica's local snapshot cache)
    disk_primary       = N * record_bytes                          (PostgreSQL rows + object-store snapshots:
                         + N * snapshot_bytes[k]                    one copy each)
    build_core_h       = N / 1e6 * build_s_per_M[k] * measured_cores / 3600
    build_wall_h       = S * shard_build_h      (one writer, one snapshot at a time: what the code does)
    build_wall_h_par   = ceil(S / builders) * shard_build_h   (if shards were built on `builders` nodes)
    shard_build_h      = shard_rows / 1e6 * build_s_per_M[k] * measured_cores / build_cores / 3600
    shard_p50          = p50[k] * scale(shard_rows / p50_rows[k])  (scale: linear, sqrt or log as stated)
    search_p50         = shard_p50 * straggler(S) + merge_ms + hop_ms
    straggler(S)       = measured critical/shard-call p50 ratio at S_measured, extended as
                         1 + (ratio - 1) * log2(S) / log2(S_measured)

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
    """How a kind's single-shard latency grows with its rows (``ratio`` = rows / measured rows)."""
    if kind == "linear":
        return ratio
    if kind == "sqrt":
        return math.sqrt(ratio)
    if kind == "log":
        return 1.0 + math.log(max(ratio, 1e-9)) / math.log(1e6)  # log(n) / log(n0) at n0 ~ 1M
    raise ValueError(f"unknown latency scaling {kind!r}")


def plan(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    m, a = inputs["measured"], inputs["assumed"]
    n = float(a["images"])
    replicas = int(a["replicas"])
    usable = a["node_ram_gib"] * GIB * a["usable_ram_fraction"]
    fan = m["fanout"]
    rows = []
    for kind, k in m["kinds"].items():
        ram_pv = k["index_bytes_per_vector"] + m["table_bytes_per_vector"]
        build_s_per_vector = k["build_s_per_million"] / 1e6 * m["measured_cores"] / a["build_cores"]
        shard_rows_ram = a["shard_ram_fraction"] * usable / ram_pv
        shard_rows_build = (
            a["max_shard_build_hours"] * 3600 / build_s_per_vector if build_s_per_vector else math.inf
        )
        shards = max(1, math.ceil(n / min(shard_rows_ram, shard_rows_build)))
        shard_rows = n / shards
        ram_total = replicas * n * ram_pv
        nodes = max(
            replicas,
            math.ceil(ram_total / usable),
            math.ceil(replicas * shards / a["max_replicas_per_node"]),
        )
        shard_build_h = shard_rows * build_s_per_vector / 3600
        shard_p50 = k["p50_ms"] * scale(k["latency_scaling"], shard_rows / k["p50_rows"])
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
                "limited_by": "ram" if shard_rows_ram <= shard_rows_build else "build time",
                "replicas": replicas,
                "ram_total_gib": round(ram_total / GIB, 1),
                "nodes": nodes,
                "ram_per_node_gib": round(ram_total / nodes / GIB, 1),
                "disk_per_node_gib": round(replicas * n * k["snapshot_bytes_per_vector"] / nodes / GIB, 1),
                "disk_primary_gib": round(
                    n * (m["record_bytes_per_vector"] + k["snapshot_bytes_per_vector"]) / GIB, 1
                ),
                "build_core_hours": round(n / 1e6 * k["build_s_per_million"] * m["measured_cores"] / 3600, 1),
                "shard_build_h": round(shard_build_h, 2),
                "build_wall_h_one_writer": round(shards * shard_build_h, 1),
                "build_wall_h_parallel": round(math.ceil(shards / a["parallel_builders"]) * shard_build_h, 1),
                "shard_p50_ms": round(shard_p50, 2),
                "search_p50_ms": round(shard_p50 * straggler + fan["merge_ms"] + a["hop_ms"], 2),
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
