"""The floors of the code (docs/ARCHITECTURE.md, "Packages"): a package imports only itself and packages on
lower floors, so no import runs back up or sideways. Read from the source with ``ast`` (every import,
also those inside functions and under ``TYPE_CHECKING``), so nothing is imported to check it.

And no import, dotted string (a monkeypatch target, an ``import_path``) or entry point names a module
that is not in the tree: an editable install of another checkout would otherwise answer for a module
that moved away, and a stale name would pass unseen."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from index.search.ann import IndexConfig

ROOT = Path(__file__).resolve().parents[1]

#: The project's top-level packages whose modules are checked.
PACKAGES = ("index", "filters", "deployments", "image_search_client")

#: Floor of each unit (a package or a module, by dotted name; a module belongs to the longest unit its
#: name starts with). A unit imports its own modules and units on lower floors only, never a unit on
#: its own floor. A unit with no module yet is accepted.
FLOORS: dict[str, int] = {
    # The bottom: the error envelope's exceptions, time formatting, the lazy-export helper
    # (index/__init__.py); filters/ is a library of its own (tag filters and tag validation).
    "index": 0,
    "index.errors": 0,
    "index.clock": 0,
    "filters": 0,
    # The client talks HTTP only: it imports none of the server's code.
    "image_search_client": 0,
    "index.search": 1,  # vector structures: ANN kinds, the vector table, calibration, scores, routing
    "index.model": 2,  # model spec, embedder, imaging, batching
    "index.detect": 3,  # detection and crops (uses the model's preprocessing)
    "index.storage": 4,  # interfaces, schema versions, migration, embedded/ and cluster/ backends
    "index.ingest": 5,  # fetch, JSONL lines, the import runner (writes through storage's interfaces)
    "index.query": 5,  # the reader and the cross-shard plan (merge)
    "index.writer": 6,  # every mutation; schedules builds
    "deployments": 7,  # the Ray Serve adapters and the app graph
}

#: Modules of a unit that live outside its package (none since the query layer moved into index/query/).
#: A name that no longer exists is ignored.
MEMBERS: dict[str, str] = {}

#: Units that are one module only, not a prefix: ``index`` is index/__init__.py, not all of index/.
EXACT = frozenset({"index"})

#: Imports forbidden inside a floor: (importer prefix, imported prefix, why).
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    (
        "index.storage.embedded",
        "index.storage.cluster",
        "embedded mode runs without the cluster extra (psycopg, fsspec's object stores)",
    ),
)


@dataclass(frozen=True)
class Arrow:
    """One import: module ``source`` (at ``where``) imports module ``target``."""

    source: str
    target: str
    where: str


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the checked packages, by dotted name."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def arrows(root: Path) -> list[Arrow]:
    """Every import from one project module of :data:`PACKAGES` to another."""
    modules = project_modules(root)
    found: list[Arrow] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import mod`` imports the module pkg.mod when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] in PACKAGES:
                    where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
                    found.append(Arrow(name, target, where))
    return found


def unit_of(module: str, floors: Mapping[str, int]) -> str | None:
    """The longest unit of ``floors`` that ``module`` is or lies in."""
    if module in MEMBERS:
        return MEMBERS[module]
    best: str | None = None
    for unit in floors:
        inside = module == unit or (unit not in EXACT and module.startswith(unit + "."))
        if inside and (best is None or len(unit) > len(best)):
            best = unit
    return best


def violations(
    modules: Iterable[str],
    found: Iterable[Arrow],
    floors: Mapping[str, int] = FLOORS,
    forbidden: Iterable[tuple[str, str, str]] = FORBIDDEN,
) -> list[str]:
    """Every module without a floor and every import that does not point down."""
    problems = [
        f"{m}: no floor (add it, or the package it belongs to, to FLOORS)"
        for m in modules
        if unit_of(m, floors) is None
    ]
    for arrow in found:
        source, target = unit_of(arrow.source, floors), unit_of(arrow.target, floors)
        if source is None or target is None:
            if target is None:
                problems.append(f"{arrow.where}: {arrow.target} has no floor")
            continue
        if source != target and floors[target] >= floors[source]:
            problems.append(
                f"{arrow.where}: {arrow.source} (floor {floors[source]}, {source}) imports {arrow.target} "
                f"(floor {floors[target]}, {target})"
            )
        for importer, imported, why in forbidden:
            within = (arrow.source + ".").startswith(importer + ".")
            if within and (arrow.target + ".").startswith(imported + "."):
                problems.append(f"{arrow.where}: {arrow.source} imports {arrow.target}: {why}")
    return problems


def test_every_import_points_down() -> None:
    modules = project_modules(ROOT)
    assert "index.storage.interfaces" in modules and "index.search.table" in modules  # the walk sees the tree
    assert violations(modules, arrows(ROOT)) == []


def test_the_floor_table_names_no_unknown_floor() -> None:
    """Every unit that exists has a module; units still to come are the ones named as such."""
    modules = project_modules(ROOT)
    missing = {u for u in FLOORS if not any(unit_of(m, FLOORS) == u for m in modules)}
    assert missing <= {"index.query"}
    assert set(MEMBERS.values()) <= set(FLOORS)


def test_the_check_finds_arrows_that_run_up_or_sideways(tmp_path: Path) -> None:
    """The checker itself: an upward, a sideways, a relative and a forbidden import and an unplaced module
    are all reported, with where they are."""
    files = {
        "index/__init__.py": "",
        "index/search/__init__.py": "",
        "index/search/table.py": "from index.storage.embedded.store import Change\n",
        "index/storage/__init__.py": "",
        "index/storage/embedded/__init__.py": "",
        "index/storage/embedded/store.py": "def f():\n    from ..cluster import pg\n",
        "index/storage/cluster/__init__.py": "",
        "index/storage/cluster/pg.py": "from index.search.table import VectorTable\n",
        "index/ingest/__init__.py": "import index.query.plan\n",
        "index/query/__init__.py": "",
        "index/query/plan.py": "from index import search\n",
        "index/newthing.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = violations(project_modules(tmp_path), arrows(tmp_path))
    joined = "\n".join(problems)
    assert "index/search/table.py:1: index.search.table (floor 1, index.search) imports" in joined
    assert (
        "index/ingest/__init__.py:1: index.ingest (floor 5, index.ingest) imports index.query.plan" in joined
    )
    assert (
        "index/storage/embedded/store.py:2: index.storage.embedded.store imports index.storage.cluster.pg"
        in joined
    )
    assert "index.newthing: no floor" in joined
    assert len(problems) == 4, problems  # cluster -> search and query -> search point down


#: Where stale names are looked for: the packages, the tests and the benchmarks.
SCANNED = (*PACKAGES, "tests", "bench")
#: Strings that look dotted but name files (``index.faiss`` in a snapshot, ``index.html``) or floor units.
NOT_NAMES = re.compile(r"\.(faiss|html|json|npy|py|md|yaml|txt)$")
#: Builder-arg paths that read like module names: ``index`` is also the ``AppArgs`` field holding
#: ``IndexConfig`` (docs/configuration.md's rows are named ``index.recall_target`` and so on).
CONFIG_KEYS = frozenset(f"index.{name}" for name in IndexConfig.model_fields)
DOTTED = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?$")


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level, and the names its ``_EXPORTS`` load lazily."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(e.id for e in elements if isinstance(e, ast.Name))
            value = node.value
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(
                value, ast.Dict
            ):
                names.update(
                    k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                )
    return names


def stale_names(root: Path) -> list[str]:
    """Every import, dotted string and entry point naming a project module or attribute that is not there."""
    modules = project_modules(root)
    defined: dict[str, set[str]] = {}

    def has(module: str, name: str) -> bool:
        if f"{module}.{name}" in modules:
            return True
        if module not in defined:
            defined[module] = top_level_names(modules[module])
        return name in defined[module]

    def resolves(dotted: str) -> bool:
        path, _, attr = dotted.partition(":")
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            if module in modules:
                rest = parts[i:] or ([attr] if attr else [])
                return not rest or has(module, rest[0])
        return False

    problems: list[str] = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            where = path.relative_to(root)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    bad = [
                        a.name
                        for a in node.names
                        if a.name.split(".")[0] in PACKAGES and a.name not in modules
                    ]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    if node.module.split(".")[0] not in PACKAGES:
                        continue
                    if node.module not in modules:
                        bad = [node.module]
                    else:
                        bad = [f"{node.module}.{a.name}" for a in node.names if not has(node.module, a.name)]
                elif (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and DOTTED.match(node.value)
                ):
                    name = node.value
                    known = NOT_NAMES.search(name) or name in FLOORS or name in MEMBERS or name in CONFIG_KEYS
                    bad = [] if known or resolves(name) else [name]
                else:
                    continue
                problems += [f"{where}:{node.lineno}: {name}" for name in bad]
    scripts = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("scripts", {})
    problems += [
        f"pyproject.toml: {name} = {target}" for name, target in scripts.items() if not resolves(target)
    ]
    for config in sorted([*root.glob("serve_config*.yaml"), *root.glob("deploy/**/*.yaml")]):
        for target in re.findall(r"import_path:\s*(\S+)", config.read_text()):
            if not resolves(target):
                problems.append(f"{config.relative_to(root)}: import_path {target}")
    return problems


def test_no_name_points_at_a_module_that_is_not_there() -> None:
    assert stale_names(ROOT) == []


def test_stale_names_are_found(tmp_path: Path) -> None:
    files = {
        "index/__init__.py": "",
        "index/storage/__init__.py": '_EXPORTS = {"Storage": "backends"}\n',
        "index/storage/backends.py": "import os\nclass Storage: ...\n",
        "tests/test_x.py": (
            "from index.storage import Storage, backends\n"
            "from index.storage.backends import Storage, Gone\n"
            "import index.store\n"
            "T1 = 'index.storage.backends.os.path'\n"
            "T2 = 'index.store.time'\n"
        ),
        "pyproject.toml": (
            '[project.scripts]\nok = "index.storage.backends:Storage"\ngone = "index.migrate:main"\n'
        ),
        "serve_config.yaml": "import_path: index.storage:nothing\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert stale_names(tmp_path) == [
        "tests/test_x.py:2: index.storage.backends.Gone",
        "tests/test_x.py:3: index.store",
        "tests/test_x.py:5: index.store.time",
        "pyproject.toml: gone = index.migrate:main",
        "serve_config.yaml: import_path index.storage:nothing",
    ]
