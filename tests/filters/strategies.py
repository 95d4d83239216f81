"""Hypothesis strategies for tag sets and filter trees, shared by the filters test modules.

Values come from small pools, and half the conditions test a (field, value) pair (or a substring) taken
from the rows they will be evaluated on, so that matches, ints equal to floats and look-alikes of
another kind ("1" vs 1 vs true) are common rather than lucky.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from filters import OPERATORS, And, Condition, Or

FIELDS = ("a", "b", "c")
# "missing" is never a tag name, so conditions on it test the missing-field rules.
FILTER_FIELDS = (*FIELDS, "missing")

# Case, NUL and non-ASCII (code point order, nothing truncated), and look-alikes of other kinds.
strings = st.sampled_from(["", "a", "b", "ab", "ba", "A", "é", "a\x00", "1", "true"])
numbers = st.sampled_from([-1, 0, 1, 2, -1.0, -0.0, 0.0, 1.0, 2.5])
scalars = st.one_of(strings, numbers, st.booleans())
tag_values = st.one_of(scalars, st.lists(scalars, max_size=4))
tag_sets = st.dictionaries(st.sampled_from(FIELDS), tag_values, max_size=3)
rows = st.lists(tag_sets, max_size=30)


def seen_in(tag_rows: list[dict[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Every (field, scalar) stored in `tag_rows`, list elements included."""
    found: list[tuple[str, Any]] = []
    for tags in tag_rows:
        for field, value in tags.items():
            found.extend((field, item) for item in (value if isinstance(value, list) else [value]))
    return tuple(found)


def probes(tag_rows: list[dict[str, Any]]) -> list[Condition]:
    """Every operator against every distinct (field, value) stored in `tag_rows`, where the operator
    takes that value: a deterministic sweep that random trees would only sample."""
    distinct = {(field, type(value), value): (field, value) for field, value in seen_in(tag_rows)}
    found = []
    for field, value in distinct.values():
        for op in OPERATORS:
            if op in ("in", "not in"):
                found.append(Condition(field, op, (value,)))
            elif _values_like(op, value) is not None:
                found.append(Condition(field, op, value))
    return found


def _substrings(text: str) -> st.SearchStrategy[str]:
    bounds = st.integers(0, len(text))
    return st.tuples(bounds, bounds).map(lambda ends: text[min(ends) : max(ends)])


def _fresh_values(op: str) -> st.SearchStrategy[Any]:
    """Any value valid for `op`, from the fixed pools."""
    if op in ("=", "!="):
        return scalars
    if op in ("in", "not in"):
        # Up to 6 values, so that the evaluator's lookup-table path (more than 4 strings) runs too.
        return st.lists(scalars, max_size=6).map(tuple)
    if op in ("contains", "not contains"):
        return st.text(alphabet="abA\x00é", max_size=2)
    return st.one_of(strings, numbers)


def _values_like(op: str, seen: Any) -> st.SearchStrategy[Any] | None:
    """Values valid for `op` built from a value `seen` in the rows; None when `op` cannot take it."""
    if op in ("=", "!="):
        return st.just(seen)
    if op in ("in", "not in"):
        return (
            st.lists(scalars, max_size=5).flatmap(lambda others: st.permutations([seen, *others])).map(tuple)
        )
    if op in ("contains", "not contains"):
        return _substrings(seen) if isinstance(seen, str) else None
    return None if isinstance(seen, bool) else st.just(seen)


def conditions(
    ops: tuple[str, ...] = OPERATORS, seen: tuple[tuple[str, Any], ...] = ()
) -> st.SearchStrategy[Condition]:
    """Valid conditions using only `ops`; half of them test a (field, value) pair from `seen`."""

    def with_op(op: str) -> st.SearchStrategy[Condition]:
        fresh = st.builds(Condition, st.sampled_from(FILTER_FIELDS), st.just(op), _fresh_values(op))
        usable = [(field, value) for field, value in seen if _values_like(op, value) is not None]
        if not usable:
            return fresh
        like_seen = st.sampled_from(usable).flatmap(
            lambda pair: _values_like(op, pair[1]).map(  # type: ignore[union-attr]
                lambda value: Condition(pair[0], op, value)
            )
        )
        return st.one_of(fresh, like_seen)

    return st.sampled_from(ops).flatmap(with_op)


def trees(
    ops: tuple[str, ...] = OPERATORS, seen: tuple[tuple[str, Any], ...] = (), max_leaves: int = 8
) -> st.SearchStrategy[Any]:
    """Filter trees (And/Or, possibly empty, nested) over conditions using only `ops`."""
    return st.recursive(
        conditions(ops, seen),
        lambda children: st.one_of(
            st.lists(children, max_size=3).map(lambda items: And(tuple(items))),
            st.lists(children, max_size=3).map(lambda items: Or(tuple(items))),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def rows_and_tree(draw: st.DrawFn, ops: tuple[str, ...] = OPERATORS) -> tuple[list[dict[str, Any]], Any]:
    """Rows, and a filter whose values are often taken from those rows."""
    tag_rows = draw(rows)
    return tag_rows, draw(trees(ops, seen_in(tag_rows)))


@st.composite
def rows_and_condition(
    draw: st.DrawFn, ops: tuple[str, ...] = OPERATORS
) -> tuple[list[dict[str, Any]], Condition]:
    """Rows, and a condition whose value is often taken from those rows."""
    tag_rows = draw(rows)
    return tag_rows, draw(conditions(ops, seen_in(tag_rows)))


def to_json(node: Any) -> Any:
    """The decoded-JSON form of a tree, as a client would send it."""
    if isinstance(node, Condition):
        value = list(node.value) if isinstance(node.value, tuple) else node.value
        return {"field": node.field, "op": node.op, "value": value}
    if isinstance(node, And):
        return [to_json(child) for child in node.children]
    if isinstance(node, Or):
        return {"or": [to_json(child) for child in node.children]}
    raise TypeError(node)
