"""docs/configuration.md is generated from AppArgs (deployments/config_reference.py) and kept fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from deployments.config import AppArgs
from deployments.config_reference import COMMAND, OUTPUT, _models, main, render

ROOT = OUTPUT.parent.parent


def test_committed_reference_is_fresh() -> None:
    assert OUTPUT.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}` and commit it"


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_arg_and_nested_field_has_a_row() -> None:
    rows = _rows(render())
    assert set(AppArgs.model_fields) <= set(rows)
    for name, field in AppArgs.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            assert {f"{name}.{f}" for f in nested.model_fields} <= set(rows), name
    assert {"dedicated_shards[].library", "dedicated_shards[].shards"} <= set(rows)


def test_rows_carry_type_default_bounds_and_description() -> None:
    rows = _rows(render())
    assert rows["limits.max_top_k"][1:4] == ["integer", "`1000`", "> 0, <= 1000"]
    assert rows["index.recall_target"][1:4] == ["number", "`0.95`", ">= 0.5, <= 1.0"]
    assert rows["index.memory_budget_bytes"][1:4] == ["integer or null", "`null`", "> 0"]
    assert rows["index.calibration_selectivities"][3] == "each > 0.0, <= 1.0"
    assert rows["precision"][1] == 'one of `"auto"`, `"fp32"`, `"fp16"`, `"bf16"`'
    assert rows["object_store_allowed"][2] == "`{}`"
    assert rows["dedicated_shards[].library"][2] == "required"
    assert rows["limits"][1] == "object ([Limits](#limits))"
    assert rows["text_score_scale"][4] == AppArgs.model_fields["text_score_scale"].description
    # Descriptions are literal text: no HTML tag, no emphasis.
    assert "Authorization: Bearer &lt;key&gt;" in rows["api_keys"][4]
    assert "hnsw_ef_search / s\\*\\*2" in rows["index.hnsw_ef_search"][4]


class _Nested(BaseModel):
    size: int = Field(3, ge=1, description="a size")
    colour: str = "red"


class _Root(BaseModel):
    nested: _Nested = Field(default_factory=_Nested, description="a nested model")


def test_a_field_without_description_is_refused() -> None:
    with pytest.raises(ValueError, match=r"nested\.colour"):
        render(_Root)


def test_check_fails_on_a_stale_file_and_rewriting_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "configuration.md"
    out.write_text(render().replace("`1000`", "`999`", 1))
    assert main(["--check", "--output", str(out)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--output", str(out)]) == 0
    assert main(["--check", "--output", str(out)]) == 0


def test_the_generator_does_not_import_ray() -> None:
    code = (
        "import sys, deployments.config_reference\n"
        "print([m for m in sys.modules if m == 'ray' or m.startswith('ray.')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_unknown_fields_are_refused_at_every_level_as_the_reference_says() -> None:
    assert "an\nunknown one (at any level) fails the deploy" in render()
    models = {"AppArgs": AppArgs, **_models(AppArgs)}
    extra = {name: m.model_config.get("extra") for name, m in models.items()}
    assert extra == dict.fromkeys(models, "forbid")
