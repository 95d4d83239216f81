"""IndexConfig and ScoreCalibration: pydantic models like the rest of the configuration (bounds, descriptions,
unknown fields refused, frozen, and safe to ship to Ray replicas)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from index.search.ann import IndexConfig
from index.search.scores import ScoreCalibration


@pytest.mark.parametrize("model", [IndexConfig, ScoreCalibration])
def test_every_field_is_described(model: type[BaseModel]) -> None:
    undescribed = [name for name, field in model.model_fields.items() if not field.description]
    assert undescribed == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hnsw_m", 2),
        ("hnsw_min_rows", 0),
        ("memory_budget_bytes", 0),
        ("pq_nbits", 16),
        ("recall_target", 0.4),
        ("recall_target", 1.1),
        ("compact_dead_fraction", 1.0),
        ("calibration_selectivities", [0.5, 0.0]),
        ("calibration_selectivities", [1.5]),
        ("search_threads", -1),
    ],
)
def test_index_config_bounds_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        IndexConfig.model_validate({field: value})


def test_index_config_refuses_unknown_fields_and_is_frozen() -> None:
    with pytest.raises(ValidationError, match="hnsw_ef"):
        IndexConfig.model_validate({"hnsw_ef": 64})
    config = IndexConfig()
    with pytest.raises(ValidationError):
        config.hnsw_m = 8  # type: ignore[misc]


def test_index_config_from_json_and_across_processes() -> None:
    # AppArgs hands it JSON (lists for tuples); replicas receive it pickled.
    config = IndexConfig.model_validate({"calibration_selectivities": [0.3, 0.1], "hnsw_ef_search": 64})
    assert config.calibration_selectivities == (0.3, 0.1)
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and hash(copy) == hash(config)
    assert IndexConfig.model_validate(config.model_dump()) == config


def test_score_calibration_refuses_a_scale_that_is_not_positive() -> None:
    for scale in (0.0, -0.04):
        with pytest.raises(ValidationError, match="text_scale"):
            ScoreCalibration(text_scale=scale)
    with pytest.raises(ValidationError, match="center"):
        ScoreCalibration.model_validate({"center": 0.3})


def test_score_calibration_maps_cosines() -> None:
    scores = ScoreCalibration(text_center=0.3, text_scale=0.05)
    text = scores.for_query("text", np.array([0.3, 0.35, 0.4, 0.2]))
    np.testing.assert_allclose(text, [0.5, 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2))])
    np.testing.assert_allclose(scores.for_query("image", np.array([-0.2, 0.5, 1.0])), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="query kind"):
        scores.for_query("audio", np.array([0.1]))
    assert pickle.loads(pickle.dumps(scores)) == scores
