"""The documentation: every example in docs/ runs, and every reference into docs/ resolves.

The examples are the ``>>>`` lines of each page, run with :mod:`doctest` (one namespace per
page). A reference is ``docs/PAGE.md`` optionally followed by ``, "Heading"``; it must name an
existing page and, when given, one of its headings. Code and tests may cite the docs only
this way: no section numbers of documents outside the repository.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SOURCES = sorted(
    p
    for folder in ("mtl_optim", "benchmarks", "tests", "examples")
    for p in (ROOT / folder).rglob("*.py")
)
REFERENCE = re.compile(r"""docs/([\w./-]+\.md)(?:,\s*(?:#:?\s*)?(?:"([^"]+)"|'([^'\n]+)'))?""")
#: citations of documents that are not in the repository
FOREIGN = re.compile(r"§|shared/(?:API|spec|STYLE|ENV)|API\.md")


def _headings(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no '#' comments in code
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_docs_exist():
    assert {"index.md", "getting-started.md", "design.md", "adding-a-method.md"} <= {
        p.name for p in PAGES
    }


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_examples_run(page):
    text = page.read_text()
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {"__name__": "__docs__"}, page.name, str(page), 0)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=out.append)
    assert result.failed == 0, "".join(out)


def _references() -> list[tuple[Path, int, str, str | None]]:
    """Every ``docs/PAGE.md[, "Heading"]`` in the sources; a heading may wrap onto a new line."""
    found = []
    for source in SOURCES:
        if source.name == Path(__file__).name:
            continue
        text = source.read_text()
        for m in REFERENCE.finditer(text):
            heading = m.group(2) or m.group(3)
            line = text.count("\n", 0, m.start()) + 1
            found.append(
                (source, line, m.group(1), None if heading is None else " ".join(heading.split()))
            )
    return found


def test_references_resolve():
    refs = _references()
    assert refs, "the code cites no docs page at all"
    broken = []
    for source, n, page, heading in refs:
        target = DOCS / page
        if not target.is_file():
            broken.append(f"{source.relative_to(ROOT)}:{n}: no page docs/{page}")
        elif heading is not None and heading not in _headings(target):
            broken.append(f"{source.relative_to(ROOT)}:{n}: no heading {heading!r} in docs/{page}")
    assert not broken, "\n".join(broken)


def test_no_citations_of_documents_outside_the_repository():
    bad = [
        f"{source.relative_to(ROOT)}:{n}: {line.strip()}"
        for source in SOURCES
        if source.name != Path(__file__).name
        for n, line in enumerate(source.read_text().splitlines(), 1)
        if FOREIGN.search(line)
    ]
    assert not bad, "\n".join(bad)


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(p.relative_to(DOCS)) for p in PAGES if str(p.relative_to(DOCS)) not in nav]
    assert not missing
