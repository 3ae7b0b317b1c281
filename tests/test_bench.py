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
    assert names == ["bluegreen (reload)", "bluegreen (runtime)", "plain restart", "nginx recipe"]
    assert all(a["requests"] > 0 and a["nginx_rss_mb"] > 0 for a in report["approaches"])
    assert report["approaches"][1]["torn"] == 0  # the runtime switch: none, even in the short form
    for key in ("bluegreen_phases", "bluegreen_runtime_phases"):
        assert set(report[key]) >= {"start_to_ready_s", "switch_ms", "drain_s", "overhead_ms_median"}
    assert report["bluegreen_runtime_phases"]["switch_ms"]["mode"] == "runtime"
    assert report["footprint"]["idle_rss_mb"] > 0
    assert set(report["cli"]) == {"python -c pass", "bluegreen --version", "bluegreen status"}
    assert all(c["ms"] > 0 for c in report["cli"].values())  # measured (the ratio is the README's, not a test's)
    baseline, scraped, _ = report["ops"]  # metrics and rotation off, then on
    assert baseline["scrapes"] == 0 and scraped["scrapes"] >= 1 and scraped["pumps"] == 1
    assert "access.log.1" in scraped["access_logs"] and baseline["access_logs"] == ["access.log"]
    off, on = report["throughput"]  # wrk through the runtime switch, the hold off then on: measured, not judged
    assert off["label"].startswith("hold off") and on["label"].startswith("hold on")
    assert len(off["rates"]) == len(on["rates"]) == 5 and min(off["rates"] + on["rates"]) > 0


def test_a_torn_answer_is_an_old_answer_to_a_request_sent_after_the_new_build_answered() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    def r(start: float, end: float, version: str) -> "bench.Result":
        return bench.Result(start, end, "keepalive", False, "ok", version)

    # Release 0 (v1 -> v2) begins at 10; v2 first answers at 10.5.
    m = bench.Measured("x", [r(9.0, 9.1, "v1"),
                             r(10.4, 10.9, "v1"),   # sent before v2 answered: routed before, not torn
                             r(10.45, 10.5, "v2"),
                             r(10.6, 10.7, "v1"),   # sent after: torn
                             r(10.8, 12.0, "v1"),   # sent after, slow: torn; the window ends at its sending
                             r(11.0, 11.1, "v2")], windows=[(10.0, 11.5)])
    assert bench.torn(m) == (2, 10.8 - 10.5)
    # Nothing from the new build yet: nothing can be torn.
    assert bench.torn(bench.Measured("y", [r(10.2, 10.3, "v1")], windows=[(10.0, 11.0)])) == (0, 0.0)
