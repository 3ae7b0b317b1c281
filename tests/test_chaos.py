"""The chaos run, short form: random swaps and kills under load; every failure explained."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.e2e


def test_chaos_short_run() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--duration", "25", "--seed", "7"],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "chaos: PASS" in r.stdout
