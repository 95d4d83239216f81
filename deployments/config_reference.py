"""docs/configuration.md, generated from ``AppArgs``'s JSON schema.

    python -m deployments.config_reference           # rewrite docs/configuration.md
    python -m deployments.config_reference --check   # exit 1 when the committed file is stale

Every builder arg gets a row (type, default, bounds, the ``Field(description=...)`` text) and every nested
model (``limits``, ``index``, ``imports``, ...) a table of its own, so a default is written in one place:
the pydantic model. Plain Python: it imports the models, never Ray.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from deployments.config import DEFAULT_PRETRAINED, AppArgs

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMAND = "python -m deployments.config_reference"

INTRO = """\
The builder arguments of `deployments.app:build_app`: the `args:` of an application in a Serve config
(`serve_config.yaml`, `serve_config.cluster.yaml`, a KubeRay `RayService`'s `serveConfigV2`), or
`key=value` after `serve run deployments.app:build_app`. Deployment-level knobs (replicas,
autoscaling, resources, the Encoder's batch sizes in `user_config`) live in the Serve config's
`deployments:` section instead ([operations.md](operations.md)). Every argument is optional, and an
unknown one (at any level) fails the deploy with "extra inputs are not permitted".

- On the `serve run` command line every value is a string: list args take comma-separated values or a
  JSON list (`import_roots=/a,/b`), object args a JSON object (`limits='{"max_top_k": 100}'`); scalars
  are converted (`text_score_scale=0.05`).
- Relative paths (`storage_root`, `import_roots`, `allowed_file_roots`, `api_keys_file`, `cache_dir`,
  `database_password_file`) are made absolute in the directory the builder runs in (`serve run`'s),
  never in a replica's working directory.
- A nested model is given whole or in part: `index: {hnsw_min_rows: 50000}` keeps every other field of
  `index` at its default.
- Defaults are JSON values; `null` is Python's `None` (YAML `null` or `~`)."""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _plain(text: str) -> str:
    """A description as literal text in a table cell: no HTML tags (``<key>``) and no emphasis (``s**2``)."""
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return _cell(text)


def _prose(text: str) -> str:
    """A docstring as Markdown: ``x`` and :class:`x` become `x`."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(prop: dict[str, Any], anchors: dict[str, str]) -> str:
    if "$ref" in prop:
        name = _ref_name(prop["$ref"])
        return f"object ([{name}](#{anchors[name]}))"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "anyOf" in prop:
        kinds = [_type(p, anchors) for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = any(p.get("type") == "null" for p in prop["anyOf"])
        return " or ".join(kinds + (["null"] if nullable else []))
    kind = prop.get("type")
    if kind == "array":
        items = prop.get("items")
        if "prefixItems" in prop or not items:
            return "list"
        return f"list of {_type(items, anchors)}"
    if kind == "object":
        values = prop.get("additionalProperties")
        if isinstance(values, dict) and ("$ref" in values or values.get("type") not in (None, "object")):
            return f"object of {_type(values, anchors)}"
        return "object"
    if kind is None:
        return "any"
    fmt = prop.get("format")
    if fmt == "ipvanynetwork":
        return "CIDR network"
    return f"{kind} ({fmt})" if fmt else str(kind)


_BOUNDS = (
    ("exclusiveMinimum", "> {}"),
    ("minimum", ">= {}"),
    ("exclusiveMaximum", "< {}"),
    ("maximum", "<= {}"),
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minItems", "at least {} item(s)"),
    ("maxItems", "at most {} item(s)"),
    ("pattern", "matches `{}`"),
)


def _bounds(prop: dict[str, Any]) -> list[str]:
    out = [template.format(prop[key]) for key, template in _BOUNDS if key in prop]
    for member in prop.get("anyOf", []):
        out += _bounds(member)
    items = prop.get("items")
    if isinstance(items, dict) and "$ref" not in items:
        inner = _bounds(items)
        if inner:
            out.append("each " + ", ".join(inner))
    return out


def _default(model: type[BaseModel], name: str, prop: dict[str, Any]) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "required"
    if "$ref" in prop:
        return "(its fields' defaults)"
    if "default" in prop:
        value = prop["default"]
    else:
        value = field.get_default(call_default_factory=True)
        if value is PydanticUndefined:
            return "required"
    return f"`{json.dumps(to_jsonable_python(value))}`"


def _models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``model``'s fields, by class name (as the JSON schema's $defs)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(m: type[BaseModel]) -> None:
        for field in m.model_fields.values():
            for t in _classes(field.annotation):
                if issubclass(t, BaseModel) and t.__name__ not in found:
                    found[t.__name__] = t
                    visit(t)

    visit(model)
    return found


def _classes(annotation: Any) -> Iterator[type]:
    if isinstance(annotation, type):
        yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _classes(arg)


def _sections(
    schema: dict[str, Any], root: type[BaseModel]
) -> list[tuple[str, str, dict[str, Any], type[BaseModel]]]:
    """(title, def name, schema, model) of the root and each nested model, in the order they are met."""
    defs = schema.get("$defs", {})
    models = _models(root)
    out = [("Builder arguments", "", schema, root)]
    seen: set[str] = set()

    def visit(prefix: str, sch: dict[str, Any]) -> None:
        for name, prop in sch.get("properties", {}).items():
            ref = prop.get("$ref") or (prop.get("items") or {}).get("$ref")
            if ref is None:
                continue
            def_name = _ref_name(ref)
            if def_name in seen:
                continue
            seen.add(def_name)
            path = f"{prefix}{name}" + ("[]" if "$ref" not in prop else "")
            out.append((path, def_name, defs[def_name], models[def_name]))
            visit(path + ".", defs[def_name])

    visit("", schema)
    return out


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", title.lower().replace(" ", "-").replace(".", "-"))


def render(root: type[BaseModel] = AppArgs) -> str:
    """The Markdown reference of ``root``'s fields and its nested models.

    Raises:
        ValueError: a field has no ``Field(description=...)``.
    """
    schema = root.model_json_schema()
    sections = _sections(schema, root)
    anchors = {def_name: _anchor(title) for title, def_name, _, _ in sections if def_name}
    missing = [
        f"{title}.{name}" if def_name else name
        for title, def_name, sch, _ in sections
        for name, prop in sch.get("properties", {}).items()
        if not prop.get("description")
    ]
    if missing:
        raise ValueError(f"fields without Field(description=...): {', '.join(missing)}")
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from deployments/config.py (AppArgs) by `{COMMAND}`: do not edit by hand;",
        "     tests/deployments/test_config_reference.py fails when this file is stale. -->",
        "",
        INTRO,
        "",
        "Contents: " + ", ".join(f"[{t}](#{_anchor(t)})" for t, _, _, _ in sections) + ".",
    ]
    for title, def_name, sch, model in sections:
        lines += ["", f"## {title}", ""]
        if def_name:
            lines += [f"`{title}` ({def_name}): {_prose(sch.get('description', '')).strip()}", ""]
        prefix = f"{title}." if def_name else ""
        lines += ["| arg | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, prop in sch["properties"].items():
            cells = [
                f"`{prefix}{name}`",
                _type(prop, anchors),
                _default(model, name, prop),
                ", ".join(_bounds(prop)),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | {_plain(prop['description'])} |")
        if not def_name and root is AppArgs:
            lines += [
                "",
                "`pretrained`'s default per model (`DEFAULT_PRETRAINED`; other models need `pretrained`):",
                "",
                "| model | pretrained |",
                "|---|---|",
                *(f"| `{m}` | `{tag}` |" for m, tag in DEFAULT_PRETRAINED.items()),
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs; write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
