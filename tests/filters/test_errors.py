"""filters.errors: message format, attributes, and survival across pickling (Ray ships exceptions)."""

from __future__ import annotations

import pickle

import pytest

from filters import FilterError, TagError
from filters.errors import PathError


@pytest.mark.parametrize("error_type", [FilterError, TagError])
def test_message_is_path_colon_reason(error_type: type[PathError]) -> None:
    error = error_type("tag_filter[1].or[0].op", "unknown operator 'like'")

    assert isinstance(error, ValueError)
    assert error.path == "tag_filter[1].or[0].op"
    assert error.reason == "unknown operator 'like'"
    assert str(error) == "tag_filter[1].or[0].op: unknown operator 'like'"


@pytest.mark.parametrize("error_type", [FilterError, TagError])
def test_pickle_round_trip_keeps_path_and_reason(error_type: type[PathError]) -> None:
    error = error_type("tags.color[2]", "null is not allowed")

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is error_type
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))
