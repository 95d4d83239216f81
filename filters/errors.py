"""Errors raised for a bad `tag_filter` or bad `tags`.

Both carry the JSON path of the offending node, so that the HTTP edge can answer 400 with a message that
names it, e.g. ``tag_filter[1].or[0].op: unknown operator 'like'; expected one of ...``.
"""

from __future__ import annotations

from typing import Any


class PathError(ValueError):
    """A value rejected at a JSON path.

    Attributes:
        path: where the bad value sits, e.g. ``tag_filter[1].or[0].op`` or ``tags.color[2]``.
        reason: what was wrong and what was expected.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call cls(message) and lose .path/.reason; these errors cross
        # process boundaries (Ray pickles exceptions), so rebuild them from both fields.
        return (type(self), (self.path, self.reason))


class FilterError(PathError):
    """A `tag_filter` that does not follow the grammar or exceeds a limit."""


class TagError(PathError):
    """A `tags` object that holds a value filters could not give a clear meaning to."""
