"""filters.tags: what a record's `tags` may hold, and the paths of what it may not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from filters import TagError, TagLimits, validate_tags

VALID = [
    pytest.param({}, id="empty"),
    pytest.param({"color": "white", "season": "summer"}, id="seed example"),
    pytest.param({"price": 50, "weight": 0.25, "stock": -3, "big": 2**60, "tiny": 1e-300}, id="numbers"),
    pytest.param({"on_sale": True, "new": False}, id="booleans"),
    pytest.param({"sizes": ["S", "M"], "mixed": ["a", 1, 2.5, True], "none": []}, id="lists"),
    pytest.param({"颜色": "红色", "a b": "", "x.y": "\x00"}, id="any non-empty key, any string"),
]


@pytest.mark.parametrize("tags", VALID)
def test_valid_tags_come_back_equal(tags: dict[str, Any]) -> None:
    assert validate_tags(tags) == tags


def test_result_is_a_copy() -> None:
    tags = {"sizes": ["S"], "color": "red"}

    result = validate_tags(tags)
    result["sizes"].append("M")  # type: ignore[union-attr]
    result["extra"] = 1

    assert tags == {"sizes": ["S"], "color": "red"}


def test_types_are_kept() -> None:
    result = validate_tags({"flag": True, "count": 1, "ratio": 1.0})

    assert [type(value) for value in result.values()] == [bool, int, float]


INVALID: list[tuple[Any, str, list[str]]] = [
    # (raw, path, fragments of the reason)
    ([], "tags", ["expected an object mapping tag names to values", "got list"]),
    (None, "tags", ["got null"]),
    ("color=red", "tags", ["got string 'color=red'"]),
    ({"": "x"}, "tags", ["empty tag name", "expected a non-empty string"]),
    ({1: "x"}, "tags", ["tag names must be strings", "got number 1"]),
    ({"k" * 129: "x"}, "tags", ["has 129 characters", "expected at most 128"]),
    ({"color": None}, "tags.color", ["null is not allowed", "expected a string, a finite number, a boolean"]),
    ({"color": {"main": "red"}}, "tags.color", ["nested objects are not allowed"]),
    ({"price": float("nan")}, "tags.price", ["NaN is not allowed", "expected a finite number"]),
    ({"price": float("inf")}, "tags.price", ["Infinity is not allowed"]),
    ({"price": float("-inf")}, "tags.price", ["-Infinity is not allowed"]),
    ({"price": 10**400}, "tags.price", ["number is too large"]),
    ({"color": ("red",)}, "tags.color", ["got tuple"]),
    ({"color": "x" * 1025}, "tags.color", ["string of 1025 characters is too long", "at most 1024"]),
    (
        {"color": ["red", "blue", None]},
        "tags.color[2]",
        ["null is not allowed", "a finite number or a boolean"],
    ),
    ({"color": ["red", ["blue"]]}, "tags.color[1]", ["nested lists are not allowed"]),
    ({"color": [{"a": 1}]}, "tags.color[0]", ["nested objects are not allowed"]),
    ({"n": [1, float("nan")]}, "tags.n[1]", ["NaN is not allowed"]),
    ({"s": ["x" * 1025]}, "tags.s[0]", ["too long"]),
    ({"sizes": list(range(257))}, "tags.sizes", ["list has 257 elements; expected at most 256"]),
    ({"a b": None}, 'tags["a b"]', ["null is not allowed"]),
    ({"x.y": [None]}, 'tags["x.y"][0]', ["null is not allowed"]),
    ({"颜色": None}, "tags.颜色", ["null is not allowed"]),
    ({f"k{i}": 1 for i in range(65)}, "tags", ["65 tags is too many; expected at most 64"]),
]


@pytest.mark.parametrize(("raw", "path", "fragments"), INVALID, ids=lambda value: repr(value)[:50])
def test_invalid_tags_name_the_path(raw: Any, path: str, fragments: list[str]) -> None:
    with pytest.raises(TagError) as caught:
        validate_tags(raw)

    error = caught.value
    assert error.path == path
    assert str(error) == f"{path}: {error.reason}"
    for fragment in fragments:
        assert fragment in error.reason


def test_limits_are_inclusive() -> None:
    tags = {"k" * 128: "x" * 1024, "list": list(range(256))} | {f"k{i}": i for i in range(62)}

    assert validate_tags(tags) == tags


def test_json_nan_is_rejected() -> None:
    with pytest.raises(TagError, match=r"^tags\.price: NaN"):
        validate_tags(json.loads('{"price": NaN}'))


def test_custom_root_and_limits() -> None:
    limits = TagLimits(max_keys=1, max_list_length=1)

    with pytest.raises(TagError) as caught:
        validate_tags({"a": [1, 2]}, root="body.tags", limits=limits)

    assert str(caught.value) == "body.tags.a: list has 2 elements; expected at most 1"


@pytest.mark.parametrize("bad", [0, -5, False, 1.5, "64"])
@pytest.mark.parametrize("name", ["max_keys", "max_key_length", "max_string_length", "max_list_length"])
def test_tag_limits_must_be_positive_integers(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        TagLimits(**{name: bad})
