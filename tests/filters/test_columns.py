"""filters.columns: appends, compaction with take(), the row-mask primitives, and their caching."""

from __future__ import annotations

import pickle
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import filters.columns as columns_module
from filters import Condition, TagColumns, TagError, evaluate
from tests.filters.reference import reference_evaluate
from tests.filters.strategies import probes, rows, seen_in, trees


def columns_of(tag_rows: list[dict[str, Any]]) -> TagColumns:
    columns = TagColumns()
    columns.extend(tag_rows)
    return columns


# --- appends -----


def test_append_returns_consecutive_slots() -> None:
    columns = TagColumns()

    assert [columns.append({"a": i}) for i in range(3)] == [0, 1, 2]
    columns.extend([{}, {"b": "x"}])
    assert columns.append({}) == 5
    assert len(columns) == 6


def test_extend_takes_any_iterable() -> None:
    columns = TagColumns()

    columns.extend({"n": i} for i in range(4))

    assert evaluate(Condition("n", ">=", 2), columns).tolist() == [False, False, True, True]


BAD_TAGS = [
    ({"a": None}, "tags.a"),
    ({"a": {"b": 1}}, "tags.a"),
    ({"a": [1, [2]]}, "tags.a[1]"),
    ({"a": ["x", None]}, "tags.a[1]"),
    ({"a": float("nan")}, "tags.a"),
    ({"a": [float("-inf")]}, "tags.a[0]"),
    ({"a": 10**400}, "tags.a"),
    ({"a": ("x",)}, "tags.a"),
    ({"a b": None}, 'tags["a b"]'),
    ({"": 1}, "tags"),
    ({1: 1}, "tags"),
    (["a", 1], "tags"),
]


@pytest.mark.parametrize(("tags", "path"), BAD_TAGS, ids=repr)
def test_append_rejects_values_without_a_meaning(tags: Any, path: str) -> None:
    columns = columns_of([{"a": "x"}])

    with pytest.raises(TagError) as caught:
        columns.append({"ok": 1, **tags} if isinstance(tags, dict) else tags)

    assert caught.value.path == path
    assert len(columns) == 1  # nothing of the bad record was stored
    assert evaluate(Condition("ok", "=", 1), columns).tolist() == [False]


def test_extend_is_all_or_nothing() -> None:
    good = [{"a": "x", "n": i, "l": ["p", "q"]} for i in range(10)]
    columns = columns_of(good[:3])

    # A tiny flush threshold, so that part of the failed batch had already reached the numpy buffers.
    with mock.patch.object(columns_module, "_FLUSH_EVERY", 2), pytest.raises(TagError) as caught:
        columns.extend([*good[3:], {"a": None}])

    assert caught.value.path == "tags[7].a"
    assert len(columns) == 3
    for node in (Condition("a", "=", "x"), Condition("n", ">", 1), Condition("l", "in", ("q",))):
        assert evaluate(node, columns).tolist() == reference_evaluate(node, good[:3])
    assert columns.append({"n": 99}) == 3
    assert evaluate(Condition("n", "=", 99), columns).tolist() == [False, False, False, True]


def test_numbers_are_float64() -> None:
    columns = columns_of([{"n": 2**53 + 1}, {"n": 50}, {"n": 50.0}])

    # Documented: integers beyond 2**53 lose precision.
    assert evaluate(Condition("n", "=", 2**53), columns).tolist() == [True, False, False]
    assert evaluate(Condition("n", "=", 50), columns).tolist() == [False, True, True]


# --- the row-mask primitives -----

# The same values in three layouts: one value per row (entries are rows), some rows only, and lists.
LAYOUTS: dict[str, list[dict[str, Any]]] = {
    "full": [{"s": "a"}, {"s": "b"}, {"s": "c"}, {"s": "d"}, {"s": "e"}, {"s": "f"}],
    "partial": [{"s": "a"}, {}, {"s": "c"}, {"s": 1}, {"s": "e"}, {"s": "f"}],
    "lists": [{"s": ["a", "b"]}, {"s": []}, {"s": ["c", "c"]}, {"s": "d"}, {"s": ["e", 1]}, {"s": ["f"]}],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "wanted",
    [[], ["a"], ["c", "z"], ["a", "c", "e"], ["a", "b", "c", "d", "e"], list("abcdef"), ["A"]],
    ids=repr,
)
def test_rows_string_in(layout: str, wanted: list[str]) -> None:
    tag_rows = LAYOUTS[layout]
    node = Condition("s", "in", tuple(wanted))

    result = columns_of(tag_rows).rows_string_in("s", wanted)

    assert result.tolist() == reference_evaluate(node, tag_rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_string_where(layout: str) -> None:
    columns = columns_of(LAYOUTS[layout])

    assert columns.rows_string_where("s", lambda text: text >= "c").tolist() == reference_evaluate(
        Condition("s", ">=", "c"), LAYOUTS[layout]
    )
    assert not columns.rows_string_where("s", lambda text: False).any()
    assert not columns.rows_string_where("missing", lambda text: True).any()


def test_rows_number_where() -> None:
    columns = columns_of([{"n": 1}, {"n": [2, 3.5]}, {"n": "4"}, {}, {"n": True}])

    assert columns.rows_number_where("n", lambda numbers: numbers > 2).tolist() == [
        False,
        True,
        False,
        False,
        False,
    ]
    assert not columns.rows_number_where("missing", lambda numbers: numbers > 0).any()


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ([], [False, False, False, False, False]),
        ([True], [True, False, True, False, False]),
        ([False], [False, True, True, False, False]),
        ([True, False], [True, True, True, False, False]),
    ],
)
def test_rows_bool_in(wanted: list[bool], expected: list[bool]) -> None:
    columns = columns_of([{"f": True}, {"f": False}, {"f": [False, True]}, {"f": 1}, {}])

    assert columns.rows_bool_in("f", wanted).tolist() == expected


# --- take() -----


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_take_keeps_evaluation_consistent(data: st.DataObject) -> None:
    tag_rows = data.draw(rows)
    order = data.draw(st.permutations(range(len(tag_rows))))
    slots = order[: data.draw(st.integers(0, len(tag_rows)))]
    more_rows = data.draw(rows)
    tree = data.draw(trees(seen=seen_in(tag_rows + more_rows)))
    columns = columns_of(tag_rows)
    before = evaluate(tree, columns)

    taken = columns.take(np.array(slots, dtype=np.int64))
    kept_rows = [tag_rows[slot] for slot in slots]

    assert len(taken) == len(slots)
    assert evaluate(tree, taken).tolist() == before[slots].tolist() == reference_evaluate(tree, kept_rows)
    for probe in probes(tag_rows):
        assert evaluate(probe, taken).tolist() == reference_evaluate(probe, kept_rows), probe
    assert evaluate(tree, columns).tolist() == before.tolist()  # the original is unchanged
    with pytest.raises(TagError):
        taken.extend([*more_rows, {"a": None}])  # rolled back, on reordered storage too
    taken.extend(more_rows)  # a compacted storage keeps growing normally
    assert evaluate(tree, taken).tolist() == reference_evaluate(tree, kept_rows + more_rows)


def test_take_everything_and_nothing() -> None:
    columns = columns_of([{"a": "x"}, {"a": ["y", "x"]}, {"b": 1}])

    assert repr(columns.take(np.array([], dtype=np.int64))) == "TagColumns(0 slots, 0 fields)"
    assert repr(columns.take(np.arange(3))) == "TagColumns(3 slots, 2 fields)"
    assert evaluate(Condition("a", "=", "x"), columns.take(np.array([2, 1, 0]))).tolist() == [
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    "slots",
    [
        np.array([[0, 1]]),
        np.array([0.0, 1.0]),
        np.array([True, False, True]),
        np.array([0, 3]),
        np.array([-1]),
        np.array([1, 1]),
        np.array([0, 2, 0]),
    ],
    ids=repr,
)
def test_take_rejects_bad_slots(slots: np.ndarray) -> None:
    columns = columns_of([{"a": 1}, {"a": 2}, {"a": 3}])

    with pytest.raises(ValueError, match="slots"):
        columns.take(slots)


# --- caching: appends after a read -----


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_appending_after_evaluation(data: st.DataObject) -> None:
    first, then = data.draw(rows), data.draw(rows)
    tree = data.draw(trees(seen=seen_in(first + then)))
    columns = columns_of(first)
    assert evaluate(tree, columns).tolist() == reference_evaluate(tree, first)

    for count, tags in enumerate(then, start=1):
        columns.append(tags)
        seen = first + then[:count]
        assert evaluate(tree, columns).tolist() == reference_evaluate(tree, seen)
    for probe in probes(first + then):
        assert evaluate(probe, columns).tolist() == reference_evaluate(probe, first + then), probe


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_small_flush_threshold(data: st.DataObject) -> None:
    batches = data.draw(st.lists(rows, min_size=1, max_size=4))
    tree = data.draw(trees(seen=seen_in([tags for batch in batches for tags in batch])))
    # Entries reach the numpy buffers mid-append as well as on read; both paths must agree.
    with mock.patch.object(columns_module, "_FLUSH_EVERY", 3):
        columns = TagColumns()
        seen: list[dict[str, Any]] = []
        for batch in batches:
            columns.extend(batch)
            seen += batch
            assert evaluate(tree, columns).tolist() == reference_evaluate(tree, seen)


def test_pickles_leave_the_string_kernels_arrays_out_and_old_pickles_load() -> None:
    columns = TagColumns()
    columns.extend({"s": text, "l": [text, "x"]} for text in ["red", "navy blue", "a\x00", "é"])
    condition = Condition("s", "contains", "e")
    before = evaluate(condition, columns).tolist()
    evaluate(Condition("l", ">", "b"), columns)  # builds both kinds of cache
    column = columns._columns[("s", "str")]
    assert not columns_module._CACHES & set(column.__getstate__())

    loaded = pickle.loads(pickle.dumps(columns, protocol=pickle.HIGHEST_PROTOCOL))
    assert evaluate(condition, loaded).tolist() == before

    # A column pickled by an earlier version (default slots state, no cache fields) still evaluates.
    kept = [name for name in column.__slots__ if name not in columns_module._CACHES]
    old_state = (None, {name: getattr(column, name) for name in kept})
    revived = columns_module._Column.__new__(columns_module._Column)
    revived.__setstate__(old_state)
    columns._columns[("s", "str")] = revived
    assert evaluate(condition, columns).tolist() == before
