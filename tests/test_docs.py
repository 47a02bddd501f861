"""The README and docs/ as a new user reads them: the README stays an entry point, every
relative link and anchor resolves, every path named exists, every benchmark is listed with
its measurement, and nothing that goes stale (who measured when, notes outside the repo)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
STALE = ["SPEC" + " §", "SPEC.md", "previous commit", "this session", "no GPU was lent", "design notes", "HOUSE.md"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_the_readme_is_an_entry_point():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    first_screen = "\n".join(text.splitlines()[:75])
    for must in (
        "## Install",
        "pip install",
        "python run_loop.py",
        "python -m pytest",
        "## The scripts",
        "## Code map",
    ):
        assert must in first_screen, must
    for script in ROOT.glob("*.py"):
        assert f"`{script.name}`" in text, f"{script.name} is not in the README's scripts table"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_paths_exist_and_nothing_goes_stale(page):
    text = page.read_text(encoding="utf-8")
    for path in set(re.findall(r"(?<![\w/.])((?:src|bench|tests|docs)/[\w/.-]+\.(?:py|md))", text)):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for phrase in STALE:
        assert phrase not in text, f"{page.name}: {phrase!r}"


def test_every_benchmark_is_listed_with_its_measurement():
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    table = results.split("## Benchmarks")[1].split("\n## ")[0]
    for bench in sorted((ROOT / "bench").glob("*.py")):
        rows = [line for line in table.splitlines() if line.startswith(f"| `python bench/{bench.name}")]
        assert len(rows) == 1, f"{bench.name} has {len(rows)} rows in docs/results.md's benchmarks table"
        assert re.search(r"20\d\d-\d\d-\d\d", rows[0]), f"{bench.name}: no date of measurement"


def test_tables_have_their_header_first():
    """Markdown tables: a header row, then the |---| separator, then the rows (no stray rows before a header)."""
    for page in PAGES:
        lines = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL).splitlines()
        for i, line in enumerate(lines):
            starts_table = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
            if starts_table:
                assert i + 1 < len(lines) and re.match(r"^\|(\s*:?-+:?\s*\|)+$", lines[i + 1]), (
                    f"{page.name}:{i + 1}: a table without its header separator: {line[:80]}"
                )
