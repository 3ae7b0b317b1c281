"""The hot spare (app.spare): the serving build, ready on the other slot with no traffic, so that
a crash is one routing change; a new spare boots behind; a swap takes the slot and a spare of
the new build follows; a spare that dies is started again with the active's backoff. Real
daemons on both nginx shapes, a slow-booting app (a boot waited for would show)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import answering, running, wait_until
from shapes import app_build
from test_hold import crash, crash_under_load, restarted
from test_metrics import metrics_daemon, scrape, value

pytestmark = pytest.mark.e2e
SPARE = "spare = true"
SLOW = 2500  # ms the app takes to listen: a crash restart that booted would hold requests that long


def spare_ready(run: Any, build: str, not_pid: int | None = None) -> dict[str, Any]:
    """The status once a spare of `build` (another process than `not_pid`) is ready."""
    def ready() -> dict[str, Any] | None:
        st = run.status()
        sp = st and st.get("spare")
        ok = sp and sp["state"] == "ready" and sp["alive"] and sp["build"].endswith(f"/{build}") \
            and sp["pid"] != not_pid and st["daemon"]["status"] == "serving"
        return st if ok else None
    return wait_until(ready, 60, f"a spare of {build} to be ready", run.output)


def test_a_crash_moves_traffic_to_the_spare_with_no_boot_and_a_new_spare_boots_behind(shape: Any,
                                                                                      releases: Path) -> None:
    """Under load, the active app SIGKILLed: the spare (already ready) serves, no request sent
    after the crash fails, and the outage's longest hold is far shorter than one boot of this
    app; then a new spare of the same build is ready on the dead app's slot."""
    run, _ = shape(build=app_build(releases, "v1", boot_ms=SLOW), app=SPARE)
    st = spare_ready(run, "v1")
    spare, dead_slot = st["spare"], st["active"]["slot"]
    assert spare["slot"] != dead_slot and spare["rss"] > 0, spare
    failures, last_failure_at, dead_at, st, hold = crash_under_load(run)
    assert st["active"]["pid"] == spare["pid"], (st["active"], spare)  # the spare itself: nothing booted
    assert next(e for e in st["events"] if e["event"] == "restarted").get("spare") is True, st["events"]
    assert last_failure_at <= dead_at, (dict(failures), last_failure_at, dead_at)
    assert sum(failures.values()) == hold["lost"], (dict(failures), hold)
    assert hold["hold_timeouts"] == 0 and hold["held_longest"] < SLOW / 1000, hold  # not a boot: a routing change
    entry = json.loads(run.cli("history", "--json").stdout.splitlines()[-1])
    assert entry["reason"] == "recover", entry
    st = spare_ready(run, "v1", not_pid=spare["pid"])
    assert st["spare"]["slot"] == dead_slot, st["spare"]
    assert "spare" in run.cli("status").stdout


def test_a_swap_replaces_the_spare_with_the_new_build(make_daemon: Any, releases: Path) -> None:
    """A swap takes the spare's slot (the spare is stopped, never served), and once it is over a
    spare of the new build is ready behind it; the metrics say when one is ready."""
    run, port = metrics_daemon(make_daemon, build=app_build(releases, "v1"), app=SPARE)
    old_spare = spare_ready(run, "v1")["spare"]
    assert value(scrape(port), "bluegreen_spare_ready") == 1
    r = run.cli("swap", str(app_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not running(old_spare["pid"]), old_spare
    st = spare_ready(run, "v2")
    assert st["spare"]["slot"] != st["active"]["slot"] and st["active"]["build"].endswith("/v2"), st
    assert any(e["event"] == "spare_ready" for e in st["events"]), st["events"]


def test_rollback_with_keep_warm_still_uses_the_warm_build_and_the_spare_waits_for_its_slot(
        make_daemon: Any, releases: Path) -> None:
    """During release.keep_warm the warm old build holds the other slot (status says why there is
    no spare); rollback is one routing change to it; once the window is over, a spare is back."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE, extra="[release]\nkeep_warm = 4\n")
    spare_ready(run, "v1")
    assert run.cli("swap", str(app_build(releases, "v2"))).returncode == 0
    st = run.status()
    assert st["warm"] and st["spare"]["state"] == "waiting" and "warm" in st["spare"]["why"], st["spare"]
    r = run.cli("rollback")
    assert r.returncode == 0 and "used the warm build" in r.stdout, r.stdout + r.stderr
    assert answering(run.listen_port, {"v1": 4})
    spare_ready(run, "v1")  # after the window of the rollback's own warm build (v2)


def test_a_spare_that_dies_is_started_again_and_given_up_after_restart_attempts(make_daemon: Any,
                                                                                 releases: Path) -> None:
    """A killed spare is noticed and replaced (event spare_failed) with the active's backoff; past
    app.restart.attempts failures in a row no other is started, and status says so and why."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE,
                      extra="[app.restart]\nattempts = 2\nbackoff = 0.2\n")
    first = spare_ready(run, "v1")["spare"]
    os.killpg(first["pid"], signal.SIGKILL)
    second = spare_ready(run, "v1", not_pid=first["pid"])["spare"]
    os.killpg(second["pid"], signal.SIGKILL)
    st = wait_until(lambda: (s := run.status()) and s["spare"]["state"] == "given up" and s, 30, "the spare given up")
    assert "exited" in st["spare"]["why"] and st["spare"]["failures"] == 2, st["spare"]
    assert "GIVEN UP" in run.cli("status").stdout
    failed = [e for e in st["events"] if e["event"] == "spare_failed"]
    assert len(failed) == 2 and failed[-1].get("gave_up") is True, failed
    assert st["daemon"]["status"] == "serving" and answering(run.listen_port, {"v1": 4})


def test_a_restarted_daemon_stops_the_spare_it_finds_and_starts_its_own(make_daemon: Any, releases: Path) -> None:
    """A daemon killed with -9 leaves its spare running: the next one adopts the app, stops that
    spare (recorded in state.json) and boots a spare it watches itself."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE)
    old = spare_ready(run, "v1")["spare"]
    run.kill()
    run.start()
    spare_ready(run, "v1", not_pid=old["pid"])
    wait_until(lambda: not running(old["pid"]), 30, "the old spare to be stopped")


def test_the_spare_is_off_by_default_and_says_nothing(make_daemon: Any, releases: Path) -> None:
    run = make_daemon(build=app_build(releases, "v1"))
    st = run.status()
    assert st["spare"] is None and "spare" not in run.cli("status").stdout


def test_a_swap_while_the_spare_boots_stops_it_and_takes_its_slot(make_daemon: Any, releases: Path) -> None:
    """A spare still booting when a swap begins is stopped (its boot cancelled, the process it
    started stopped too), the swap gets the slot, and a spare of the new build follows."""
    run = make_daemon(build=app_build(releases, "v1", boot_ms=SLOW), app=SPARE)
    booting = wait_until(lambda: (s := run.status()) and (s["spare"] or {}).get("state") == "starting" and s["spare"],
                         60, "the spare to be starting")
    r = run.cli("swap", str(app_build(releases, "v2", boot_ms=SLOW)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not running(booting["pid"]), booting
    spare_ready(run, "v2")


def test_a_hung_spare_at_a_crash_is_killed_at_once_and_the_build_started_afresh(make_daemon: Any,
                                                                                releases: Path) -> None:
    """A spare that does not answer when the crash comes is killed (it has nothing to finish), not
    given app.stop.timeout: the fresh start takes its slot at once, and a request sent after the
    crash is held and answered (with 60 s of stop timeout waited for, it would time out: 503)."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE, stop_timeout=60)
    spare = spare_ready(run, "v1")["spare"]
    os.killpg(spare["pid"], signal.SIGSTOP)
    pid, _ = crash(run)
    r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30)
    assert (r.status_code, r.text) == (200, "hello from v1\n"), (r.status_code, r.text)
    st = restarted(run, pid)
    assert st["active"]["pid"] != spare["pid"] and not running(spare["pid"]), st["active"]
    event = next(e for e in st["events"] if e["event"] == "restarted")
    assert "spare" not in event, event  # booted afresh
    spare_ready(run, "v1", not_pid=spare["pid"])


def test_a_ready_spare_is_taken_even_past_restart_attempts(make_daemon: Any, releases: Path) -> None:
    """app.restart.attempts stops boot loops; taking a ready spare boots nothing, so crashes in a
    row past it still move traffic to the spare instead of giving up (status never `failed`), and
    count for nothing when a crash later needs a boot."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE, extra="[app.restart]\nattempts = 1\n")
    for _ in range(3):
        spare = spare_ready(run, "v1")["spare"]
        pid, _ = crash(run)
        st = restarted(run, pid)
        assert st["active"]["pid"] == spare["pid"] and st["daemon"]["status"] == "serving", st["daemon"]
        assert answering(run.listen_port, {"v1": 4})
    # Those took no boot, so they used none of the attempts: the active and its spare killed
    # together, the build is booted afresh (not `failed`).
    spare = spare_ready(run, "v1")["spare"]
    os.killpg(spare["pid"], signal.SIGKILL)
    pid, _ = crash(run)
    st = restarted(run, pid)
    assert st["daemon"]["status"] == "serving" and st["active"]["pid"] != spare["pid"], st["daemon"]


def test_a_warm_build_that_dies_is_said_and_frees_its_slot_for_a_spare(make_daemon: Any, releases: Path) -> None:
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE, extra="[release]\nkeep_warm = 600\n")
    spare_ready(run, "v1")
    assert run.cli("swap", str(app_build(releases, "v2"))).returncode == 0
    warm = run.status()["warm"]
    os.killpg(warm["pid"], signal.SIGKILL)
    st = spare_ready(run, "v2")  # long before the 600 s window would have ended
    assert st["warm"] is None and any(e["event"] == "warm_stopped" and "exited" in e["why"] for e in st["events"])


def test_a_restarted_daemon_is_not_held_up_by_a_hung_spare_it_finds(make_daemon: Any, releases: Path) -> None:
    """The previous daemon's spare, hung: stopped in moments (it never had traffic), not after
    app.stop.timeout, so the new daemon watches what serves at once."""
    run = make_daemon(build=app_build(releases, "v1"), app=SPARE, stop_timeout=120)
    old = spare_ready(run, "v1")["spare"]
    os.killpg(old["pid"], signal.SIGSTOP)
    run.kill()
    run.start()  # (waits 60 s until it serves: 120 s of SIGTERM would outlast it)
    assert not running(old["pid"])
    spare_ready(run, "v1", not_pid=old["pid"])
