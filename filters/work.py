"""The data-aware half of the filter budget: what a parsed filter costs over a given set of columns.

`filters.tree`'s ``max_cost`` is counted from the filter alone, at parse time; it cannot see that a
``contains`` scans every distinct string of its field, so that the same filter costs 1,000 times more
over a million distinct strings of 1,024 characters than over a thousand short ones. `filter_work`
prices the filter against the columns it would run on, in *work units* of about one element touched by
a vectorised pass (a row of a mask, an entry of a column, a byte of a distinct string scanned), and
`check_work` refuses it over a budget (``limits.max_filter_work``) before anything is evaluated. The
figures come from the columns' sizes (`TagColumns.field_size`, O(1) per condition), so pricing a filter
costs about as much as parsing it.

Weights (bench/filter_bench.py ``work`` measures the time per unit of each kind; bench/README.md):

- every condition, list and ``or``: the rows (a mask is allocated, negated or combined per node);
- ``=`` ``!=`` ``in`` ``not in``: the field's entries of each kind compared, once per string value up to
  `_EQUALITY_PASSES` (beyond, one gather), and ``1 + SEARCH_LEVEL_WEIGHT * log2(values)`` times for a
  list of numbers;
- ``contains`` and a string ``>`` ``>=`` ``<`` ``<=``: `BYTE_WEIGHT` per character of the field's
  distinct strings, `STRING_WEIGHT` per distinct string, `SCAN_ENTRY_WEIGHT` per entry;
- a ``contains`` whose substring ends with NUL (tested in Python): `PYTHON_STRING_WEIGHT` per distinct
  string on top.
"""

from __future__ import annotations

import math
from typing import Any

from filters._values import BOOL, NUM, STR, scalar_kind
from filters.columns import TagColumns
from filters.errors import FilterError
from filters.tree import NEGATIONS, ORDERED_OPERATORS, And, Condition, Node, Or

#: Work units per character of a distinct string scanned by ``contains`` or a string order comparison.
BYTE_WEIGHT = 5
#: Work units per distinct string scanned (its padding, terminator and per-string overhead).
STRING_WEIGHT = 16
#: Work units per entry of a ``contains`` or string order comparison: the gather (and the scatter into
#: rows, for a list-valued field) from the distinct strings' results to the entries.
SCAN_ENTRY_WEIGHT = 8
#: Work units per entry and per level of the binary search of a list of numbers (``in`` / ``not in``).
SEARCH_LEVEL_WEIGHT = 4
#: Work units per distinct string for a ``contains`` tested in Python (a substring ending with NUL).
PYTHON_STRING_WEIGHT = 400
# `TagColumns` ORs up to this many equality tests over the entries, then uses one gather.
_EQUALITY_PASSES = 4

DEFAULT_MAX_WORK = 300_000_000
MAX_WORK_BOUND = 10**12
WORK_UNITS = (
    "about one element touched by a vectorised pass each (0.2-0.7 ns measured on 2 shared cores); "
    "counted from the library's tag columns before the filter runs: the rows per condition, list and "
    "'or', the field's entries per equality or number test "
    f"({SEARCH_LEVEL_WEIGHT} x log2(values) for a list of numbers), and for 'contains' and string "
    f"> >= < <= {BYTE_WEIGHT} per character and {STRING_WEIGHT} per distinct string of the field plus "
    f"{SCAN_ENTRY_WEIGHT} per entry; {PYTHON_STRING_WEIGHT} more per distinct string for a 'contains' "
    "whose substring ends with NUL"
)


def filter_work(node: Node | None, columns: TagColumns) -> int:
    """The work units evaluating `node` over `columns` takes (see the module docstring). None: 0."""
    if node is None:
        return 0
    rows = len(columns)
    stack: list[Node] = [node]
    work = 0
    while stack:
        item = stack.pop()
        work += rows
        if isinstance(item, (And, Or)):
            stack.extend(item.children)
        elif isinstance(item, Condition):
            work += _condition_work(item, columns)
        else:
            raise TypeError(f"expected a filter node (And, Or or Condition), got {type(item).__name__}")
    return work


def check_work(node: Node | None, columns: TagColumns, max_work: int, root: str = "tag_filter") -> int:
    """`filter_work`, or a `FilterError` naming ``max_filter_work`` when it is over `max_work`."""
    work = filter_work(node, columns)
    if work > max_work:
        raise FilterError(
            root,
            f"filter is too expensive to evaluate over this library's tags: about {work:,} work units, "
            f"more than the budget of {max_work:,} (max_filter_work); 'contains' and string order "
            f"comparisons cost about {BYTE_WEIGHT} per character of the field's distinct strings, every "
            f"condition about 1 per row; use fewer conditions, or equality on a field with fewer values",
        )
    return work


def _condition_work(condition: Condition, columns: TagColumns) -> int:
    op = NEGATIONS.get(condition.op, condition.op)
    field, value = condition.field, condition.value
    if op == "contains" or (op in ORDERED_OPERATORS and scalar_kind(value) == STR):
        entries, distinct, chars = columns.field_size(field, STR)
        work = BYTE_WEIGHT * chars + STRING_WEIGHT * distinct + SCAN_ENTRY_WEIGHT * entries
        if op == "contains" and isinstance(value, str) and value.endswith("\x00"):
            work += PYTHON_STRING_WEIGHT * distinct
        return work
    if op in ORDERED_OPERATORS:
        return columns.field_size(field, NUM)[0]
    values: tuple[Any, ...] = value if isinstance(value, tuple) else (value,)
    kinds = [scalar_kind(item) for item in values]
    work = 0
    strings = kinds.count(STR)
    if strings:
        work += columns.field_size(field, STR)[0] * min(strings, _EQUALITY_PASSES)
    numbers = kinds.count(NUM)
    if numbers:
        work += columns.field_size(field, NUM)[0] * (1 + SEARCH_LEVEL_WEIGHT * math.ceil(math.log2(numbers)))
    if BOOL in kinds:
        work += columns.field_size(field, BOOL)[0]
    return work
