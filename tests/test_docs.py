"""The README stays short, every relative link of the README and docs/
leads somewhere (a file, and a heading in it when the link names one), and
every long page opens with a table of contents."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MOST_LINES = 450
LONG_PAGE = 150

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(page: pathlib.Path) -> list[str]:
    """The page's lines outside fenced code blocks, inline code removed."""
    lines: list[str] = []
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(page: pathlib.Path) -> list[tuple[int, str]]:
    """(level, text) of each heading outside fenced code blocks."""
    found: list[tuple[int, str]] = []
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.*)", line)):
            found.append((len(match.group(1)), match.group(2)))
    return found


def anchors(page: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for _, heading in headings(page):
        base = anchor = slug(heading)
        number = 0
        while anchor in found:  # repeated headings get -1, -2, ...
            number += 1
            anchor = f"{base}-{number}"
        found.add(anchor)
    return found


def links(page: pathlib.Path) -> list[str]:
    return [target for line in prose_lines(page) for target in LINK.findall(line)
            if not re.match(r"[a-z]+:", target)]  # not http:, https:, mailto:


def test_the_slug_follows_github() -> None:
    assert slug("The `--json` report") == "the---json-report"
    assert slug("This machine's noise") == "this-machines-noise"
    assert slug("open_writer_sync, SyncWriter, SyncProducer") == "open_writer_sync-syncwriter-syncproducer"


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MOST_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_somewhere(page: pathlib.Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no such heading in {destination.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_long_page_opens_with_its_contents(page: pathlib.Path) -> None:
    text = page.read_text(encoding="utf-8")
    if text.count("\n") <= LONG_PAGE:
        return
    sections = [slug(heading) for level, heading in headings(page) if level == 2]
    opening = text.split("\n## ", 1)[0]  # everything before the first section
    listed = set(re.findall(r"\]\(#([^)]+)\)", opening))
    assert [section for section in sections if section not in listed] == [], \
        f"{page.name} is long: list every section before the first one"


@pytest.mark.parametrize("name", ["README.md", "docs/api.md", "docs/performance.md"])
def test_the_pages_give_the_handle_schedule_period_the_code_has(name: str) -> None:
    """Where a page says how often a ``send_line`` that only queues yields
    ("once in N calls"), N is ``handle.SCHEDULE_EVERY`` (the pages that
    describe the library as it is; docs/faults.md keeps the history)."""
    from pwriter.service.handle import SCHEDULE_EVERY

    text = " ".join(prose_lines(ROOT / name))
    said = [int(number) for number in re.findall(r"once in (\d+)\s+calls", text)]
    assert [number for number in said if number != SCHEDULE_EVERY] == []
