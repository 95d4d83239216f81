"""filters.evaluate: the tag_filter semantics, by example and against the naive reference evaluator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters import And, Condition, Or, TagColumns, evaluate, parse_filter
from tests.filters.reference import reference_evaluate
from tests.filters.strategies import (
    conditions,
    probes,
    rows,
    rows_and_condition,
    rows_and_tree,
    seen_in,
    trees,
)

ROWS: list[dict[str, Any]] = [
    {"price": 50, "color": "red", "season": "summer", "sale": True},  # 0
    {"price": 50.0, "color": "Red", "sizes": ["S", "M"]},  # 1
    {"price": "50", "color": ["blue", "red"], "sale": 1},  # 2
    {"sale": False, "color": "navy blue", "sizes": []},  # 3
    {},  # 4
    {"price": 200, "color": "white", "name": "Zebra"},  # 5
    {"name": "éclair", "code": "a\x00"},  # 6
]
ALL = set(range(len(ROWS)))


def c(field: str, op: str, value: Any) -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


EXAMPLES = [
    # rule 1: no coercion; ints equal floats; booleans are not numbers
    (c("price", "=", 50), {0, 1}),
    (c("price", "=", 50.0), {0, 1}),
    (c("price", "=", "50"), {2}),
    (c("price", "in", [50, "50"]), {0, 1, 2}),
    (c("sale", "=", True), {0}),
    (c("sale", "=", 1), {2}),
    (c("sale", "in", [True]), {0}),
    (c("sale", "in", [True, False]), {0, 3}),
    (c("price", "in", [True]), set()),
    # ordered: numbers numerically, strings by code point, never across kinds
    (c("price", ">", 49), {0, 1, 5}),
    (c("price", ">=", 50), {0, 1, 5}),
    (c("price", "<", 50), set()),
    (c("price", "<=", 100), {0, 1}),
    (c("price", ">", 100), {5}),
    (c("price", ">=", "5"), {2}),
    (c("name", "<", "a"), {5}),  # 'Z' (90) sorts before 'a' (97)
    (c("name", ">", "z"), {6}),  # 'é' (233) sorts after 'z' (122)
    (c("code", ">", "a"), {6}),  # a trailing NUL still counts
    (c("code", "=", "a"), set()),
    (c("code", "=", "a\x00"), {6}),
    # rule 2: negations are complements (missing field and other kinds included)
    (c("sale", "!=", True), ALL - {0}),
    (c("price", "!=", 50), ALL - {0, 1}),
    (c("color", "!=", "red"), {1, 3, 4, 5, 6}),
    (c("nope", "=", "x"), set()),
    (c("nope", "!=", "x"), ALL),
    (c("nope", "not contains", "x"), ALL),
    (c("nope", "not in", ["x"]), ALL),
    # rule 3: lists match when ANY element does, negations when NO element does
    (c("color", "=", "red"), {0, 2}),
    (c("color", "in", ["red", "Red"]), {0, 1, 2}),
    (c("color", "not in", ["red", "Red"]), {3, 4, 5, 6}),
    (c("sizes", "=", "S"), {1}),
    (c("sizes", "!=", "S"), ALL - {1}),  # an empty list matches no element
    (c("sizes", "not in", ["S", "M"]), ALL - {1}),
    # contains: a substring of a string tag, case-sensitive
    (c("color", "contains", "red"), {0, 2}),
    (c("color", "contains", "Re"), {1}),
    (c("color", "contains", "blue"), {2, 3}),
    (c("color", "not contains", "blue"), {0, 1, 4, 5, 6}),
    (c("color", "contains", ""), {0, 1, 2, 3, 5}),
    (c("price", "contains", "5"), {2}),
    # rule 4: empty lists and groups
    (c("color", "in", []), set()),
    (c("color", "not in", []), ALL),
    ([], ALL),
    ({"or": []}, set()),
    ([{"or": []}], set()),
    ({"or": [[]]}, ALL),
    (None, ALL),
    # combinations
    ([c("color", "in", ["red", "blue"]), c("season", "=", "summer")], {0}),
    ([c("price", ">=", 50), c("price", "<=", 200)], {0, 1, 5}),
    ({"or": [c("color", "=", "white"), c("sale", "=", False)]}, {3, 5}),
    ([c("color", "!=", "pants"), {"or": [c("color", "=", "red"), c("name", "=", "Zebra")]}], {0, 2, 5}),
]


@pytest.mark.parametrize(("raw", "expected"), EXAMPLES, ids=lambda value: repr(value)[:70])
def test_semantics_by_example(raw: Any, expected: set[int]) -> None:
    columns = TagColumns()
    columns.extend(ROWS)
    node = parse_filter(raw)
    want = [i in expected for i in range(len(ROWS))]

    assert reference_evaluate(node, ROWS) == want  # the oracle agrees with the spec...
    assert evaluate(node, columns).tolist() == want  # ...and so does the vectorised evaluator


def test_ordered_operators_are_not_complements() -> None:
    columns = TagColumns()
    columns.extend(ROWS)

    above = evaluate(Condition("price", ">", 100), columns)
    at_most = evaluate(Condition("price", "<=", 100), columns)

    assert not (above | at_most).all()  # a string price, or none, fails both


def test_no_filter_and_empty_storage() -> None:
    columns = TagColumns()

    assert evaluate(None, columns).shape == (0,)
    assert evaluate(Condition("a", "!=", 1), columns).shape == (0,)

    columns.extend([{}, {}])
    result = evaluate(None, columns)
    assert result.dtype == np.bool_
    assert result.tolist() == [True, True]


@pytest.mark.parametrize(
    "node",
    [
        Condition("flag", "=", True),
        Condition("flag", "in", (True, False)),
        Condition("color", "=", "red"),
        Condition("color", "in", ("red", "blue")),
        Condition("n", ">", 0),
    ],
)
def test_results_are_independent_of_the_storage(node: Condition) -> None:
    columns = TagColumns()
    columns.extend([{"flag": True, "color": "red", "n": 1}, {"flag": False, "color": "blue", "n": 2}])
    first = evaluate(node, columns)
    expected = first.copy()

    first[:] = ~first  # a caller may reuse its mask in place
    assert evaluate(node, columns).tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("node", "error"),
    [
        ("not a node", TypeError),
        (And(("nope",)), TypeError),  # type: ignore[arg-type]
        (Condition("a", "like", "x"), ValueError),
        (Condition("a", ">", True), ValueError),
        (Condition("a", "contains", 5), ValueError),
        (Condition("a", "=", float("nan")), ValueError),
        (Condition("a", "=", 10**400), ValueError),
        (Condition("a", "in", "abc"), ValueError),
        (Condition("a", "in", (None,)), ValueError),  # type: ignore[arg-type]
        (Condition("a", "=", None), ValueError),  # type: ignore[arg-type]
    ],
)
def test_hand_built_nodes_are_checked(node: Any, error: type[Exception]) -> None:
    columns = TagColumns()
    columns.append({"a": "x"})

    with pytest.raises(error):
        evaluate(node, columns)


# --- properties -----

NEGATION = {"=": "!=", "!=": "=", "contains": "not contains", "not contains": "contains", "in": "not in"}
NEGATION["not in"] = "in"


def negate(node: Any) -> Any:
    """NOT node, pushed down to the conditions by De Morgan (only for operators that have a negation)."""
    if isinstance(node, Condition):
        return Condition(node.field, NEGATION[node.op], node.value)
    if isinstance(node, And):
        return Or(tuple(negate(child) for child in node.children))
    return And(tuple(negate(child) for child in node.children))


def columns_of(tag_rows: list[dict[str, Any]]) -> TagColumns:
    columns = TagColumns()
    columns.extend(tag_rows)
    return columns


@settings(max_examples=300, deadline=None)
@given(rows_and_tree())
def test_vectorised_matches_reference(case: tuple[list[dict[str, Any]], Any]) -> None:
    tag_rows, tree = case

    assert evaluate(tree, columns_of(tag_rows)).tolist() == reference_evaluate(tree, tag_rows)


@settings(max_examples=150, deadline=None)
@given(rows)
def test_every_operator_on_every_stored_value_matches_reference(tag_rows: list[dict[str, Any]]) -> None:
    columns = columns_of(tag_rows)

    for probe in probes(tag_rows):
        assert evaluate(probe, columns).tolist() == reference_evaluate(probe, tag_rows), probe


@settings(max_examples=150, deadline=None)
@given(rows_and_condition(("=", "contains", "in")))
def test_negated_operators_are_exact_complements(case: tuple[list[dict[str, Any]], Condition]) -> None:
    tag_rows, positive = case
    columns = columns_of(tag_rows)
    negated = Condition(positive.field, NEGATION[positive.op], positive.value)

    assert evaluate(negated, columns).tolist() == (~evaluate(positive, columns)).tolist()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_de_morgan_for_two_conditions(data: st.DataObject) -> None:
    tag_rows = data.draw(rows)
    a, b = data.draw(st.lists(conditions(tuple(NEGATION), seen_in(tag_rows)), min_size=2, max_size=2))
    columns = columns_of(tag_rows)

    not_a_and_b = ~evaluate(And((a, b)), columns)
    not_a_or_not_b = evaluate(Or((negate(a), negate(b))), columns)
    not_a_or_b = ~evaluate(Or((a, b)), columns)
    not_a_and_not_b = evaluate(And((negate(a), negate(b))), columns)

    assert not_a_and_b.tolist() == not_a_or_not_b.tolist()
    assert not_a_or_b.tolist() == not_a_and_not_b.tolist()


@settings(max_examples=150, deadline=None)
@given(rows_and_tree(tuple(NEGATION)))
def test_de_morgan_for_trees(case: tuple[list[dict[str, Any]], Any]) -> None:
    tag_rows, tree = case
    columns = columns_of(tag_rows)

    assert evaluate(negate(tree), columns).tolist() == (~evaluate(tree, columns)).tolist()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_and_or_combine_child_masks(data: st.DataObject) -> None:
    tag_rows = data.draw(rows)
    children = data.draw(st.lists(trees(seen=seen_in(tag_rows)), min_size=1, max_size=3))
    columns = columns_of(tag_rows)
    masks = [evaluate(child, columns) for child in children]

    assert evaluate(And(tuple(children)), columns).tolist() == np.logical_and.reduce(masks).tolist()
    assert evaluate(Or(tuple(children)), columns).tolist() == np.logical_or.reduce(masks).tolist()


# --- the numpy string kernels (contains, string order) against the reference, on random text -----

# NUL (numpy pads with it), non-ASCII of 2, 3 and 4 UTF-8 bytes, lone surrogates (UTF-8 cannot encode
# them: the kernels test those strings in Python), and lengths across several bucket widths.
_ALPHABET = st.sampled_from(["a", "b", "\x00", "é", "€", "😀", "\ud800", "\udfff", "Z"])
_texts = st.lists(_ALPHABET, max_size=40).map("".join)
_text_rows = st.lists(
    st.dictionaries(st.sampled_from(["s", "t"]), st.one_of(_texts, st.lists(_texts, max_size=3)), max_size=2),
    max_size=25,
)
_STRING_OPS = ("contains", "not contains", ">", ">=", "<", "<=")


@st.composite
def _text_case(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Condition]:
    first: list[dict[str, Any]] = draw(_text_rows)
    later: list[dict[str, Any]] = draw(_text_rows)
    stored: list[str] = [text for _, text in seen_in(first + later)]
    value: str = draw(st.one_of(_texts, st.sampled_from(stored)) if stored else _texts)
    substring: bool = draw(st.booleans())
    if stored and substring:  # a substring of a stored string: matches are common
        whole: str = draw(st.sampled_from(stored))
        start = draw(st.integers(0, len(whole)))
        value = whole[start : draw(st.integers(start, len(whole)))]
    field = draw(st.sampled_from(["s", "t", "missing"]))
    return first, later, Condition(field, draw(st.sampled_from(_STRING_OPS)), value)


@settings(max_examples=400, deadline=None)
@given(_text_case())
def test_string_kernels_match_the_reference_on_random_text(case: Any) -> None:
    first, later, condition = case
    columns = TagColumns()
    columns.extend(first)
    assert evaluate(condition, columns).tolist() == reference_evaluate(condition, first)
    # Strings added after a first evaluation reach the kernels' arrays too.
    columns.extend(later)
    assert evaluate(condition, columns).tolist() == reference_evaluate(condition, first + later)
    # And a compacted copy (a re-coded dictionary) answers the same for the rows it keeps.
    keep = np.arange(len(first + later))[::2]
    kept = [(first + later)[i] for i in keep]
    assert evaluate(condition, columns.take(keep)).tolist() == reference_evaluate(condition, kept)


@pytest.mark.parametrize(
    ("needle", "expected"),
    [
        ("\x00", {0, 2, 3}),  # numpy's find drops a needle's trailing NULs: these take the Python path
        ("a\x00", {0, 2}),
        ("\x00b", {2}),
        ("é", {4}),
        ("\ud800", {5}),  # only a string UTF-8 cannot encode may hold a lone surrogate
        ("", {0, 1, 2, 3, 4, 5, 6}),
    ],
)
def test_contains_edge_cases(needle: str, expected: set[int]) -> None:
    texts = ["a\x00", "a", "xa\x00b", "\x00", "é", "x\ud800", ""]
    columns = TagColumns()
    columns.extend({"s": text} for text in texts)
    mask = evaluate(Condition("s", "contains", needle), columns)
    assert set(np.flatnonzero(mask).tolist()) == expected


def test_string_order_is_by_code_point_with_nul_and_surrogates() -> None:
    texts = ["a", "a\x00", "b", "\ud7ff", "\ud800", "\ue000", "😀", ""]
    columns = TagColumns()
    columns.extend({"s": text} for text in texts)
    for bound in texts:
        for op in (">", ">=", "<", "<="):
            condition = Condition("s", op, bound)
            rows = [{"s": text} for text in texts]
            assert evaluate(condition, columns).tolist() == reference_evaluate(condition, rows), (op, bound)


def test_number_in_list_matches_isin() -> None:
    rng = np.random.default_rng(7)
    values = [*rng.integers(-50, 50, 500).astype(float).tolist(), 0.0, -0.0, 2.5]
    columns = TagColumns()
    columns.extend({"n": value} for value in values)
    wanted = (-0.0, 3, 2.5, 49, 1000, *range(-40, 40, 7))
    mask = evaluate(Condition("n", "in", wanted), columns)
    assert mask.tolist() == np.isin(np.array(values), np.array(wanted, dtype=float)).tolist()
