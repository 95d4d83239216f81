"""Catalog and PgCatalog: the library object per mode, the face-model identity a library records, model
checks, create/delete rules. Tests taking ``backend`` run on both backends."""

from __future__ import annotations

import json

import pytest

from index.errors import (
    InvalidParameter,
    LibraryAlreadyExists,
    LibraryLimitReached,
    LibraryNotFound,
    ModelMismatch,
)
from index.storage.embedded.catalog import Catalog, check_served_model, library_object
from index.storage.interfaces import LibraryCatalog

SERVED = {"identity": "tiny-random/random-seed-0", "face_identity": None}


def create(catalog: LibraryCatalog, name: str, mode: str, face: str | None = None):
    return catalog.create(
        name,
        mode,
        None,
        model="tiny-random",
        pretrained="random",
        model_identity=SERVED["identity"],
        dim=64,
        face_model_identity=face,
    )


@pytest.mark.parametrize(
    "mode, embedding",
    [
        ("general_search", "whole_image"),
        ("item_search", "item_crop"),
        ("adaptive_search", "face_crop_or_whole_image"),
    ],
)
def test_library_object_says_what_is_embedded(backend, mode, embedding) -> None:
    catalog = backend.catalog()
    info = create(catalog, "lib", mode, face="faces/v1")
    obj = library_object(catalog.get("lib"), 0, "flat")
    assert obj["embedding"] == embedding and obj["mode"] == mode
    if mode == "adaptive_search":
        assert obj["face_model"] == "faces/v1"
    else:
        assert "face_model" not in obj and info.face_model_identity is None  # faces are not used


def test_face_model_identity_is_durable(backend) -> None:
    create(backend.catalog(), "faces", "adaptive_search", face="faces/v1")
    assert backend.catalog().get("faces").face_model_identity == "faces/v1"


def test_old_descriptors_without_a_face_model_still_load(tmp_path) -> None:
    catalog = Catalog(tmp_path)
    create(catalog, "faces", "adaptive_search", face="faces/v1")
    # a library.json written before the field existed
    path = catalog.library_dir("faces") / "library.json"
    raw = json.loads(path.read_text())
    del raw["face_model_identity"]
    path.write_text(json.dumps(raw))
    assert catalog.get("faces").face_model_identity is None


def test_served_model_must_match_including_the_face_model(backend) -> None:
    catalog = backend.catalog()
    plain = create(catalog, "plain", "adaptive_search")
    with_face = create(catalog, "with_face", "adaptive_search", face="faces/v1")
    general = create(catalog, "general", "general_search")
    check_served_model(plain, SERVED)
    check_served_model(general, SERVED | {"face_identity": "faces/v1"})  # faces are not its business
    check_served_model(with_face, SERVED | {"face_identity": "faces/v1"})
    with pytest.raises(ModelMismatch, match=r"built with model 'face model faces/v1'.*no face model"):
        check_served_model(with_face, SERVED)
    with pytest.raises(ModelMismatch, match=r"no face model.*'face model faces/v2'"):
        check_served_model(plain, SERVED | {"face_identity": "faces/v2"})
    with pytest.raises(ModelMismatch, match="ViT-B-32/x"):
        check_served_model(general, {"identity": "ViT-B-32/x", "face_identity": None})


def test_create_list_delete_and_the_rules_of_create(backend) -> None:
    catalog = backend.catalog(max_libraries=2)
    assert isinstance(catalog, LibraryCatalog)
    first = create(catalog, "b-lib", "general_search")
    with pytest.raises(LibraryAlreadyExists):
        create(catalog, "b-lib", "item_search")
    with pytest.raises(InvalidParameter, match=r"library_name '\.\./x' is invalid"):
        create(catalog, "../x", "general_search")
    with pytest.raises(InvalidParameter, match="mode 'nope' is invalid"):
        create(catalog, "c", "nope")
    create(catalog, "a-lib", "item_search")
    with pytest.raises(LibraryLimitReached):
        create(catalog, "c", "general_search")
    assert catalog.names() == ["a-lib", "b-lib"]
    assert [i.name for i in catalog.list()] == ["a-lib", "b-lib"]
    assert catalog.get("b-lib") == first
    catalog.delete("b-lib")
    with pytest.raises(LibraryNotFound):
        catalog.get("b-lib")
    with pytest.raises(LibraryNotFound):
        catalog.delete("b-lib")
    catalog.empty_trash()
    again = create(catalog, "b-lib", "general_search")
    assert again.uid != first.uid  # a re-created library is another library


def test_counts_live_records_and_delete_takes_them_along(backend) -> None:
    import numpy as np

    from index.storage.embedded.store import NewRecord

    catalog = backend.catalog()
    info = create(catalog, "lib", "general_search")
    vec = np.ones(64, np.float32) / 8
    with backend.store(info) as store:
        store.upsert([NewRecord("a", "u", vec, frame=b"jpeg"), NewRecord("b", "u", vec)])
        store.delete("b", None)
    with backend.store(info) as store:
        assert store.count() == 1  # what the library object reports (index.storage.backends.describe_library)
    catalog.delete("lib")
    fresh = create(catalog, "lib", "general_search")
    with backend.store(fresh) as store:
        assert store.count() == 0 and store.last_seq() == 0 and store.get("a") == []
