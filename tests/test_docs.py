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
        text = (ROOT / page).read_text()
        if anchor:
            headings = {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower())
                        for h in re.findall(r"^#+ (.*)$", text, re.M)}
            assert anchor in headings, f"README links to {page}#{anchor}, which has no such heading"
