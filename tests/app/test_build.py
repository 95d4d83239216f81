"""deployments.app.build_app and AppArgs: detection and face-model settings are checked when the app is
built, before any replica starts (no Ray needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.app import build_app
from deployments.config import AppArgs


def test_detection_args_reach_the_plain_config() -> None:
    args = AppArgs.model_validate(
        {
            "model": "tiny-random",
            "item_detector": {"kind": "clip-regions", "margin": 0.1, "min_probability": 0.7},
            "face_detector": {"align": False, "min_face_fraction": 0.1},
        }
    )
    config = args.detection_config()
    assert config.item_detector.kind == "clip-regions" and config.item_detector.margin == 0.1
    assert config.item_detector.min_probability == 0.7
    assert config.face_detector.align is False and config.face_detector.min_face_fraction == 0.1
    assert AppArgs.model_validate({}).detection_config().item_detector.kind == "saliency"


@pytest.mark.parametrize(
    "raw",
    [
        {"item_detector": {"kind": "yolo"}},
        {"item_detector": {"margin": 2}},
        {"item_detector": {"tresholds": 1}},  # typo: unknown key
        {"face_detector": {"scale_factor": 1.0}},
        {"face_detector": {"item_prompts": ["x"]}},
    ],
)
def test_bad_detection_args_are_refused(raw) -> None:
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"model": "tiny-random", **raw})


def test_build_refuses_a_missing_cascade(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"haarcascade_nope\.xml"):
        build_app(
            {
                "model": "tiny-random",
                "storage_root": str(tmp_path),
                "face_detector": {"cascade": "haarcascade_nope.xml"},
            }
        )


def test_build_refuses_a_face_model_of_another_dimension(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"512-d vectors .* 64-d"):
        build_app(
            {
                "model": "tiny-random",
                "storage_root": str(tmp_path),
                "face_model": "ViT-B-32",
                "face_pretrained": "random",
            }
        )
    with pytest.raises(ValueError, match="face_pretrained is set but face_model is not"):
        build_app({"model": "tiny-random", "storage_root": str(tmp_path), "face_pretrained": "random"})
