"""End to end: the real daemon, the real CLI, a managed nginx and the example Node app."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from helpers import bluegreen, free_ports, http_get, Load, make_build, managed_nginx, serves, wait_until
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "supervisor"]

CRASHING_APP = """
console.log('starting');
console.error('boom: DATABASE_URL is not set');
process.exit(3);
"""


@pytest.mark.parametrize("switch", ["reload", "runtime"])
def test_slow_request_in_flight_finishes_on_the_old_build_before_it_stops(make_daemon, releases: Path,
                                                                          switch: str) -> None:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, switch))
    assert run.status()["nginx"]["switch"] == switch
    v2 = make_build(releases, "v2")
    blue, green = run.ports
    old_pid = run.status()["active"]["pid"]
    result: dict[str, object] = {}

    def slow() -> None:
        result["reply"] = http_get(run.listen_port, "/slow?ms=3000&tag=inflight", timeout=60)
        result["old_alive_at_reply"] = psutil.pid_exists(old_pid)

    t = threading.Thread(target=slow)
    t.start()
    # The slow request is inside the old app: measured from outside, like the daemon does.
    wait_until(lambda: sockets.inflight(blue) >= 1, 30, "the slow request to reach the old app")

    swap = run.cli("swap", str(v2))
    t.join(60)

    assert swap.returncode == 0, swap.stdout + swap.stderr
    for phase in ("prepare", "start", "ready", "switch", "commit", "drain", "stop"):
        assert f"  {phase}" in swap.stdout
    assert result["reply"] == (200, "v1 slow 3000\n")
    assert result["old_alive_at_reply"], "the old app was stopped before its slow request was answered"
    assert serves(run, "v2")
    assert not psutil.pid_exists(old_pid)
    # The old app's own log: the slow request finished before it was asked to stop.
    log = (run.dir / "run" / "logs" / "blue.log").read_text()
    assert log.index("slow request inflight done") < log.index("SIGTERM: closing")

    st = run.status()
    assert st["active"]["slot"] == "green" and st["active"]["port"] == green
    assert st["active"]["build"] == str(v2)
    assert st["last_swap"]["outcome"] == "done"
    assert set(st["last_swap"]["durations"]) == {"prepare", "start", "ready", "switch", "commit", "drain", "stop"}
    assert json.loads((run.dir / "run" / "state.json").read_text())["active"]["build"] == str(v2)


def test_swap_to_a_build_that_crashes_at_start_fails_and_old_keeps_serving(make_daemon, releases: Path) -> None:
    run = make_daemon()
    broken = make_build(releases, "broken", server_js=CRASHING_APP)
    swap = run.cli("swap", str(broken))
    assert swap.returncode == 1, swap.stdout + swap.stderr
    assert "[app_exited]" in swap.stderr
    assert "exited with code 3 before it was ready" in swap.stderr
    assert "boom: DATABASE_URL is not set" in swap.stderr  # the app's own log lines
    assert serves(run, "v1")
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["standby"] is None
    assert st["last_swap"]["outcome"] == "failed" and st["last_swap"]["error"]["phase"] == "ready"


def test_swap_to_a_build_that_never_gets_ready_times_out_and_stops_the_standby(make_daemon, releases: Path) -> None:
    run = make_daemon(ready='url = "http://127.0.0.1:{port}/health"\ntimeout = 2\ninterval = 0.05')
    sick = make_build(releases, "sick", healthy=False)
    swap = run.cli("swap", str(sick))
    assert swap.returncode == 1, swap.stdout + swap.stderr
    assert "[not_ready]" in swap.stderr and "was not ready after 2s" in swap.stderr
    assert "HTTP 503" in swap.stderr
    assert sockets.listening(run.ports[1]) == []  # the standby was stopped
    assert serves(run, "v1")


def test_second_swap_during_a_swap_is_refused_as_busy(make_daemon, releases: Path) -> None:
    run = make_daemon()
    slow_boot = make_build(releases, "v2", boot_delay_ms=3000)
    first = run.cli_background("swap", str(slow_boot))
    try:
        wait_until(lambda: (run.status() or {}).get("swap"), 30, "the first swap to be running")
        second = run.cli("swap", str(slow_boot))
        assert second.returncode == 1
        assert "[busy]" in second.stderr and "phase:" in second.stderr
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
    finally:
        if first.poll() is None:
            first.kill()
    assert serves(run, "v2")


def test_rollback_returns_to_the_previous_build(make_daemon, releases: Path) -> None:
    run = make_daemon()
    v2 = make_build(releases, "v2")
    assert run.cli("rollback").returncode == 1  # nothing to roll back to yet
    assert run.cli("swap", str(v2)).returncode == 0
    assert serves(run, "v2")
    back = run.cli("rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert serves(run, "v1")
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["previous_build"] == str(v2)
    assert st["last_swap"]["reason"] == "rollback"


def test_swap_without_build_restarts_the_current_build_and_relative_builds_resolve(make_daemon, releases: Path) -> None:
    run = make_daemon()
    pid = run.status()["active"]["pid"]
    assert run.cli("swap").returncode == 0
    st = run.status()
    assert st["active"]["pid"] != pid and st["active"]["slot"] == "green" and st["last_swap"]["reason"] == "restart"
    make_build(releases, "v2")
    r = bluegreen("swap", "-c", str(run.config), "v2", cwd=releases)  # relative to the caller's directory
    assert r.returncode == 0, r.stderr
    assert serves(run, "v2")


def test_load_through_several_swaps_has_zero_failed_requests(make_daemon, releases: Path) -> None:
    run = make_daemon()
    builds = [make_build(releases, v) for v in ("v2", "v3", "v4")]
    with Load(run.listen_port, clients=6, slow_every=10, slow_ms=1000) as load:
        wait_until(lambda: load.slow_ok >= 3, 60, "load to be flowing")
        for b in builds:
            r = run.cli("swap", str(b))
            assert r.returncode == 0, r.stdout + r.stderr
        after = load.total
        wait_until(lambda: load.total >= after + 20, 60, "requests after the last swap")
    print(f"\nload: {load.total} requests, {load.slow_ok} slow (1s), {sum(load.failures.values())} failed, "
          f"3 swaps, versions {dict(load.versions)}")
    assert not load.failures, (load.failures, load.examples)
    assert load.slow_ok > 0 and set(load.versions) >= {"v1", "v4"}
    assert serves(run, "v4")


def test_socat_speaks_the_protocol_in_words_and_json(make_daemon, releases: Path) -> None:
    run = make_daemon()
    v2 = make_build(releases, "v2")

    def socat(line: str) -> list[dict]:
        out = subprocess.run(["socat", "-t", "60", "-", f"UNIX-CONNECT:{run.socket}"], input=line + "\n",
                             capture_output=True, text=True, timeout=120)
        return [json.loads(x) for x in out.stdout.splitlines()]

    status = socat("status")
    assert status[-1]["ok"] and status[-1]["result"]["active"]["slot"] == "blue"
    swap = socat(f"swap {v2}")
    assert [m["event"] for m in swap if m.get("status") == "done"] == \
        ["prepare", "start", "ready", "switch", "commit", "drain", "stop"]
    assert swap[-1]["ok"] and swap[-1]["result"]["active"]["build"] == str(v2)
    bad = socat('{"cmd": "swap", "build": "relative/path"}')
    assert bad == [{"ok": False, "error": {"code": "build_invalid", "message": bad[0]["error"]["message"]}}]
    assert "must be absolute" in bad[0]["error"]["message"]
    garbage = socat("{nope")
    assert garbage[-1]["error"]["code"] == "bad_request"
    assert serves(run, "v2")  # garbage changed nothing


def test_cli_reports_missing_builds_bad_configs_and_an_absent_daemon(make_daemon, short_tmp: Path) -> None:
    run = make_daemon()
    r = run.cli("swap", str(short_tmp / "no-such-build"))
    assert r.returncode == 1 and "[build_invalid]" in r.stderr and "does not exist" in r.stderr
    assert "a directory (an exploded app) or a file (like app-1.4.war)" in r.stderr
    (short_tmp / "app-2.war").write_bytes(b"<html>502 Bad Gateway</html>")  # an upload that went wrong
    r = run.cli("swap", str(short_tmp / "app-2.war"))
    assert r.returncode == 1 and "is not a zip archive, so not a valid .war" in r.stderr
    assert run.status()["active"]["build"].endswith("v1")  # nothing started, nothing moved
    human = run.cli("status")
    assert human.returncode == 0 and "active   blue" in human.stdout and "nginx    managed" in human.stdout
    bad = short_tmp / "bad.toml"
    bad.write_text('[app]\ncommand = "node server.js"\nports = [1, 1]\n')
    r = bluegreen("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert "app.command" in r.stderr and "app.ports" in r.stderr and "app.build: missing" in r.stderr
    r = bluegreen("status", "--socket", str(short_tmp / "nobody.sock"))
    assert r.returncode == 3 and "is `bluegreen daemon` running" in r.stderr


def test_sigterm_stops_app_and_nginx_and_removes_the_socket(make_daemon, releases: Path) -> None:
    run = make_daemon()
    st = run.status()
    pids = [st["active"]["pid"], st["nginx"]["master_pid"], *[c.pid for c in run.children()]]
    assert run.stop() == 0
    assert not run.socket.exists()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_second_daemon_on_the_same_state_dir_is_refused(make_daemon) -> None:
    run = make_daemon()
    other = subprocess.run([*CLI, "daemon", "-c", str(run.config)], capture_output=True, text=True,
                           timeout=60)
    assert other.returncode == 1
    assert f"another bluegreen daemon (pid {run.proc.pid}) already uses" in other.stderr
    assert serves(run, "v1")


def test_daemon_restart_resumes_the_saved_build(make_daemon, releases: Path) -> None:
    run = make_daemon()
    v2 = make_build(releases, "v2")
    assert run.cli("swap", str(v2)).returncode == 0
    assert run.stop() == 0
    run.start()
    st = run.status()
    assert st["active"]["build"] == str(v2) and st["active"]["slot"] == "green"
    assert serves(run, "v2")


def test_foreign_process_on_the_standby_port_fails_the_swap_and_is_named(make_daemon, releases: Path) -> None:
    run = make_daemon()
    squatter = subprocess.Popen([sys.executable, "-c", f"""
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", {run.ports[1]})); s.listen(); print("bound", flush=True); time.sleep(600)
"""], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        r = run.cli("swap", str(make_build(releases, "v2")))
        assert r.returncode == 1
        assert "[port_in_use]" in r.stderr and f"pid {squatter.pid}" in r.stderr and "time.sleep(600)" in r.stderr
        assert run.status()["standby"] is None
        assert serves(run, "v1")
    finally:
        squatter.kill()
        squatter.wait()


def test_a_build_that_dies_at_start_quotes_only_its_own_output(make_daemon, releases: Path) -> None:
    """The slot's log also holds what the build that ran there before printed: the error quotes
    this start's lines only, never the previous process's."""
    run = make_daemon()  # v1 on blue
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0  # blue's v1 printed, and stopped
    assert "--- bluegreen" in (run.dir / "run" / "logs" / "blue.log").read_text()
    before = (run.dir / "run" / "logs" / "blue.log").read_text().splitlines()
    assert len(before) >= 2, before
    swap = run.cli("swap", str(make_build(releases, "broken", server_js=CRASHING_APP)))  # to blue
    assert swap.returncode == 1 and "boom: DATABASE_URL is not set" in swap.stderr, swap.stderr
    quoted = swap.stderr.split("Last log lines", 1)[1]
    assert not [line for line in before if line.strip() and line in quoted], (before, quoted)
