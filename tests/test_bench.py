"""scripts/bench in its short form: it runs end to end and prints its table (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.e2e


def test_bench_quick_smoke() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--releases", "1", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    names = [a["approach"] for a in report["approaches"]]
    assert names == ["bluegreen", "bluegreen runtime", "plain restart", "nginx recipe"]
    assert all(a["requests"] > 0 for a in report["approaches"])
    for key in ("bluegreen_phases", "bluegreen_runtime_phases"):
        assert set(report[key]) >= {"start_to_ready_s", "switch_ms", "drain_s", "overhead_ms_median"}
    assert report["bluegreen_runtime_phases"]["switch_ms"]["mode"] == "runtime"
    assert report["footprint"]["idle_rss_mb"] > 0
