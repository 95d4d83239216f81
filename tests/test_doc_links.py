"""Relative links in README.md and docs/*.md point to files that exist and to headings those files have
(GitHub's anchors), so moving text between documents cannot leave a dangling link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings in ``path`` (lower case, punctuation dropped, spaces to hyphens;
    a repeated heading gets -1, -2, ...), plus explicit ``<a id=...>``."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(_strip_code(path.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: ...
    ]


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.name} has no heading with anchor #{anchor}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_checker_finds_a_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A title\n\n## Overload: a fast 503\n\nSee [x](#overload-a-fast-503).\n")
    assert anchors(tmp_path / "a.md") == {"a-title", "overload-a-fast-503"}
    assert links(tmp_path / "a.md") == ["#overload-a-fast-503"]
    (tmp_path / "b.md").write_text("[gone](a.md#no-such-heading) [ok](a.md) `[code](nowhere.md)`\n")
    assert links(tmp_path / "b.md") == ["a.md#no-such-heading", "a.md"]
    assert broken_links(tmp_path / "a.md") == []
    assert broken_links(tmp_path / "b.md") == [
        "a.md#no-such-heading: a.md has no heading with anchor #no-such-heading"
    ]
    (tmp_path / "c.md").write_text("[moved](gone.md)\n")
    assert broken_links(tmp_path / "c.md") == [f"gone.md: no file {tmp_path / 'gone.md'}"]
