"""The `tag_filter` grammar: raw decoded JSON in, a typed, validated tree out.

Grammar (API.md, "tag_filter")::

    filter    := condition | and | or
    condition := {"field": <non-empty string>, "op": <operator>, "value": <value>}   (exactly these keys)
    and       := [filter, ...]                  (an empty list is true)
    or        := {"or": [filter, ...]}          (exactly this key; an empty list is false)

Values by operator: ``=`` ``!=`` take a string, finite number or boolean; ``>`` ``>=`` ``<`` ``<=`` a
string or finite number; ``contains`` ``not contains`` a string; ``in`` ``not in`` a (possibly empty) list
of strings, finite numbers and booleans. Every error is a `FilterError` whose path names the bad node.

Besides the size limits, `FilterLimits.max_cost` is a budget on evaluation work, counted while parsing
(`condition_cost`), so that a filter over it is refused before anything is evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from filters._values import BOOL, NUM, STR, Kind, number_problem, quoted, scalar_kind, scalar_problem, show
from filters.errors import FilterError

OPERATORS: tuple[str, ...] = ("=", "!=", ">", ">=", "<", "<=", "contains", "not contains", "in", "not in")
ORDERED_OPERATORS = frozenset({">", ">=", "<", "<="})
# Each negated operator is the exact complement of its positive one (API.md rule 2).
NEGATIONS: Mapping[str, str] = MappingProxyType({"!=": "=", "not contains": "contains", "not in": "in"})

_CONDITION_KEYS = ("field", "op", "value")
_OPERATOR_LIST = ", ".join(OPERATORS)

Scalar: TypeAlias = str | int | float | bool

# The cost model (units: about one vectorised pass over the rows; bench/filter_bench.py measures them).
DEFAULT_MAX_COST = 64
MAX_COST_BOUND = 1_000_000
COST_UNITS = (
    "about one vectorised pass over the rows each; 1 per condition and per list or 'or', 8 per "
    "'contains' / 'not contains' and per string compared with > >= < <=, 32 for a 'contains' whose "
    "substring ends with NUL, plus 1 per 16 values of an 'in' / 'not in' list"
)
_SCAN_COST = 8  # contains: np.strings.find over the field's distinct strings, then a gather over entries
_SLOW_SCAN_COST = 32  # contains with a trailing NUL: a Python test per distinct string (filters.columns)
_ORDER_COST = 8  # a string compared with > >= < <=: a comparison over the distinct strings, then a gather
_IN_VALUES_PER_UNIT = 16  # numbers: a binary search per entry, log(values) deep


def _typed(value: Any) -> Any:
    """A comparison key that keeps booleans apart from numbers (``True == 1`` in Python)."""
    if isinstance(value, tuple):
        return tuple(_typed(item) for item in value)
    return (scalar_kind(value), value)


@dataclass(frozen=True, eq=False)
class Condition:
    """One test of one tag: ``{"field": ..., "op": ..., "value": ...}``.

    `value` is a scalar, or a tuple of scalars for ``in`` / ``not in``. Equality and hashing tell
    booleans from numbers, so ``= true`` and ``= 1`` are different conditions (as they are to evaluate).
    """

    field: str
    op: str
    value: Scalar | tuple[Scalar, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Condition):
            return NotImplemented
        return (self.field, self.op, _typed(self.value)) == (other.field, other.op, _typed(other.value))

    def __hash__(self) -> int:
        return hash((self.field, self.op, _typed(self.value)))


@dataclass(frozen=True)
class And:
    """All children hold (a JSON array). No children: true."""

    children: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Or:
    """At least one child holds (``{"or": [...]}``). No children: false."""

    children: tuple[Node, ...] = ()


Node: TypeAlias = Condition | And | Or


class FilterLimits(BaseModel):
    """Bounds on a filter's size and cost, so that a request cannot make parsing or evaluation unbounded.

    Every bound is checked by `parse_filter`, before anything is evaluated. `max_cost` is the evaluation
    budget, in the cost units of `condition_cost` (about one vectorised pass over the rows each).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_depth: int = Field(
        32,
        ge=1,
        description="nesting levels: the top-level node is at depth 1 and every list or 'or' adds one "
        "level for its children, so [{'or': [cond]}] puts cond at depth 3",
    )
    max_conditions: int = Field(1000, ge=1, description="conditions in the whole filter")
    max_groups: int = Field(
        1000, ge=1, description="lists and 'or' objects in the whole filter (empty ones cost evaluation too)"
    )
    max_in_values: int = Field(1000, ge=1, description="values in one 'in' / 'not in' list")
    max_string_length: int = Field(1024, ge=1, description="characters in a field name or a string value")
    max_cost: int = Field(
        DEFAULT_MAX_COST,
        ge=1,
        le=MAX_COST_BOUND,
        description=f"evaluation budget of one filter, in cost units: {COST_UNITS}",
    )


DEFAULT_FILTER_LIMITS = FilterLimits()


def condition_cost(op: str, value: Any) -> int:
    """A condition's share of `FilterLimits.max_cost` (see `FilterLimits.max_cost`'s description).

    The units stand for evaluation work that does not depend on the data: how much a condition costs
    also grows with the rows, list elements and distinct strings of the field it tests, which this
    budget cannot know: `filters.work` prices the filter against the columns (``max_filter_work``).
    """
    if op in ("contains", "not contains"):
        return _SLOW_SCAN_COST if isinstance(value, str) and value.endswith("\x00") else _SCAN_COST
    if op in ORDERED_OPERATORS and scalar_kind(value) == STR:
        return _ORDER_COST
    if op in ("in", "not in") and isinstance(value, (tuple, list)):
        return 1 + len(value) // _IN_VALUES_PER_UNIT
    return 1


def parse_filter(
    raw: Any, *, root: str = "tag_filter", limits: FilterLimits = DEFAULT_FILTER_LIMITS
) -> Node | None:
    """Validate a decoded `tag_filter` and build its tree.

    Args:
        raw: the decoded JSON value: a list (AND), an object (a condition or ``{"or": [...]}``), or None.
        root: the name the error paths start with.
        limits: size bounds; exceeding one is an error.

    Returns:
        The tree (`And`, `Or` or `Condition`), or None when `raw` is None (no filter).

    Raises:
        FilterError: `raw` breaks the grammar or a limit; ``.path`` names the bad node, e.g.
            ``tag_filter[1].or[0].op``.
    """
    if raw is None:
        return None
    if not isinstance(raw, (list, dict)):
        raise FilterError(
            root,
            f'expected a list of conditions or an object (a condition or {{"or": [...]}}), got {show(raw)}',
        )
    parser = _Parser(limits)
    parser.root = root
    return parser.node(raw, root, 1)


class _Parser:
    """One parse: walks the raw value and counts conditions and groups against the limits."""

    def __init__(self, limits: FilterLimits) -> None:
        self.limits = limits
        self.conditions = 0
        self.groups = 0
        self.cost = 0
        self.root = ""

    def charge(self, units: int) -> None:
        """Add `units` to the filter's cost; over `max_cost` the whole filter is refused."""
        self.cost += units
        if self.cost > self.limits.max_cost:
            raise FilterError(
                self.root,
                f"filter is too expensive to evaluate: it costs more than the budget of "
                f"{self.limits.max_cost} units (max_filter_cost); each condition costs 1, each list "
                f"or 'or' 1, 'contains' and a string order comparison 8, 1 more per 16 'in' values",
            )

    def node(self, raw: Any, path: str, depth: int) -> Node:
        if depth > self.limits.max_depth:
            raise FilterError(
                path, f"filter is nested too deeply; expected at most {self.limits.max_depth} levels"
            )
        if isinstance(raw, list):
            return And(self.children(raw, path, depth))
        if isinstance(raw, dict):
            if "or" in raw:
                return self.or_node(raw, path, depth)
            return self.condition(raw, path)
        raise FilterError(
            path, f'expected a condition object, a list or an {{"or": [...]}} object, got {show(raw)}'
        )

    def children(self, items: list[Any], path: str, depth: int) -> tuple[Node, ...]:
        self.groups += 1
        if self.groups > self.limits.max_groups:
            raise FilterError(
                path,
                f"too many lists and 'or' objects; expected at most {self.limits.max_groups} in a filter",
            )
        self.charge(1)
        return tuple(self.node(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(items))

    def or_node(self, raw: dict[Any, Any], path: str, depth: int) -> Or:
        extra = [key for key in raw if key != "or"]
        if extra:
            raise FilterError(
                path, f"an 'or' object takes no other keys; unexpected {_key_list(extra)} beside 'or'"
            )
        items = raw["or"]
        if not isinstance(items, list):
            raise FilterError(f"{path}.or", f"expected a list of conditions after 'or', got {show(items)}")
        return Or(self.children(items, f"{path}.or", depth))

    def condition(self, raw: dict[Any, Any], path: str) -> Condition:
        missing = [key for key in _CONDITION_KEYS if key not in raw]
        extra = [key for key in raw if key not in _CONDITION_KEYS]
        if len(missing) == len(_CONDITION_KEYS):
            got = f"an object with {_key_list(extra)}" if extra else "an empty object"
            raise FilterError(
                path,
                f'expected a condition {{"field", "op", "value"}} or an {{"or": [...]}} object, got {got}',
            )
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing {_key_list(missing)}")
            if extra:
                problems.append(f"unexpected {_key_list(extra)}")
            raise FilterError(
                path,
                f"condition has {' and '.join(problems)}; expected exactly the keys 'field', 'op', 'value'",
            )
        self.conditions += 1
        if self.conditions > self.limits.max_conditions:
            raise FilterError(
                path, f"too many conditions; expected at most {self.limits.max_conditions} in a filter"
            )
        field = self.field(raw["field"], f"{path}.field")
        op = self.operator(raw["op"], f"{path}.op")
        value = self.value(op, raw["value"], f"{path}.value")
        self.charge(condition_cost(op, value))
        return Condition(field, op, value)

    def field(self, raw: Any, path: str) -> str:
        if not isinstance(raw, str):
            raise FilterError(path, f"expected the tag name as a string, got {show(raw)}")
        if not raw:
            raise FilterError(path, "empty field name; expected a non-empty tag name")
        self.check_length(raw, path)
        return raw

    def operator(self, raw: Any, path: str) -> str:
        if not isinstance(raw, str):
            raise FilterError(path, f"expected an operator string, one of {_OPERATOR_LIST}; got {show(raw)}")
        if raw not in OPERATORS:
            raise FilterError(path, f"unknown operator {quoted(raw)}; expected one of {_OPERATOR_LIST}")
        return raw

    def value(self, op: str, raw: Any, path: str) -> Scalar | tuple[Scalar, ...]:
        if op in ("in", "not in"):
            return self.value_list(op, raw, path)
        if op in ("contains", "not contains"):
            return self.scalar(op, raw, path, (STR,), "a string")
        if op in ORDERED_OPERATORS:
            return self.scalar(op, raw, path, (STR, NUM), "a string or a finite number")
        return self.scalar(op, raw, path, (STR, NUM, BOOL), "a string, a finite number or a boolean")

    def scalar(self, op: str, raw: Any, path: str, kinds: tuple[Kind, ...], expected: str) -> Scalar:
        if isinstance(raw, list):
            hint = {
                "=": "; use 'in' to match any of several values",
                "!=": "; use 'not in' to exclude several",
            }
            raise FilterError(path, f"{op!r} takes {expected}, got a list{hint.get(op, '')}")
        kind = scalar_kind(raw)
        if kind not in kinds:
            why = " (booleans have no order and no substrings; use '=' or 'in')" if kind == BOOL else ""
            raise FilterError(path, f"{op!r} takes {expected}, got {show(raw)}{why}")
        if kind == NUM:
            problem = number_problem(raw)
            if problem:
                raise FilterError(path, problem)
        if kind == STR:
            self.check_length(raw, path)
        return raw

    def value_list(self, op: str, raw: Any, path: str) -> tuple[Scalar, ...]:
        if not isinstance(raw, list):
            raise FilterError(
                path, f"{op!r} takes a list of strings, finite numbers or booleans, got {show(raw)}"
            )
        if len(raw) > self.limits.max_in_values:
            raise FilterError(
                path, f"{op!r} list has {len(raw)} values; expected at most {self.limits.max_in_values}"
            )
        for i, item in enumerate(raw):
            problem = scalar_problem(
                item,
                self.limits.max_string_length,
                f"a string, a finite number or a boolean in the {op!r} list",
            )
            if problem:
                raise FilterError(f"{path}[{i}]", problem)
        return tuple(raw)

    def check_length(self, text: str, path: str) -> None:
        limit = self.limits.max_string_length
        if len(text) > limit:
            raise FilterError(path, f"string of {len(text)} characters is too long; expected at most {limit}")


def _key_list(keys: list[Any]) -> str:
    """``key 'x'`` or ``keys 'x', 'y'``, for messages about an object's keys."""
    names = ", ".join(quoted(key) if isinstance(key, str) else repr(key) for key in keys)
    return f"key {names}" if len(keys) == 1 else f"keys {names}"
