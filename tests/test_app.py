"""Which build a path names: resolved at release time, never a raw OSError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.app import check_build
from supervisor.errors import BuildError


def test_a_current_symlink_is_resolved_to_the_release_it_names_now(tmp_path: Path) -> None:
    (tmp_path / "releases" / "42").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "42")
    assert check_build(tmp_path / "current") == tmp_path / "releases" / "42"


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "file").write_text("") or d / "file", "is not a directory"),
    (lambda d: Path("relative/build"), "must be absolute"),
    (lambda d: d / ("a" * 300), "cannot be used: File name too long"),
    (lambda d: (os.symlink(d / "loop", d / "loop"), d / "loop")[1], "cannot be used"),
])
def test_unusable_builds_are_named_never_raised_raw(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(BuildError) as e:
        check_build(make(tmp_path))
    assert expected in e.value.message and e.value.code == "build_invalid"
    assert len(e.value.message) < 300
