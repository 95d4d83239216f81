"""Tag filter evaluation time: issue 26's filter bomb, and the costliest filters the default budget allows.

    PYTHONPATH=. .venv/bin/python bench/filter_bench.py bomb       # 1,000 'contains' of 1,024 chars
    PYTHONPATH=. .venv/bin/python bench/filter_bench.py worst --rows 1000000 --distinct 10000 --length 32

`worst` builds `--rows` rows, each with a string tag `s` (one of `--distinct` random strings of `--length`
lowercase letters), a 2-element list tag `l` of such strings and a number `n` (1,000 distinct), then times
the filters that spend the whole default budget (`FilterLimits().max_cost`) in each kind of condition.
Figures are best of 3 evaluations (filters.evaluate only: no search, no HTTP).
"""

from __future__ import annotations

import argparse
import random
import string
import time
from typing import Any

from filters import FilterLimits, TagColumns, evaluate, parse_filter
from filters.work import DEFAULT_MAX_WORK, filter_work


def _pool(rng: random.Random, count: int, length: int) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=length)) for _ in range(count)]


def _best(node: Any, columns: TagColumns, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(node, columns)
        best = min(best, time.perf_counter() - start)
    return best


def bomb(distincts: list[int], conditions: int) -> None:
    rng = random.Random(0)
    unbudgeted = FilterLimits(max_cost=1_000_000)
    raw = [{"field": "s", "op": "contains", "value": "".join(_pool(rng, 1, 1024))} for _ in range(conditions)]
    node = parse_filter(raw, limits=unbudgeted)
    for distinct in distincts:
        columns = TagColumns()
        columns.extend({"s": text} for text in _pool(rng, distinct, 1024))
        seconds = _best(node, columns, 1)
        print(
            f"bomb: {conditions} x 'contains' over {distinct} distinct strings of 1024 chars: {seconds:.3f} s"
        )
    start = time.perf_counter()
    try:
        parse_filter(raw)
    except ValueError as exc:
        print(f"with the default budget: refused in {1000 * (time.perf_counter() - start):.2f} ms: {exc}")


def worst(rows: int, distinct: int, length: int) -> None:
    rng = random.Random(0)
    pool = _pool(rng, distinct, length)
    columns = TagColumns()
    columns.extend(
        {"s": pool[i % distinct], "l": [pool[i % distinct], pool[(7 * i) % distinct]], "n": i % 1000}
        for i in range(rows)
    )
    budget = FilterLimits().max_cost
    probe = pool[3][5:8]

    def fill(make: Any, unit: int, spare: int = 0) -> list[Any]:
        return [make(i) for i in range((budget - 1 - spare) // unit)]

    filters = {
        "contains on s": fill(lambda i: {"field": "s", "op": "contains", "value": probe}, 8),
        "contains on list l": fill(lambda i: {"field": "l", "op": "contains", "value": probe}, 8),
        "contains on list l, 1 letter (most match)": fill(
            lambda i: {"field": "l", "op": "contains", "value": "abcdefghijklmnopqrstuvwxyz"[i % 26]}, 8
        ),
        "not contains, 1024-char needle": fill(
            lambda i: {"field": "l", "op": "not contains", "value": "q" * 1024}, 8
        ),
        "contains with trailing NUL": fill(lambda i: {"field": "l", "op": "contains", "value": "a\x00"}, 32),
        "string > on l": fill(lambda i: {"field": "l", "op": ">", "value": pool[i]}, 8),
        "number in (1000 values) + =": [
            {"field": "n", "op": "in", "value": list(range(1000))},
            *[{"field": "l", "op": "=", "value": pool[i]} for i in range(budget - 1 - 63)],
        ],
        "= on list l": fill(lambda i: {"field": "l", "op": "=", "value": pool[i]}, 1),
        "nested or of =": [{"or": fill(lambda i: {"field": "l", "op": "!=", "value": pool[i]}, 1, 1)}],
    }
    print(f"worst: {rows} rows, {distinct} distinct strings of {length} chars (s: 1 per row, l: 2 per row)")
    print(f"  (work units against the default max_filter_work of {DEFAULT_MAX_WORK:,})")
    for name, raw in filters.items():
        node = parse_filter(raw)  # within the default budget, or this raises
        work = filter_work(node, columns)
        ms = 1000 * _best(node, columns)
        verdict = "allowed" if work <= DEFAULT_MAX_WORK else "refused"
        print(
            f"  {name}: {len(raw)} top-level nodes: {ms:.1f} ms; {work / 1e6:.1f}M work units "
            f"({1e6 * ms / work:.2f} ns/unit), {verdict}",
            flush=True,
        )
        if work > DEFAULT_MAX_WORK:  # the largest prefix of the same conditions that the budget allows
            allowed = _largest_allowed(raw, columns)
            node = parse_filter(allowed)
            print(
                f"    largest allowed prefix: {len(allowed)} top-level nodes, "
                f"{filter_work(node, columns) / 1e6:.1f}M units: {1000 * _best(node, columns):.1f} ms",
                flush=True,
            )


def _largest_allowed(raw: list[Any], columns: TagColumns) -> list[Any]:
    """The longest prefix of the top-level list `raw` within the default work budget."""
    low, high = 0, len(raw)
    while low < high:
        middle = (low + high + 1) // 2
        if filter_work(parse_filter(raw[:middle]), columns) <= DEFAULT_MAX_WORK:
            low = middle
        else:
            high = middle - 1
    if low == 0 and isinstance(raw[0], dict) and "or" in raw[0]:
        return [{"or": _largest_allowed(raw[0]["or"], columns)}]
    return raw[:low]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["bomb", "worst"])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=10_000)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--bomb-distinct", type=int, nargs="+", default=[2000, 100_000])
    parser.add_argument("--bomb-conditions", type=int, default=1000)
    args = parser.parse_args()
    if args.what == "bomb":
        bomb(args.bomb_distinct, args.bomb_conditions)
    else:
        worst(args.rows, args.distinct, args.length)


if __name__ == "__main__":
    main()
