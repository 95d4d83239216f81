"""The engine without Ray, in floors (docs/ARCHITECTURE.md, "Packages"): ``search`` (vector structures),
``model``, ``detect``, ``storage`` (embedded and cluster backends), ``ingest`` and the query layer, and the
writer on top; ``errors`` and ``clock`` at the bottom. tests/test_layers.py keeps every import pointing
down.

Sub-packages export their contract by name and import a module only when one of its names is first used
(:func:`lazy_export`), so that importing one light module never loads the heavy ones beside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_export(package: str, exports: Mapping[str, str], name: str) -> Any:
    """A package's ``__getattr__``: ``name`` from the module ``exports[name]`` of ``package``, imported
    on first use.

    Raises:
        AttributeError: ``package`` exports no ``name``.
    """
    module = exports.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{package}.{module}"), name)
