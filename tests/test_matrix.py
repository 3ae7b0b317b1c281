"""The failure matrix (docs/failure-modes.md) is the one tests/failure_matrix.py renders, and every test it names
exists: a cell never claims a test that is gone or misspelt."""

from __future__ import annotations

import re
import subprocess
import sys

from failure_matrix import CELLS, FAULTS, PHASES
from failure_matrix import tests_named as named_tests
from helpers import ROOT, manual


def test_every_phase_meets_every_fault() -> None:
    assert set(CELLS) == {(p, f) for p in PHASES for f in FAULTS}


def test_every_test_the_matrix_names_exists() -> None:
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", f.read_text(), re.M))
    assert named_tests() - defined == set()


def test_every_test_the_manual_names_exists() -> None:
    """The event table and the prose name tests too (`test_...`): none of them is gone or misspelt."""
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", f.read_text(), re.M))
    named = set(re.findall(r"`(test_\w+)`", manual()))
    assert named and named - defined == set()


def test_the_documented_matrix_is_the_generated_one() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "failure-matrix"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
