"""The README stays a front page, and no relative link in it or in the docs site is broken.

The site itself is built by ``mkdocs build --strict`` in ``.ci/run``; these checks need no mkdocs.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 400

# [text](target) and ![alt](target), with an optional "title"; reference definitions `[x]: target`.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The relative link targets of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not urlsplit(t).scheme and not t.startswith(("#", "//", "mailto:"))]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = unquote(urlsplit(target).path)
        resolved = (ROOT / file.lstrip("/")) if file.startswith("/") else (path.parent / file)
        if not resolved.exists():
            broken.append(target)
    return broken


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move sections into docs/"


def test_the_readme_links_into_the_docs():
    links = relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") and link.endswith(".md") for link in links)
    assert (ROOT / "mkdocs.yml").is_file() and (DOCS / "index.md").is_file()


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path):
    assert broken_links(path) == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) ![img](missing.png) [gone](nowhere/file.md#part) `[code](skipped.md)`\n"
        "```\n[fenced](skipped-too.md)\n```\n[web](https://example.com/x.md) [anchor](#here)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.png", "nowhere/file.md#part"]


def test_the_result_images_in_the_docs_are_copies_of_examples_results():
    """docs/images/results/X is a copy of examples/results/X (mkdocs serves only files under docs/)."""
    copies = sorted((DOCS / "images" / "results").rglob("*.png"))
    assert copies
    for copy in copies:
        original = ROOT / "examples" / "results" / copy.relative_to(DOCS / "images" / "results")
        assert original.is_file() and original.read_bytes() == copy.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: copy it again"
        )
