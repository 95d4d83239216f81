"""Tag filters: the `tag_filter` grammar, tag validation, columnar tag storage and the vectorised
evaluator (tree -> numpy bool mask). Plain Python and numpy; no Ray.

Typical use::

    node = parse_filter(request.tag_filter)          # FilterError -> 400 INVALID_PARAMETER
    columns = TagColumns()
    columns.extend(validate_tags(tags) for tags in records)
    mask = evaluate(node, columns)                   # bool array, one entry per slot
"""

from filters.columns import TagColumns
from filters.errors import FilterError, TagError
from filters.evaluate import evaluate
from filters.tags import TagLimits, validate_tags
from filters.tree import OPERATORS, And, Condition, FilterLimits, Or, parse_filter

__all__ = [
    "OPERATORS",
    "And",
    "Condition",
    "FilterError",
    "FilterLimits",
    "Or",
    "TagColumns",
    "TagError",
    "TagLimits",
    "evaluate",
    "parse_filter",
    "validate_tags",
]
