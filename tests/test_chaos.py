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


def test_crashes_side_by_side_lose_nothing_sent_after_a_kill_with_the_hold() -> None:
    """scripts/chaos --crashes, short: the active app killed every 4 s under open-loop load, without
    the hold then with it; with it, no request sent after a kill fails, and every failure is one
    nginx counted lost (it was inside the killed app)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--crashes", "--duration", "12",
                        "--kill-every", "4", "--rate", "50"], capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "chaos --crashes: PASS" in r.stdout


def test_a_pause_under_load_fails_nothing_and_answers_every_held_request() -> None:
    """scripts/chaos --crashes --pause, short: `pause` for 3 s under open-loop load, then `resume`:
    no request fails, and those sent while paused are answered after the resume."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--crashes", "--pause", "3", "--rate",
                        "50"], capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "chaos --crashes --pause: PASS" in r.stdout and "| 0 (-) |" in r.stdout
