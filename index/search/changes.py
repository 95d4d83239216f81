"""What a vector table applies: the rows of a library's change feed (every backend's record store sends
them, ``changes_since``), and the kinds of vector a row may hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

VECTOR_KINDS = ("whole", "item", "face")


@dataclass(frozen=True)
class Change:
    """A row as the change feed sends it to readers; ``vector`` is None for tombstones."""

    row_id: int
    seq: int
    deleted: bool
    vector: np.ndarray | None
    vector_kind: str
    tags: dict[str, Any]
