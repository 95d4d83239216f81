"""The JSON scalars that tags and filter values may hold, and how messages describe a value.

Three kinds of scalar exist: strings, finite numbers and booleans. Python makes ``bool`` a subclass of
``int``, so every check here tests for ``bool`` first: a boolean is never a number.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeAlias

Kind: TypeAlias = Literal["str", "num", "bool"]

STR: Kind = "str"
NUM: Kind = "num"
BOOL: Kind = "bool"

_SHOWN_CHARS = 40


def scalar_kind(value: Any) -> Kind | None:
    """The kind of a scalar, or None for anything else (lists, objects, null, other Python types).

    Args:
        value: a decoded JSON value.

    Returns:
        ``"bool"``, ``"num"`` or ``"str"``; None when `value` is none of those. Finiteness is not
        checked here: see `number_problem`.
    """
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, float)):
        return NUM
    if isinstance(value, str):
        return STR
    return None


def number_problem(value: int | float) -> str | None:
    """Why a number cannot be stored as a float64 filter/tag value, or None when it can.

    Args:
        value: an int or float (not a bool).

    Returns:
        A reason naming the value, or None.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{show(value)} is not allowed; expected a finite number (no NaN or infinities)"
    try:
        float(value)
    except OverflowError:
        return "number is too large; expected a finite number within the float64 range (about ±1.8e308)"
    return None


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("string", "number", ...), or the Python type name otherwise."""
    kind = scalar_kind(value)
    if kind is not None:
        return {STR: "string", NUM: "number", BOOL: "boolean"}[kind]
    if value is None:
        return "null"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def quoted(text: str) -> str:
    """A string as Python quotes it, shortened so that a huge input cannot flood a message."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + "…"
    return repr(text)


def show(value: Any) -> str:
    """A short description of a value for error messages, e.g. ``string 'red'`` or ``boolean true``.

    Args:
        value: any decoded JSON value.

    Returns:
        The JSON type name, followed by the value itself for scalars.
    """
    kind = scalar_kind(value)
    if kind == STR:
        return f"string {quoted(value)}"
    if kind == BOOL:
        return "boolean true" if value else "boolean false"
    if kind == NUM:
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        text = repr(value)
        return "number " + (text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…")
    return json_type(value)


def scalar_problem(value: Any, max_string_length: int, expected: str) -> str | None:
    """Why `value` is not an acceptable scalar (string, finite number or boolean), or None.

    Args:
        value: a decoded JSON value.
        max_string_length: the longest string accepted, in characters.
        expected: the phrase naming what was expected, used when the type is wrong.

    Returns:
        A reason naming the value and what was expected, or None when `value` is fine.
    """
    kind = scalar_kind(value)
    if kind is None:
        return f"expected {expected}, got {show(value)}"
    if kind == NUM:
        return number_problem(value)
    if kind == STR and len(value) > max_string_length:
        return f"string of {len(value)} characters is too long; expected at most {max_string_length}"
    return None
