"""Which build a path names: resolved at release time, never a raw OSError."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from supervisor.builds import check_build
from supervisor.errors import BuildError


def test_a_current_symlink_is_resolved_to_the_release_it_names_now(tmp_path: Path) -> None:
    (tmp_path / "releases" / "42").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "42")
    assert check_build(tmp_path / "current") == tmp_path / "releases" / "42"


def test_a_file_build_is_a_build(tmp_path: Path) -> None:
    war = tmp_path / "app-1.4.war"
    with zipfile.ZipFile(war, "w") as z:
        z.writestr("index.html", "hello")
    (tmp_path / "server").write_text("#!/bin/sh\n")
    (tmp_path / "server").chmod(0o755)  # a single binary
    assert check_build(war) == war and check_build(tmp_path / "server") == tmp_path / "server"


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "does not exist; a build is a directory (an exploded app) or a file (like app-1.4.war)"),
    (lambda d: ((d / "app-1.4.war").write_text("<html>404</html>"), d / "app-1.4.war")[1],
     "is not a zip archive, so not a valid .war"),
    (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "is neither a directory"),
    (lambda d: ((d / "app.conf").write_text("x"), d / "app.conf")[1], "is a file that is neither an archive"),
    (lambda d: Path("relative/build"), "must be absolute"),
    (lambda d: d / ("a" * 300), "cannot be used: File name too long"),
    (lambda d: (os.symlink(d / "loop", d / "loop"), d / "loop")[1], "cannot be used"),
    (lambda d: d / "app\0.war", "holds a NUL byte (\\0) at character"),
])
def test_unusable_builds_are_named_never_raised_raw(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(BuildError) as e:
        check_build(make(tmp_path))
    assert expected in e.value.message and e.value.code == "build_invalid"
    assert len(e.value.message) < 300
