"""Validation of a record's `tags` object (API.md, "Images").

`tags` is a flat object: keys are non-empty strings; values are strings, finite numbers, booleans, or
lists of those. Anything else (null, nested objects, nested lists, NaN, infinities) is rejected, so that a
filter never meets a value whose meaning is unclear.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from filters._values import quoted, scalar_problem, show
from filters.errors import TagError

TagScalar: TypeAlias = str | int | float | bool
TagValue: TypeAlias = TagScalar | list[TagScalar]

_SIMPLE_KEY = re.compile(r"[\w-]+")
_EXPECTED_VALUE = "a string, a finite number, a boolean or a list of those"
_EXPECTED_ELEMENT = "a string, a finite number or a boolean"


class TagLimits(BaseModel):
    """Bounds on one record's tags."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_keys: int = Field(64, ge=1, description="tags per record")
    max_key_length: int = Field(128, ge=1, description="characters in a tag name")
    max_string_length: int = Field(
        1024, ge=1, description="characters in a string value (also for list elements)"
    )
    max_list_length: int = Field(256, ge=1, description="elements in a list value")


DEFAULT_TAG_LIMITS = TagLimits()


def tag_path(root: str, key: str) -> str:
    """The path of one tag: ``tags.color``, or ``tags["a b"]`` when the name is not a plain word."""
    if _SIMPLE_KEY.fullmatch(key):
        return f"{root}.{key}"
    return f"{root}[{json.dumps(key, ensure_ascii=False)}]"


def validate_tags(
    raw: Any, *, root: str = "tags", limits: TagLimits = DEFAULT_TAG_LIMITS
) -> dict[str, TagValue]:
    """Check a decoded `tags` object and return a copy of it.

    Args:
        raw: the decoded JSON value.
        root: the name the error paths start with.
        limits: size bounds; exceeding one is an error.

    Returns:
        A new dict with the same keys and values (lists copied), safe to keep.

    Raises:
        TagError: `raw` is not an object, or a key or value is not allowed; ``.path`` names it, e.g.
            ``tags.color[2]``.
    """
    if not isinstance(raw, dict):
        raise TagError(root, f"expected an object mapping tag names to values, got {show(raw)}")
    if len(raw) > limits.max_keys:
        raise TagError(root, f"{len(raw)} tags is too many; expected at most {limits.max_keys}")
    result: dict[str, TagValue] = {}
    for key, value in raw.items():
        _check_key(key, root, limits)
        path = tag_path(root, key)
        if isinstance(value, list):
            result[key] = _checked_list(value, path, limits)
        else:
            _check_scalar(value, path, limits, _EXPECTED_VALUE)
            result[key] = value
    return result


def _check_key(key: Any, root: str, limits: TagLimits) -> None:
    if not isinstance(key, str):
        raise TagError(root, f"tag names must be strings, got {show(key)}")
    if not key:
        raise TagError(root, "empty tag name; expected a non-empty string")
    if len(key) > limits.max_key_length:
        raise TagError(
            root,
            f"tag name {quoted(key)} has {len(key)} characters; expected at most {limits.max_key_length}",
        )


def _checked_list(items: list[Any], path: str, limits: TagLimits) -> list[TagScalar]:
    if len(items) > limits.max_list_length:
        raise TagError(path, f"list has {len(items)} elements; expected at most {limits.max_list_length}")
    for i, item in enumerate(items):
        if isinstance(item, list):
            raise TagError(f"{path}[{i}]", f"nested lists are not allowed; expected {_EXPECTED_ELEMENT}")
        _check_scalar(item, f"{path}[{i}]", limits, _EXPECTED_ELEMENT)
    return list(items)


def _check_scalar(value: Any, path: str, limits: TagLimits, expected: str) -> None:
    if value is None:
        raise TagError(path, f"null is not allowed; expected {expected}")
    if isinstance(value, dict):
        raise TagError(path, f"nested objects are not allowed; expected {expected}")
    problem = scalar_problem(value, limits.max_string_length, expected)
    if problem:
        raise TagError(path, problem)
