"""The package layout's promises: the parts that fetch and keep tasks do not load the model's stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


LIGHT = [
    "index.ingest.fetch",
    "index.errors",
    "index.search.sharding",
    "index.storage.tasks",
    "index.storage.interfaces",
    "index.storage.backends",
    "index.storage.embedded.catalog",
    "index.storage.embedded.tasks",
    "index.storage.cluster.pg",
    "index.storage.cluster.blobs",
]


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module: str) -> None:
    heavy = "('torch', 'open_clip', 'cv2')"
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_ingest_exports_load_on_first_use() -> None:
    import index.ingest

    assert index.ingest.ImportRunner.__module__ == "index.ingest.importer"
    assert index.ingest.fetch_bytes.__module__ == "index.ingest.fetch"
    assert set(index.ingest.__all__) <= set(dir(index.ingest)) | set(index.ingest._EXPORTS)
    with pytest.raises(AttributeError):
        index.ingest.no_such_name  # noqa: B018


def test_the_query_layer_imports_without_ray() -> None:
    """index.query is plain Python: the ingress adapts Serve handles to it, not the other way round."""
    edge = "('ray', 'fastapi', 'deployments')"
    code = f"import sys, index.query; print(sorted(m for m in {edge} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
