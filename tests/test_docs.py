"""The front door stays a front door, and every link of the docs leads somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_at_most_150_lines_and_names_no_issue_numbers():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert not re.search(r"\bissues? #?\d+", text, flags=re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)]
            if anchor not in headings:
                broken.append(target)
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        linked |= {(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(page.read_text())}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert not unlinked, unlinked
