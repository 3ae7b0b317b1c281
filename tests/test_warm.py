"""Instant rollback to a warm old build (issue 11), end to end through a real nginx, the CLI and
the example Node app under load: with release.keep_warm, the old build keeps running with no
traffic after a release, and `rollback` within that window is one routing change."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from helpers import Load, http_get, make_build, wait_until
from supervisor.processes import sockets
from supervisor.processes.slots import marked

pytestmark = pytest.mark.e2e


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_a_rollback_within_the_warm_window_is_one_routing_change_with_no_process_started(
        make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 120")
    v1 = run.status()["active"]
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept warm for 120s" in r.stdout and "stays warm until" in r.stdout, r.stdout
    st = run.status()
    assert st["warm"]["pid"] == v1["pid"] and sockets.listening(v1["port"])  # running, with no traffic
    assert "warm     blue" in run.cli("status").stdout
    app_pids = {p.pid for p in marked(run.dir / "run")}
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("rollback")
        assert r.returncode == 0, r.stdout + r.stderr
        assert http_get(run.listen_port) == (200, "hello from v1\n")
    assert not load.failures, (load.failures, load.examples)
    assert "used the warm build" in r.stdout, r.stdout
    st = run.status()
    assert st["active"]["pid"] == v1["pid"]  # the very process that served before
    last = st["last_swap"]
    assert list(last["durations"])[:2] == ["switch", "commit"]  # no prepare, start or ready phase
    assert last["details"]["warm"] == {"reused": True}
    started = {p.pid for p in marked(run.dir / "run")} - app_pids
    assert not started, started
    # the rolled-back-from build is warm in turn: going forward again is instant too
    assert st["warm"]["build"].endswith("/v2")


def test_a_rollback_after_the_window_is_a_normal_swap(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 1")
    v1 = run.status()["active"]
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    wait_until(lambda: gone(v1["pid"]), 30, "the warm window to close and the old build to stop")
    assert run.status()["warm"] is None
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not load.failures, (load.failures, load.examples)
    assert "used the warm build" not in r.stdout and "ready" in r.stdout
    assert run.status()["active"]["pid"] != v1["pid"]
    assert http_get(run.listen_port) == (200, "hello from v1\n")


def test_a_warm_build_that_dies_is_no_longer_warm_and_rollback_starts_it_afresh(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 120")
    v1 = run.status()["active"]
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    os.kill(v1["pid"], signal.SIGKILL)
    wait_until(lambda: run.status()["warm"] is None, 30, "status to drop the dead warm build")
    r = run.cli("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "used the warm build" not in r.stdout
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    assert run.status()["daemon"]["status"] == "serving"


def test_a_new_swap_first_stops_the_warm_build_that_holds_its_slot(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 120")
    v1 = run.status()["active"]
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v3")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not load.failures, (load.failures, load.examples)
    assert gone(v1["pid"])
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["active"]["build"].endswith("/v3")
    assert st["warm"]["build"].endswith("/v2")  # and the build it replaced is warm now
    assert any(e["event"] == "warm_stopped" for e in st["events"])


def test_a_restarted_daemon_stops_the_warm_build(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 120")
    v1 = run.status()["active"]
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    run.kill()
    run.start()
    wait_until(lambda: gone(v1["pid"]), 30, "the next daemon to stop the warm build")
    st = run.status()
    assert st["warm"] is None and st["active"]["build"].endswith("/v2")
    assert http_get(run.listen_port) == (200, "hello from v2\n")


def test_a_warm_build_that_hangs_is_not_switched_to_and_rollback_starts_it_afresh(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\nkeep_warm = 120", stop_timeout=2)
    v1 = run.status()["active"]
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    os.kill(v1["pid"], signal.SIGSTOP)  # alive, listening, never answering
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not load.failures, (load.failures, load.examples)
    assert "used the warm build" not in r.stdout and "ready" in r.stdout
    assert gone(v1["pid"])
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    assert "does not answer" in (run.dir / "run" / "logs" / "daemon.log").read_text()
