"""index.catalog: the library object per mode, the face-model identity a library records, model checks."""

from __future__ import annotations

import json

import pytest

from index.catalog import Catalog, check_served_model
from index.errors import ModelMismatch

SERVED = {"identity": "tiny-random/random-seed-0", "face_identity": None}


def create(catalog: Catalog, name: str, mode: str, face: str | None = None):
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
def test_library_object_says_what_is_embedded(tmp_path, mode, embedding) -> None:
    catalog = Catalog(tmp_path)
    info = create(catalog, "lib", mode, face="faces/v1")
    obj = catalog.describe(info)
    assert obj["embedding"] == embedding
    if mode == "adaptive_search":
        assert obj["face_model"] == "faces/v1"
    else:
        assert "face_model" not in obj and info.face_model_identity is None  # faces are not used
    assert catalog.mode_of("lib") == mode
    assert catalog.mode_of("missing") is None and catalog.mode_of("../bad") is None


def test_face_model_identity_is_durable_and_old_descriptors_still_load(tmp_path) -> None:
    catalog = Catalog(tmp_path)
    create(catalog, "faces", "adaptive_search", face="faces/v1")
    assert Catalog(tmp_path).get("faces").face_model_identity == "faces/v1"
    # a library.json written before the field existed
    path = catalog.library_dir("faces") / "library.json"
    raw = json.loads(path.read_text())
    del raw["face_model_identity"]
    path.write_text(json.dumps(raw))
    assert catalog.get("faces").face_model_identity is None


def test_served_model_must_match_including_the_face_model(tmp_path) -> None:
    catalog = Catalog(tmp_path)
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
