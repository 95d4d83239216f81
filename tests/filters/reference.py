"""A deliberately naive reference evaluator for tag filters: one function per rule of API.md.

It walks plain tag dicts one row at a time and shares no code with `filters.evaluate` or
`filters.columns` (only the node classes), so that the property tests can hold the vectorised evaluator
against it. Slow and obvious on purpose.
"""

from __future__ import annotations

from typing import Any

from filters import And, Condition, Or

# Rule 2: each negation and the positive operator it complements.
NEGATED_TO_POSITIVE = {"!=": "=", "not contains": "contains", "not in": "in"}


def kind_of(value: Any) -> str:
    """Rule 1's kinds. bool is tested first: in Python it is a subclass of int, but never a number here."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    raise TypeError(f"not a tag scalar: {value!r}")


def values_of(tags: dict[str, Any], field: str) -> list[Any]:
    """Rule 3's elements: a list tag is its elements, a scalar one element, a missing field none."""
    if field not in tags:
        return []
    value = tags[field]
    if isinstance(value, list):
        return list(value)
    return [value]


def as_float64(number: int | float) -> float:
    """Numbers compare as float64, as documented by filters.columns (ints beyond 2**53 round)."""
    return float(number)


def rule_equal(element: Any, value: Any) -> bool:
    """`=`: same kind and same value; numbers numerically, so 50 equals 50.0; no coercion."""
    if kind_of(element) != kind_of(value):
        return False
    if kind_of(element) == "number":
        return as_float64(element) == as_float64(value)
    return element == value


def rule_in(element: Any, values: tuple[Any, ...]) -> bool:
    """`in`: equal to one of the values; `in []` is false because any() of nothing is false."""
    return any(rule_equal(element, value) for value in values)


def rule_contains(element: Any, needle: str) -> bool:
    """`contains`: a string element containing the substring, case-sensitively."""
    return kind_of(element) == "string" and needle in element


def rule_ordered(element: Any, op: str, value: Any) -> bool:
    """`>` `>=` `<` `<=`: within one kind only; numbers numerically, strings by code point."""
    if kind_of(element) != kind_of(value):
        return False
    if kind_of(element) == "number":
        left, right = as_float64(element), as_float64(value)
    else:
        left, right = element, value  # Python orders str by code point
    if op == ">":
        return left > right
    if op == ">=":
        return left >= right
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    raise ValueError(op)


def rule_element_matches(op: str, element: Any, value: Any) -> bool:
    """One element against one positive operator."""
    if op == "=":
        return rule_equal(element, value)
    if op == "in":
        return rule_in(element, value)
    if op == "contains":
        return rule_contains(element, value)
    return rule_ordered(element, op, value)


def rule_any_element(op: str, tags: dict[str, Any], field: str, value: Any) -> bool:
    """Rules 1 and 3: a positive operator holds when ANY element matches (missing field: none does)."""
    return any(rule_element_matches(op, element, value) for element in values_of(tags, field))


def rule_negation(op: str, tags: dict[str, Any], field: str, value: Any) -> bool:
    """Rule 2: a negation is the exact complement of its positive operator."""
    return not rule_any_element(NEGATED_TO_POSITIVE[op], tags, field, value)


def rule_condition(condition: Condition, tags: dict[str, Any]) -> bool:
    if condition.op in NEGATED_TO_POSITIVE:
        return rule_negation(condition.op, tags, condition.field, condition.value)
    return rule_any_element(condition.op, tags, condition.field, condition.value)


def rule_and(node: And, tags: dict[str, Any]) -> bool:
    """Rule 4: all() of no children is true."""
    return all(holds(child, tags) for child in node.children)


def rule_or(node: Or, tags: dict[str, Any]) -> bool:
    """Rule 4: any() of no children is false."""
    return any(holds(child, tags) for child in node.children)


def holds(node: Condition | And | Or, tags: dict[str, Any]) -> bool:
    if isinstance(node, Condition):
        return rule_condition(node, tags)
    if isinstance(node, And):
        return rule_and(node, tags)
    if isinstance(node, Or):
        return rule_or(node, tags)
    raise TypeError(node)


def reference_evaluate(node: Condition | And | Or | None, rows: list[dict[str, Any]]) -> list[bool]:
    """Which rows pass `node` (None: all of them)."""
    if node is None:
        return [True] * len(rows)
    return [holds(node, tags) for tags in rows]
