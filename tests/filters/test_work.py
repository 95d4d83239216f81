"""filters.work: a filter's cost priced against the columns it runs on, and the refusal over the budget."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from filters import FilterError, TagColumns, evaluate, parse_filter
from filters.work import (
    BYTE_WEIGHT,
    DEFAULT_MAX_WORK,
    PYTHON_STRING_WEIGHT,
    SCAN_ENTRY_WEIGHT,
    SEARCH_LEVEL_WEIGHT,
    STRING_WEIGHT,
    check_work,
    filter_work,
)


def columns_of(tag_rows: list[dict[str, Any]]) -> TagColumns:
    columns = TagColumns()
    columns.extend(tag_rows)
    return columns


def cond(field: str, op: str, value: Any) -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


# 4 rows: "s" one string each (3 distinct, 9 characters), "l" a list (5 entries), "n" a number (3 rows).
ROWS = [
    {"s": "abc", "l": ["x", "yy"], "n": 1, "b": True},
    {"s": "def", "l": ["x"], "n": 2},
    {"s": "abc", "l": [], "n": 3.5},
    {"s": "ghi", "l": ["zzz", "x"], "b": False},
]


def test_field_size_counts_entries_distinct_strings_and_characters() -> None:
    columns = columns_of(ROWS)
    assert columns.field_size("s", "str") == (4, 3, 9)
    assert columns.field_size("l", "str") == (5, 3, 6)
    assert columns.field_size("n", "num") == (3, 0, 0)
    assert columns.field_size("b", "bool") == (2, 0, 0)
    assert columns.field_size("n", "str") == (0, 0, 0)
    assert columns.field_size("missing", "str") == (0, 0, 0)


def test_field_size_survives_take_and_pickle() -> None:
    columns = columns_of(ROWS)
    taken = columns.take(np.array([1, 3]))  # "abc" no longer used: the dictionary shrinks
    assert taken.field_size("s", "str") == (2, 2, 6)
    restored = pickle.loads(pickle.dumps(columns))
    assert restored.field_size("s", "str") == (4, 3, 9)


def test_old_pickles_without_the_character_count_recount_it() -> None:
    columns = columns_of(ROWS)
    column = columns._columns[("s", "str")]
    state = column.__getstate__()
    del state["chars"]
    column.__setstate__(state)
    assert columns.field_size("s", "str") == (4, 3, 9)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 0),
        ([], 4),  # an empty list: one pass over the 4 rows
        (cond("s", "=", "abc"), 4 + 4),  # the rows, then one equality pass over the 4 entries
        (cond("l", "!=", "x"), 4 + 5),
        (cond("l", "in", ["x", "yy"]), 4 + 2 * 5),  # one pass per string value...
        (cond("l", "in", [str(i) for i in range(9)]), 4 + 4 * 5),  # ...up to 4 (then one gather)
        (cond("n", "in", [1, 2, 3, 4]), 4 + 3 * (1 + SEARCH_LEVEL_WEIGHT * 2)),  # binary search, 2 levels
        (cond("n", "in", [1, "x", True]), 4 + 3),  # each kind over its own column: "n" has numbers only
        (cond("l", "in", ["x", 1, True]), 4 + 5),
        (cond("n", ">", 1), 4 + 3),
        (cond("s", "contains", "b"), 4 + BYTE_WEIGHT * 9 + STRING_WEIGHT * 3 + SCAN_ENTRY_WEIGHT * 4),
        (cond("l", "<", "y"), 4 + BYTE_WEIGHT * 6 + STRING_WEIGHT * 3 + SCAN_ENTRY_WEIGHT * 5),
        (
            cond("s", "not contains", "b\x00"),
            4 + BYTE_WEIGHT * 9 + STRING_WEIGHT * 3 + SCAN_ENTRY_WEIGHT * 4 + PYTHON_STRING_WEIGHT * 3,
        ),
        (cond("missing", "contains", "b"), 4),  # no column: nothing but the rows
        ([cond("s", "=", "abc"), {"or": [cond("n", ">", 1)]}], 4 + 8 + 4 + 7),  # nodes add up
    ],
)
def test_filter_work(raw: Any, expected: int) -> None:
    assert filter_work(parse_filter(raw), columns_of(ROWS)) == expected


def test_check_work_allows_the_budget_and_refuses_one_unit_more() -> None:
    columns = columns_of(ROWS)
    node = parse_filter([cond("s", "contains", "b"), cond("n", "=", 2)])
    work = filter_work(node, columns)
    assert check_work(node, columns, work) == work
    with pytest.raises(FilterError) as caught:
        check_work(node, columns, work - 1)
    assert caught.value.path == "tag_filter"
    assert f"budget of {work - 1:,} (max_filter_work)" in caught.value.reason
    assert f"about {work:,} work units" in caught.value.reason


def test_the_same_filter_passes_a_small_column_set_and_is_refused_over_a_huge_distinct_set() -> None:
    """The data decides: 7 `contains` that max_filter_cost allows cost ~300 ms over 1M distinct strings
    of 32 characters (bench/README.md), and are refused there by the default budget."""
    node = parse_filter([cond("s", "contains", "abc") for _ in range(7)])  # within max_filter_cost
    small = columns_of([{"s": f"catalogue-{i % 50}"} for i in range(1000)])
    assert check_work(node, small, DEFAULT_MAX_WORK) < DEFAULT_MAX_WORK // 1000
    assert evaluate(node, small).shape == (1000,)
    huge = TagColumns()  # 1M distinct strings of 32 characters, one per row
    huge.extend({"s": f"{i:032d}"} for i in range(1_000_000))
    assert huge.field_size("s", "str") == (1_000_000, 1_000_000, 32_000_000)
    with pytest.raises(FilterError, match=r"\(max_filter_work\)"):
        check_work(node, huge, DEFAULT_MAX_WORK)


def test_ordinary_filters_stay_far_below_the_default_budget() -> None:
    """A few conditions on a catalogue's tags, at 1M rows: a small share of the budget."""
    colours = ["red", "green", "blue", "black", "white"]
    columns = TagColumns()
    columns.extend(
        {"colour": colours[i % 5], "brand": f"brand-{i % 2000}", "price": i % 500, "stock": i % 3 == 0}
        for i in range(1_000_000)
    )
    node = parse_filter(
        [
            cond("colour", "in", ["red", "blue"]),
            cond("price", "<", 100),
            cond("stock", "=", True),
            cond("brand", "contains", "brand-1"),
        ]
    )
    assert filter_work(node, columns) < DEFAULT_MAX_WORK // 10


def test_a_hand_built_tree_that_is_not_a_filter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected a filter node"):
        filter_work(("not", "a node"), columns_of(ROWS))  # type: ignore[arg-type]
