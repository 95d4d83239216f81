"""Sharded libraries without Ray: a writer that routes by shard, per-shard seqs, snapshots and layout,
in embedded and in cluster mode. Routing by image id: tests/index/search/test_sharding.py; a sharded
search answering as an unsharded one: tests/index/query/test_plan.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from index.errors import InvalidParameter
from index.search.ann import IndexConfig
from index.search.sharding import MAX_SHARDS, shard_of
from index.storage.backends import StorageSettings, open_storage
from index.storage.embedded.catalog import Catalog
from index.storage.embedded.store import NewRecord
from index.writer import LibraryWriter
from tests.index.conftest import unit_vectors

MODEL = {"model": "m", "pretrained": "p", "identity": "m/p", "dim": 16}
#: Snapshots after a few rows, so that shards answer from a snapshot plus a tail; flat throughout
#: (hnsw_min_rows above the library), so every search is exact.
CONFIG = IndexConfig(snapshot_min_rows=8, snapshot_max_tail_rows=8, hnsw_min_rows=100_000)


# -- sharded storage --------------------------------------------------------------------------


def test_sharded_seqs_are_per_shard_and_snapshots_per_shard(settings: StorageSettings) -> None:
    writer = LibraryWriter(open_storage(settings), config=CONFIG)
    writer.create_library("lib", "general_search", None, MODEL, shards=3)
    info = writer.catalog.get("lib")
    vecs = unit_vectors(30)
    # ids of shard 2 only: shards 0 and 1 never move
    ids = [f"x{i}" for i in range(200) if shard_of(f"x{i}", 3) == 2][:10]
    for i, image_id in enumerate(ids):
        writer.add_images("lib", info.uid, [NewRecord(image_id, "u", vecs[i])])
    stores = [data.open_store(True) for data in writer.storage.shards(info)]
    assert [s.last_seq() for s in stores] == [0, 0, 10]
    assert [s.count() for s in stores] == [0, 0, 10]
    manifests = writer.snapshot_all("lib")
    assert [m.live for m in manifests] == [0, 0, 10]
    with pytest.raises(ValueError, match="shard 3 is not a shard of library 'lib'"):
        writer.storage.library(info, 3)
    for s in stores:
        s.close()
    writer.close()


def test_sharded_library_layout_embedded(tmp_path: Path) -> None:
    """A 1-shard library keeps the layout from before shards (no ``shards`` in library.json, the store
    in the library's directory); a sharded one has shards/<k>/ under it; old descriptors load as 1."""
    catalog = Catalog(tmp_path)
    args: dict[str, Any] = {"model": "m", "pretrained": "p", "model_identity": "m/p", "dim": 16}
    catalog.create("one", "general_search", None, **args)
    catalog.create("two", "general_search", None, shards=2, **args)
    one, two = tmp_path / "libraries" / "one", tmp_path / "libraries" / "two"
    assert "shards" not in json.loads((one / "library.json").read_text())
    assert (one / "records.sqlite").exists() and not (one / "shards").exists()
    assert json.loads((two / "library.json").read_text())["shards"] == 2
    assert all((two / "shards" / str(k) / "records.sqlite").exists() for k in range(2))
    assert not (two / "records.sqlite").exists()
    assert catalog.get("one").shards == 1 and catalog.get("two").shards == 2
    assert catalog.get("one").shard_key(0) == catalog.get("one").key
    assert catalog.get("two").shard_key(1) == f"two:{catalog.get('two').uid}:1"


@pytest.mark.parametrize("shards", [0, -1, MAX_SHARDS + 1, True, 2.0, "2"])
def test_catalog_refuses_a_bad_shard_count(tmp_path: Path, shards: Any) -> None:
    catalog = Catalog(tmp_path)
    with pytest.raises(InvalidParameter, match=r"shards .* is invalid; expected an integer from 1 to 64"):
        catalog.create(
            "lib",
            "general_search",
            None,
            model="m",
            pretrained="p",
            model_identity="m/p",
            dim=16,
            shards=shards,
        )
    assert catalog.names() == []
