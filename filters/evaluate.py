"""Evaluate a parsed `tag_filter` over `TagColumns` into a boolean mask of rows.

Semantics (API.md, "tag_filter"):

1. Positive operators (``=``, ``>``, ``>=``, ``<``, ``<=``, ``contains``, ``in``) are false when the field
   is missing or holds a value of another kind. There is no coercion: the string ``"50"`` is not the
   number ``50``, and a boolean is not a number (``true`` is not ``1``). Numbers compare numerically,
   ints and floats alike (``50 == 50.0``; as float64, see `filters.columns`). Strings order by Unicode
   code point. Nothing is ever compared across kinds.
2. Negations (``!=``, ``not contains``, ``not in``) are the exact complement of their positive operator:
   true when the field is missing or of another kind. So ``a != x`` selects exactly the rows that
   ``a = x`` does not. The ordered operators have no such pair: a row without a number in ``price``
   fails both ``price > 5`` and ``price <= 5``.
3. A list-valued tag matches a positive operator when ANY element matches, and its negation when NO
   element does. An empty list matches no positive operator, like a missing field.
4. ``in []`` is false, ``not in []`` is true, an empty AND (``[]``) is true, an empty OR (``{"or": []}``)
   is false.
5. Every string test is case-sensitive and compares exact code points, with no Unicode normalisation:
   ``=``, ``!=``, ``in``, ``not in``, the ordered operators, and also ``contains`` / ``not contains``
   (``"Red"`` does not contain ``"red"``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from filters._values import BOOL, NUM, STR, scalar_kind, show
from filters.columns import TagColumns
from filters.tree import NEGATIONS, And, Condition, Node, Or

_ORDER: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def evaluate(node: Node | None, columns: TagColumns) -> np.ndarray:
    """The rows of `columns` that pass the filter.

    Args:
        node: a tree from `filters.parse_filter`, or None for no filter.
        columns: the tags of the rows, slot i being row i.

    Returns:
        A new bool array of ``len(columns)``; all True when `node` is None.

    Raises:
        TypeError: `node` (or a node inside it) is not an `And`, `Or` or `Condition`.
        ValueError: a hand-built `Condition` has an unknown operator or a value of the wrong kind for
            it (`parse_filter` never builds one).
    """
    if node is None:
        return np.ones(len(columns), dtype=bool)
    return _evaluate(node, columns)


def _evaluate(node: Node, columns: TagColumns) -> np.ndarray:
    if isinstance(node, Condition):
        return _condition(node, columns)
    if isinstance(node, And):
        mask = np.ones(len(columns), dtype=bool)
        for child in node.children:
            mask &= _evaluate(child, columns)
        return mask
    if isinstance(node, Or):
        mask = np.zeros(len(columns), dtype=bool)
        for child in node.children:
            mask |= _evaluate(child, columns)
        return mask
    raise TypeError(f"expected a filter node (And, Or or Condition), got {type(node).__name__}")


def _condition(condition: Condition, columns: TagColumns) -> np.ndarray:
    positive = NEGATIONS.get(condition.op)
    if positive is None:
        return _positive(condition.op, condition.field, condition.value, columns)
    mask = _positive(positive, condition.field, condition.value, columns)
    return np.logical_not(mask, out=mask)


def _positive(op: str, field: str, value: Any, columns: TagColumns) -> np.ndarray:
    """Rows where some value of `field` passes the positive operator `op`."""
    if op == "=":
        return _equals_any(field, (value,), columns, op)
    if op == "in":
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"'in' takes a sequence of values, got {show(value)}")
        return _equals_any(field, value, columns, op)
    if op == "contains":
        if scalar_kind(value) != STR:
            raise ValueError(f"'contains' takes a string, got {show(value)}")
        return columns.rows_string_contains(field, value)
    compare = _ORDER.get(op)
    if compare is None:
        raise ValueError(f"unknown operator {op!r}")
    kind = scalar_kind(value)
    if kind == STR:
        return columns.rows_string_compare(field, op, value)
    if kind == NUM:
        number = _finite(value, op)
        return columns.rows_number_where(field, lambda numbers: compare(numbers, number))
    raise ValueError(f"{op!r} takes a string or a finite number, got {show(value)}")


def _equals_any(field: str, values: Sequence[Any], columns: TagColumns, op: str) -> np.ndarray:
    """Rows where some value of `field` equals one of `values`, each compared only within its kind."""
    strings: list[str] = []
    numbers: list[float] = []
    booleans: list[bool] = []
    for value in values:
        kind = scalar_kind(value)
        if kind == STR:
            strings.append(value)
        elif kind == NUM:
            numbers.append(_finite(value, op))
        elif kind == BOOL:
            booleans.append(value)
        else:
            raise ValueError(f"{op!r} takes strings, finite numbers and booleans, got {show(value)}")
    masks = []
    if strings:
        masks.append(columns.rows_string_in(field, strings))
    if numbers:
        wanted = np.array(numbers, dtype=np.float64)
        if len(wanted) == 1:
            masks.append(columns.rows_number_where(field, lambda entries: entries == wanted[0]))
        else:
            masks.append(columns.rows_number_where(field, lambda entries: _member(entries, wanted)))
    if booleans:
        masks.append(columns.rows_bool_in(field, booleans))
    if not masks:
        return np.zeros(len(columns), dtype=bool)
    mask = masks[0]
    for other in masks[1:]:
        mask |= other
    return mask


def _member(entries: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``np.isin(entries, wanted)`` by binary search: O(n log k), where isin sorts all n + k values."""
    ordered = np.unique(wanted)  # sorted; -0.0 and 0.0 are one value, as == has them
    at = np.searchsorted(ordered, entries)
    np.minimum(at, len(ordered) - 1, out=at)
    return ordered[at] == entries


def _finite(value: int | float, op: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{op!r} takes finite numbers, got {show(value)}")
    return number
