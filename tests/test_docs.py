"""The manual (docs/, a MkDocs site) builds with --strict: no broken link or anchor between its
pages, no page left out of the navigation. The README links into it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "failure-modes" / "index.html").exists()


def test_every_link_of_the_readme_into_the_manual_lands() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#([\w-]+))?\)", readme)
    assert links
    for page, anchor in links:
        if anchor:
            assert anchor in slugs(ROOT / page), f"README links to {page}#{anchor}, which has no such heading"


def slugs(page: Path) -> set[str]:
    """The anchors of a page's headings, as MkDocs makes them."""
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower())
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_every_pointer_in_a_message_leads_to_a_page_and_section_that_exist() -> None:
    """What the daemon and the CLI tell users to read (`docs/PAGE.md#section`) exists, and no
    message points into the README's sections (they moved to docs/)."""
    sources = [p for p in (ROOT / "supervisor").rglob("*") if p.suffix in (".py", ".lua", ".conf", ".service")]
    pointers = {(p.relative_to(ROOT), m.group(1), m.group(2))
                for p in sources for m in re.finditer(r"(docs/[\w-]+\.md)(?:#([\w-]+))?", p.read_text())}
    assert len(pointers) >= 5, pointers
    for source, page, anchor in sorted(pointers, key=str):
        assert (ROOT / page).exists(), f"{source} points to {page}, which does not exist"
        if anchor:
            assert anchor in slugs(ROOT / page), f"{source} points to {page}#{anchor}, which has no such heading"
    stale = [str(p.relative_to(ROOT)) for p in sources if re.search(r"\(README: ", p.read_text())]
    assert not stale, f"messages point into README sections that moved to docs/: {stale}"
