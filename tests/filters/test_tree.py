"""filters.tree: the tag_filter grammar, its error paths and messages, and its limits."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings

from filters import OPERATORS, And, Condition, FilterError, FilterLimits, Or, parse_filter
from tests.filters.strategies import to_json, trees

UNKNOWN_OP_MESSAGE = (
    "tag_filter[1].or[0].op: unknown operator 'like'; "
    "expected one of =, !=, >, >=, <, <=, contains, not contains, in, not in"
)


def cond(field: Any, op: Any, value: Any) -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


# --- what parses, and into what -----

SEED_EXAMPLES = [
    pytest.param(
        [cond("color", "in", ["red", "blue"]), cond("season", "=", "summer")],
        And((Condition("color", "in", ("red", "blue")), Condition("season", "=", "summer"))),
        id="search-by-image request",
    ),
    pytest.param(
        [cond("season", "=", "summer"), cond("category", "!=", "pants")],
        And((Condition("season", "=", "summer"), Condition("category", "!=", "pants"))),
        id="search-by-text request",
    ),
    pytest.param(
        [cond("color", "=", "red"), cond("season", "=", "summer")],
        And((Condition("color", "=", "red"), Condition("season", "=", "summer"))),
        id="and",
    ),
    pytest.param(
        {"or": [cond("color", "=", "red"), cond("season", "=", "summer")]},
        Or((Condition("color", "=", "red"), Condition("season", "=", "summer"))),
        id="cross-field or",
    ),
    pytest.param(
        [cond("category", "!=", "pants"), {"or": [cond("color", "=", "red"), cond("season", "=", "summer")]}],
        And(
            (
                Condition("category", "!=", "pants"),
                Or((Condition("color", "=", "red"), Condition("season", "=", "summer"))),
            )
        ),
        id="nested and + or",
    ),
    pytest.param(
        [
            cond("category", "=", "T-shirt"),
            cond("color", "in", ["white", "beige"]),
            cond("price", ">=", 50),
            cond("price", "<=", 200),
        ],
        And(
            (
                Condition("category", "=", "T-shirt"),
                Condition("color", "in", ("white", "beige")),
                Condition("price", ">=", 50),
                Condition("price", "<=", 200),
            )
        ),
        id="e-commerce",
    ),
    pytest.param(None, None, id="no filter"),
    pytest.param([], And(()), id="empty and"),
    pytest.param({"or": []}, Or(()), id="empty or"),
    pytest.param(cond("a", "=", 1), Condition("a", "=", 1), id="bare condition"),
    pytest.param([[[]]], And((And((And(()),)),)), id="nested empty lists"),
]


@pytest.mark.parametrize(("raw", "expected"), SEED_EXAMPLES)
def test_valid_filters_parse_to_their_tree(raw: Any, expected: Any) -> None:
    assert parse_filter(raw) == expected


STRINGS = ["red", "", "Ünïcode ✓", "a\x00"]
NUMBERS = [0, -3, 50, 2.5, -0.0, 1e300, 2**60]
BOOLEANS = [True, False]
VALID_VALUES: dict[str, list[Any]] = {
    "=": STRINGS + NUMBERS + BOOLEANS,
    "!=": STRINGS + NUMBERS + BOOLEANS,
    ">": STRINGS + NUMBERS,
    ">=": STRINGS + NUMBERS,
    "<": STRINGS + NUMBERS,
    "<=": STRINGS + NUMBERS,
    "contains": STRINGS,
    "not contains": STRINGS,
    "in": [[], ["red"], [1, 2.5, "1", True, False, ""]],
    "not in": [[], ["red"], [1, 2.5, "1", True, False, ""]],
}


@pytest.mark.parametrize(
    ("op", "value"), [(op, value) for op in OPERATORS for value in VALID_VALUES[op]], ids=repr
)
def test_every_operator_accepts_its_value_types(op: str, value: Any) -> None:
    node = parse_filter(cond("size", op, value))

    expected_value = tuple(value) if isinstance(value, list) else value
    assert node == Condition("size", op, expected_value)
    assert isinstance(node, Condition)
    assert type(node.value) is type(expected_value)  # a boolean stays a boolean, an int an int


INVALID_VALUES: dict[str, list[Any]] = {
    "=": [[1], {}, None, float("nan")],
    "!=": [["a"], {"a": 1}, None, float("inf")],
    ">": [True, False, ["a"], None, {}, float("-inf")],
    ">=": [True, [1]],
    "<": [False, [1]],
    "<=": [True, [1]],
    "contains": [True, 5, 2.5, ["a"], None],
    "not contains": [False, 0, ["a"]],
    "in": ["red", 5, True, None, {"a": 1}, [["a"]], [{"a": 1}], [None], [float("nan")]],
    "not in": ["red", 5, False, [["a"]], [None]],
}


@pytest.mark.parametrize(
    ("op", "value"), [(op, value) for op in OPERATORS for value in INVALID_VALUES[op]], ids=repr
)
def test_every_operator_rejects_other_value_types(op: str, value: Any) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter([cond("size", op, value)])

    assert caught.value.path.startswith("tag_filter[0].value")
    assert str(caught.value) == f"{caught.value.path}: {caught.value.reason}"


# --- what fails, where, and what the message says -----

INVALID: list[tuple[Any, str, list[str]]] = [
    # (raw, path, fragments the reason must hold: what was wrong and what was expected)
    ("red", "tag_filter", ["expected a list of conditions or an object", "got string 'red'"]),
    (5, "tag_filter", ["expected a list of conditions or an object", "got number 5"]),
    (True, "tag_filter", ["got boolean true"]),
    ({}, "tag_filter", ['expected a condition {"field", "op", "value"}', "got an empty object"]),
    ({"foo": 1}, "tag_filter", ['or an {"or": [...]} object', "got an object with key 'foo'"]),
    ([cond("a", "=", 1), {"bar": 1, "baz": 2}], "tag_filter[1]", ["got an object with keys 'bar', 'baz'"]),
    ({"OR": []}, "tag_filter", ["got an object with key 'OR'"]),
    ([1], "tag_filter[0]", ["expected a condition object, a list or an", "got number 1"]),
    ([None], "tag_filter[0]", ["got null"]),
    ([cond("a", "=", 1), "a"], "tag_filter[1]", ["got string 'a'"]),
    # missing / extra keys
    ([{"field": "a", "op": "="}], "tag_filter[0]", ["missing key 'value'", "exactly the keys"]),
    ({"field": "a"}, "tag_filter", ["missing keys 'op', 'value'"]),
    ({"op": "=", "value": 1}, "tag_filter", ["missing key 'field'"]),
    (
        {"field": "a", "op": "=", "value": 1, "case": "i"},
        "tag_filter",
        ["unexpected key 'case'", "expected exactly the keys 'field', 'op', 'value'"],
    ),
    ({"field": "a", "op": "=", "val": 1}, "tag_filter", ["missing key 'value' and unexpected key 'val'"]),
    # or-nodes
    ({"or": cond("a", "=", 1)}, "tag_filter.or", ["expected a list of conditions after 'or'", "got object"]),
    ([{"or": "x"}], "tag_filter[0].or", ["got string 'x'"]),
    ([{"or": None}], "tag_filter[0].or", ["got null"]),
    ({"or": [], "field": "a"}, "tag_filter", ["takes no other keys", "unexpected key 'field' beside 'or'"]),
    ({"or": [[{"or": [1]}]]}, "tag_filter.or[0][0].or[0]", ["got number 1"]),
    # field
    (cond(5, "=", 1), "tag_filter.field", ["expected the tag name as a string", "got number 5"]),
    (cond(None, "=", 1), "tag_filter.field", ["got null"]),
    (cond(["a"], "=", 1), "tag_filter.field", ["got list"]),
    (cond("", "=", 1), "tag_filter.field", ["empty field name", "expected a non-empty tag name"]),
    # operator
    (cond("a", "IN", []), "tag_filter.op", ["unknown operator 'IN'", "expected one of =, !="]),
    (cond("a", "==", 1), "tag_filter.op", ["unknown operator '=='"]),
    (cond("a", " = ", 1), "tag_filter.op", ["unknown operator ' = '"]),
    (cond("a", 1, 1), "tag_filter.op", ["expected an operator string, one of =", "got number 1"]),
    (cond("a", None, 1), "tag_filter.op", ["got null"]),
    # a list where a scalar is required
    (cond("a", "=", ["x", "y"]), "tag_filter.value", ["'=' takes a string", "got a list", "use 'in'"]),
    (cond("a", "!=", ["x"]), "tag_filter.value", ["got a list", "use 'not in'"]),
    (cond("a", ">", [1]), "tag_filter.value", ["'>' takes a string or a finite number, got a list"]),
    (cond("a", "contains", ["x"]), "tag_filter.value", ["'contains' takes a string, got a list"]),
    # a non-list for in / not in
    (cond("a", "in", "red"), "tag_filter.value", ["'in' takes a list of", "got string 'red'"]),
    (cond("a", "not in", 3), "tag_filter.value", ["'not in' takes a list of", "got number 3"]),
    (cond("a", "in", {"red": 1}), "tag_filter.value", ["got object"]),
    (cond("a", "in", None), "tag_filter.value", ["got null"]),
    (cond("a", "in", ["a", ["b"]]), "tag_filter.value[1]", ["in the 'in' list", "got list"]),
    (cond("a", "not in", [{"b": 1}]), "tag_filter.value[0]", ["in the 'not in' list", "got object"]),
    (cond("a", "in", [1, None]), "tag_filter.value[1]", ["got null"]),
    # booleans with an ordered operator or contains
    (cond("a", ">", True), "tag_filter.value", ["'>' takes a string or a finite number", "got boolean true"]),
    (cond("a", "<=", False), "tag_filter.value", ["got boolean false", "booleans have no order"]),
    (cond("a", "contains", True), "tag_filter.value", ["'contains' takes a string, got boolean true"]),
    (cond("a", "not contains", 5), "tag_filter.value", ["'not contains' takes a string, got number 5"]),
    # NaN and infinities (Python's json accepts them) and numbers beyond float64
    (cond("a", "=", float("nan")), "tag_filter.value", ["NaN is not allowed", "expected a finite number"]),
    (cond("a", ">", float("inf")), "tag_filter.value", ["Infinity is not allowed"]),
    (cond("a", "<", float("-inf")), "tag_filter.value", ["-Infinity is not allowed"]),
    (cond("a", "in", [1, float("nan")]), "tag_filter.value[1]", ["NaN is not allowed"]),
    (cond("a", "=", 10**400), "tag_filter.value", ["number is too large", "float64 range"]),
    (cond("a", "=", None), "tag_filter.value", ["got null"]),
    (cond("a", "=", {"x": 1}), "tag_filter.value", ["got object"]),
    # paths through nesting
    (
        [[{"or": [[cond("a", "=", [1])]]}]],
        "tag_filter[0][0].or[0][0].value",
        ["got a list"],
    ),
]


@pytest.mark.parametrize(("raw", "path", "fragments"), INVALID, ids=lambda value: repr(value)[:60])
def test_invalid_filters_name_the_path_and_the_expectation(raw: Any, path: str, fragments: list[str]) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(raw)

    error = caught.value
    assert error.path == path
    assert str(error) == f"{path}: {error.reason}"
    for fragment in fragments:
        assert fragment in error.reason


def test_unknown_operator_message_matches_the_spec_exactly() -> None:
    raw = [cond("color", "=", "red"), {"or": [cond("color", "like", "re%")]}]

    with pytest.raises(FilterError) as caught:
        parse_filter(raw)

    assert str(caught.value) == UNKNOWN_OP_MESSAGE


def test_json_nan_and_infinity_are_rejected() -> None:
    for text in ("NaN", "Infinity", "-Infinity"):
        raw = json.loads(f'[{{"field": "price", "op": ">", "value": {text}}}]')
        with pytest.raises(FilterError, match=r"^tag_filter\[0\]\.value: "):
            parse_filter(raw)


def test_root_names_the_path() -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter([cond("a", "like", 1)], root="body.tag_filter")

    assert caught.value.path == "body.tag_filter[0].op"


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(cond("a", "x" * 500, 1))

    assert len(str(caught.value)) < 200


def test_parsing_leaves_the_input_unchanged() -> None:
    raw = [cond("a", "in", ["x", 1]), {"or": [cond("b", "=", True)]}]
    before = copy.deepcopy(raw)

    parse_filter(raw)

    assert raw == before


# --- limits -----


def nested_lists(levels: int) -> Any:
    """A condition inside `levels` lists: the condition sits at depth levels + 1."""
    node: Any = cond("a", "=", 1)
    for _ in range(levels):
        node = [node]
    return node


def nested_ors(levels: int) -> Any:
    node: Any = cond("a", "=", 1)
    for _ in range(levels):
        node = {"or": [node]}
    return node


def test_depth_limit_counts_every_level() -> None:
    assert parse_filter(nested_lists(31)) is not None  # condition at depth 32

    with pytest.raises(FilterError) as caught:
        parse_filter(nested_lists(32))

    assert caught.value.path == "tag_filter" + "[0]" * 32
    assert caught.value.reason == "filter is nested too deeply; expected at most 32 levels"


def test_depth_limit_counts_or_levels() -> None:
    assert parse_filter(nested_ors(31)) is not None

    with pytest.raises(FilterError) as caught:
        parse_filter(nested_ors(32))

    assert caught.value.path == "tag_filter" + ".or[0]" * 32


def test_depth_limit_is_configurable() -> None:
    limits = FilterLimits(max_depth=2)
    assert parse_filter([cond("a", "=", 1)], limits=limits) is not None

    with pytest.raises(FilterError, match=r"^tag_filter\[0\]\[0\]: .*at most 2 levels"):
        parse_filter([[cond("a", "=", 1)]], limits=limits)


# The count limits apart from the cost budget, which the default would hit first for these filters.
NO_BUDGET = FilterLimits(max_cost=1_000_000)


def test_condition_count_limit() -> None:
    assert parse_filter([cond("a", "=", i) for i in range(1000)], limits=NO_BUDGET) is not None

    with pytest.raises(FilterError) as caught:
        parse_filter([cond("a", "=", i) for i in range(1001)], limits=NO_BUDGET)

    assert caught.value.path == "tag_filter[1000]"
    assert caught.value.reason == "too many conditions; expected at most 1000 in a filter"


def test_condition_count_limit_spans_the_whole_tree() -> None:
    limits = FilterLimits(max_conditions=3)
    raw = [cond("a", "=", 1), {"or": [cond("a", "=", 2), [cond("a", "=", 3), cond("a", "=", 4)]]}]

    with pytest.raises(FilterError) as caught:
        parse_filter(raw, limits=limits)

    assert caught.value.path == "tag_filter[1].or[1][1]"


def test_group_count_limit_bounds_empty_groups() -> None:
    # 1000 groups with the top-level list
    assert parse_filter([[] for _ in range(999)], limits=NO_BUDGET) is not None

    with pytest.raises(FilterError) as caught:
        parse_filter([{"or": []} for _ in range(1000)], limits=NO_BUDGET)

    assert caught.value.path == "tag_filter[999].or"
    assert "expected at most 1000" in caught.value.reason


def test_in_list_length_limit() -> None:
    assert parse_filter(cond("a", "in", list(range(1000)))) is not None

    with pytest.raises(FilterError) as caught:
        parse_filter(cond("a", "not in", list(range(1001))))

    assert caught.value.path == "tag_filter.value"
    assert caught.value.reason == "'not in' list has 1001 values; expected at most 1000"


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda text: cond(text, "=", 1), "tag_filter.field"),
        (lambda text: cond("a", "=", text), "tag_filter.value"),
        (lambda text: cond("a", ">=", text), "tag_filter.value"),
        (lambda text: cond("a", "contains", text), "tag_filter.value"),
        (lambda text: cond("a", "in", ["ok", text]), "tag_filter.value[1]"),
    ],
)
def test_string_length_limit(make: Any, path: str) -> None:
    assert parse_filter(make("x" * 1024)) is not None

    with pytest.raises(FilterError) as caught:
        parse_filter(make("x" * 1025))

    assert caught.value.path == path
    assert caught.value.reason == "string of 1025 characters is too long; expected at most 1024"


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3", None])
@pytest.mark.parametrize(
    "name", ["max_depth", "max_conditions", "max_groups", "max_in_values", "max_string_length", "max_cost"]
)
def test_filter_limits_must_be_positive_integers(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        FilterLimits(**{name: bad})


# --- the tree itself -----


def test_conditions_tell_booleans_from_numbers() -> None:
    assert Condition("a", "=", True) != Condition("a", "=", 1)
    assert Condition("a", "in", (1, 0)) != Condition("a", "in", (True, False))
    assert Condition("a", "=", 1) == Condition("a", "=", 1.0)  # numerically equal: same filter
    assert len({Condition("a", "=", True), Condition("a", "=", 1), Condition("a", "=", 1.0)}) == 2
    assert And(()) != Or(())


def test_nodes_are_immutable() -> None:
    node = Condition("a", "=", 1)
    with pytest.raises(AttributeError):
        node.op = "!="  # type: ignore[misc]


@settings(max_examples=150, deadline=None)
@given(trees())
def test_json_round_trip(tree: Any) -> None:
    assert parse_filter(to_json(tree), limits=NO_BUDGET) == tree


# --- the cost budget (FilterLimits.max_cost) -----


def contains(n: int, text: str = "x" * 1024) -> list[dict[str, Any]]:
    return [cond("name", "contains", text) for _ in range(n)]


def test_the_reviews_filter_bomb_is_refused_before_evaluation() -> None:
    # Issue 26's reproduction: 1,000 'contains' of 1,024 characters (2.5 minutes over 100,000 strings).
    with pytest.raises(FilterError) as caught:
        parse_filter(contains(1000))

    assert caught.value.path == "tag_filter"
    assert "budget of 64 units (max_filter_cost)" in caught.value.reason


@pytest.mark.parametrize(
    ("condition", "units"),
    [
        (cond("a", "=", 1), 1),
        (cond("a", "!=", "x"), 1),
        (cond("a", ">", 5), 1),
        (cond("a", ">", "m"), 8),
        (cond("a", "<=", "m"), 8),
        (cond("a", "contains", "x"), 8),
        (cond("a", "not contains", "x"), 8),
        (cond("a", "contains", "x\x00"), 32),
        (cond("a", "in", list(range(15))), 1),
        (cond("a", "not in", list(range(16))), 2),
        (cond("a", "in", list(range(1000))), 63),
    ],
)
def test_cost_of_each_kind_of_condition(condition: dict[str, Any], units: int) -> None:
    # In a list (1 unit), the filter fits a budget of its cost and not one unit less.
    assert parse_filter([condition], limits=FilterLimits(max_cost=units + 1)) is not None
    with pytest.raises(FilterError, match=r"^tag_filter: .*budget of \d+ units \(max_filter_cost\)"):
        parse_filter([condition], limits=FilterLimits(max_cost=units))


def test_groups_cost_one_unit_each() -> None:
    raw = [{"or": []}, [], cond("a", "=", 1)]  # 3 groups (with the top-level list) + 1 condition
    assert parse_filter(raw, limits=FilterLimits(max_cost=4)) is not None
    with pytest.raises(FilterError, match="max_filter_cost"):
        parse_filter(raw, limits=FilterLimits(max_cost=3))


def test_default_budget_allows_everyday_filters() -> None:
    # 7 'contains' and a list (57 units) fit the default budget of 64; an 8th does not.
    assert parse_filter(contains(7)) is not None
    with pytest.raises(FilterError, match="max_filter_cost"):
        parse_filter(contains(8))
    # 63 plain conditions in a list, or a full 'in' list (63) as the whole filter.
    assert parse_filter([cond("b", "=", i) for i in range(63)]) is not None
    assert parse_filter(cond("a", "in", list(range(1000)))) is not None


def test_limits_are_frozen_and_refuse_unknown_fields() -> None:
    limits = FilterLimits()
    with pytest.raises(ValueError):
        limits.max_cost = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_costs"):
        FilterLimits(max_costs=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_cost"):
        FilterLimits(max_cost=1_000_001)
