"""The README is a front page and the guides in docs/ hold the rest: every relative
link between them, and to the repository's files, leads somewhere."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tests import REPO

GUIDES = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *GUIDES, REPO / "deploy" / "kuberay" / "README.md"]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose(page: Path) -> list[str]:
    """The page's lines outside code blocks, where a link is a link."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: Counter[str] = Counter()
    found = set()
    for line in prose(page):
        if match := re.match(r"#{1,6} (.+)", line):
            name = slug(match.group(1))
            found.add(name if not seen[name] else f"{name}-{seen[name]}")
            seen[name] += 1
    return found


def test_the_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move sections to docs/"


def test_every_guide_is_linked_from_the_readme_and_the_index() -> None:
    readme = (REPO / "README.md").read_text()
    index = (REPO / "docs" / "README.md").read_text()
    guides = [page.name for page in GUIDES if page.name != "README.md"]
    assert guides
    assert [g for g in guides if f"](docs/{g})" not in readme] == []
    assert [g for g in guides if f"]({g})" not in index] == []


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for line in prose(page):
            for target in LINK.findall(line):
                if EXTERNAL.match(target):
                    continue
                path, _, anchor = target.partition("#")
                linked = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(REPO)}: {target}"
                if not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)
