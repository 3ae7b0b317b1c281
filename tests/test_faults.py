"""Faults: whatever breaks, the version that was serving keeps serving and the user is told why."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import (IGNORES_SIGTERM, NODE_APP, SLOW_TO_STOP, crashes_after_ready, DaemonRun, free_ports, http_get,
                     Load, make_build, managed_nginx, raw, serves, wait_until)
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e

# The example app, changed only in how it dies or stops.
CRASHES_AFTER_READY = crashes_after_ready(1500)
EXITS_AFTER_FIRST_HEALTH = NODE_APP.read_text().replace(
    "res.end(pkg.healthy === false ? 'unhealthy\\n' : 'ok\\n');",
    "res.end('ok\\n', () => process.exit(4));")


# ---- the app


def test_crashed_active_app_is_restarted_on_the_other_slot(make_daemon) -> None:
    run = make_daemon()
    before = run.status()["active"]
    with Load(run.listen_port, clients=4, slow_every=1000) as load:
        wait_until(lambda: load.ok >= 20, 30, "load")
        os.kill(before["pid"], signal.SIGKILL)
        st = wait_until(lambda: (lambda s: s if s and s["active"]["pid"] != before["pid"] and s["active"]["alive"]
                                 and s["daemon"]["status"] == "serving" else None)(run.status()),
                        30, "the daemon to bring the app back")
        after = load.total
        wait_until(lambda: load.total >= after + 20, 30, "requests after the restart")
    assert st["active"]["slot"] == "green" and st["active"]["build"] == before["build"]
    events = [e["event"] for e in st["events"]]
    assert events[-2:] == ["crash", "restarted"]
    crash = next(e for e in st["events"] if e["event"] == "crash")
    assert crash["exit"] == "killed by SIGKILL (perhaps out of memory?)"
    assert st["last_swap"]["reason"] == "recover"
    assert serves(run, "v1")
    # A killed app loses its own in-flight requests, and requests during the restart may fail;
    # nothing else does: the outage ends when the daemon says the app is back. No request sent
    # after the `restarted` event failed (a 25 s outage would fail the 20 requests after it).
    restarted = next(e for e in st["events"] if e["event"] == "restarted")
    assert load.last_failure_at <= restarted["at"], (dict(load.failures), load.last_failure_at, restarted)
    print(f"\ncrash restart: {load.total} requests, failures {dict(load.failures)}, {st['events'][-1]}")


def test_repeated_crashes_back_off_then_stop_in_a_failed_state(make_daemon, releases: Path) -> None:
    flaky = make_build(releases, "flaky", server_js=CRASHES_AFTER_READY)
    run = make_daemon(build=flaky, extra="[app.restart]\nattempts = 3\nbackoff = 1.0\nbackoff_max = 1.5")
    st = wait_until(lambda: (lambda s: s if s and s["daemon"]["status"] == "failed" else None)(run.status()),
                    90, "the daemon to give up", run.output)
    assert "crashed 3 times in a row; not restarting it again" in st["daemon"]["failure"]
    events = [e for e in st["events"] if e["event"] in ("crash", "restarted")]
    assert [e["event"] for e in events] == ["crash", "restarted"] * 3 + ["crash"], events
    # The backoff, measured: restart 1 at once, restart 2 after 1 s, restart 3 after 1.5 s (capped);
    # each of these is a floor (a restart also boots the app), never a ceiling.
    waited = [events[i + 1]["at"] - events[i]["at"] for i in range(0, 6, 2)]
    assert waited[1] >= 1.0 and waited[2] >= 1.5, waited
    human = run.cli("status").stdout
    assert "FAILED" in human and "bluegreen swap" in human
    # The way out: release a build that works.
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    st = run.status()
    assert st["daemon"]["status"] == "serving" and st["daemon"]["failure"] is None
    assert serves(run, "v2")


def test_standby_that_exits_right_after_ready_fails_the_swap(make_daemon, releases: Path) -> None:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, "reload"))
    r = run.cli("swap", str(make_build(releases, "quitter", server_js=EXITS_AFTER_FIRST_HEALTH)))
    assert r.returncode == 1
    assert "[app_exited]" in r.stderr and "exited with code 4" in r.stderr
    # If it died during the reload, nginx was switched back; the generation of workers that saw the
    # dead standby still answers (502) for nginx's 100 ms before it is told to quit.
    wait_until(lambda: serves(run, "v1"), 30, "the old build to serve")
    assert run.status()["active"]["slot"] == "blue"


def test_with_the_runtime_switch_a_standby_dying_right_after_ready_is_reported_as_it_happened(
        make_daemon, releases: Path) -> None:
    """The runtime switch can finish a swap (nothing in flight) within milliseconds, before a
    build that exits just after its first good answer is seen dead. Whichever way the race
    goes, the swap says where traffic went."""
    run = make_daemon()
    assert run.status()["nginx"]["switch"] == "runtime"
    r = run.cli("swap", str(make_build(releases, "quitter", server_js=EXITS_AFTER_FIRST_HEALTH)))
    assert "exited with code 4" in r.stderr, r.stdout + r.stderr
    if r.returncode == 1:  # seen dead before the old build was stopped
        assert "[app_exited]" in r.stderr and "traffic moved" not in r.stderr
        wait_until(lambda: serves(run, "v1"), 30, "the old build to serve")
    else:  # after: the new build serves no more, and the swap does not pretend otherwise
        assert r.returncode == 4 and "traffic moved" in r.stderr, r.stdout + r.stderr
        wait_until(lambda: "crash" in [e["event"] for e in (run.status() or {}).get("events", [])], 30,
                   "the monitor to record the crash", run.output)


def test_two_ready_passes_catch_a_standby_dying_right_after_its_first_good_answer(make_daemon,
                                                                                  releases: Path) -> None:
    """What the README advises for builds that may die right after their first good answer:
    app.ready.passes = 2 catches them before any switch, in either mode."""
    run = make_daemon(ready='url = "http://127.0.0.1:{port}/health"\ntimeout = 30\ninterval = 0.05\npasses = 2')
    r = run.cli("swap", str(make_build(releases, "quitter", server_js=EXITS_AFTER_FIRST_HEALTH)))
    assert r.returncode == 1 and "exited with code 4" in r.stderr, r.stdout + r.stderr
    assert "traffic moved" not in r.stderr
    assert run.status()["last_swap"]["traffic"] == "unchanged"
    assert serves(run, "v1")


def test_old_app_ignoring_sigterm_is_killed_with_its_whole_tree(make_daemon, releases: Path) -> None:
    stubborn = make_build(releases, "stubborn", server_js=IGNORES_SIGTERM)
    run = make_daemon(build=stubborn, stop_timeout=1)
    old = psutil.Process(run.status()["active"]["pid"])
    tree = [old, *old.children(recursive=True)]
    assert any(p.name() == "sleep" for p in tree)
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stderr
    stop = run.status()["last_swap"]["details"]["stop"]
    assert stop["killed"] and "did not exit within 1s of SIGTERM: killed with SIGKILL" in stop["how"]
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"orphans survived: {alive}"


# ---- nginx


def test_killed_managed_nginx_master_is_restarted(make_daemon) -> None:
    """The master killed: a new one serves, and the old one's workers, orphans reparented to the
    daemon (a child subreaper, not a pid 1 that may never reap), are stopped and reaped."""
    run = make_daemon()
    master = run.status()["nginx"]["master_pid"]
    workers = [p.pid for p in psutil.Process(master).children()]
    os.kill(master, signal.SIGKILL)
    st = wait_until(lambda: (lambda s: s if s and s["nginx"].get("running") and s["nginx"]["master_pid"] != master
                             and s["events"] and s["events"][-1]["event"] == "nginx_restarted"
                             else None)(run.status()), 30, "nginx to be restarted", run.output)
    run.seen.add(st["nginx"]["master_pid"])
    wait_until(lambda: serves(run, "v1"), 30, "traffic through the new master")
    assert [e["event"] for e in st["events"]][-2:] == ["nginx_died", "nginx_restarted"]
    wait_until(lambda: not any(psutil.pid_exists(w) for w in workers), 30, "the old workers to be reaped")  # no zombie
    r = run.cli("swap", str(make_build(run.dir / "releases", "v2")))
    assert r.returncode == 0, r.stderr


def test_drain_timeout_cuts_long_requests_and_says_how_many(make_daemon, releases: Path) -> None:
    run = make_daemon(drain_timeout=1, stop_timeout=2)
    blue = run.ports[0]
    import threading

    cut: dict[str, object] = {}

    def long_request() -> None:
        try:
            cut["reply"] = http_get(run.listen_port, "/slow?ms=30000", timeout=60)
        except OSError as e:
            cut["reply"] = repr(e)

    t = threading.Thread(target=long_request)
    t.start()
    wait_until(lambda: sockets.inflight(blue) >= 1, 30, "the long request to reach the old app")
    r = run.cli("swap", str(make_build(releases, "v2")))
    t.join(60)
    assert r.returncode == 0, r.stderr
    assert "1 request(s) still running at drain.timeout" in r.stdout
    assert ("warning: drain: 1 request(s) still running on the old build at drain.timeout (1s): it gets SIGTERM now, "
            "and what it has not finished within app.stop.timeout (2s) is cut by SIGKILL") in r.stdout, r.stdout
    # The example app finishes its requests before it exits: only the SIGKILL at 2s cut this one.
    assert "warning: stop: 1 connection(s) left open at drain.timeout were cut: the old build did not exit " \
           "within 2s of SIGTERM: killed with SIGKILL" in r.stdout, r.stdout
    d = run.status()["last_swap"]["details"]["drain"]
    assert d["timed_out"] and d["still_open"] >= 1
    assert not sockets.listening(blue)  # the old app was stopped anyway
    assert cut["reply"] != (200, "v1 slow 30000\n")  # it was cut, as reported
    assert serves(run, "v2")


# ---- the daemon itself


def swap_and_kill_daemon_at(run: DaemonRun, build: Path, phase: str) -> dict:
    """Start a swap over the socket and SIGKILL the daemon as soon as `phase` begins."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(run.socket))
        s.sendall(json.dumps({"cmd": "swap", "build": str(build)}).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            msg = json.loads(line)
            if msg.get("event") == phase and msg.get("status") == "begin":
                break
            assert "ok" not in msg, msg
    run.kill()
    saved = json.loads((run.dir / "run" / "state.json").read_text())
    return saved


def upstream_port(run: DaemonRun) -> int:
    text = (run.dir / "run" / "nginx" / "upstream.conf").read_text()
    return int(text.split("server 127.0.0.1:")[1].split(";")[0])




@pytest.mark.parametrize("switch", ["reload", "runtime"])
@pytest.mark.parametrize("phase", ["prepare", "start", "ready", "switch", "commit", "drain", "stop"])
def test_daemon_killed_mid_swap_is_adopted_and_the_swap_finished_or_undone(make_daemon, releases: Path,
                                                                           phase: str, switch: str) -> None:
    # Each phase made long enough to land in: a slow boot (ready), a slow request (drain),
    # an old app that ignores SIGTERM for stop.timeout (stop). The others are caught as they come.
    v1 = make_build(releases, "v1", server_js=SLOW_TO_STOP if phase == "stop" else None)
    listen = free_ports(1)[0]
    run = make_daemon(build=v1, stop_timeout=4, listen=listen, nginx=managed_nginx(listen, switch))
    v2 = make_build(releases, "v2", boot_delay_ms=3000 if phase == "ready" else 0)
    old_pid = run.status()["active"]["pid"]
    held: dict[str, object] = {}
    if phase == "drain":  # a request the old app is still serving when the daemon dies
        import threading

        holder = threading.Thread(target=lambda: held.update(reply=http_get(run.listen_port, "/slow?ms=4000")))
        holder.start()
        wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the slow request to reach the old app")
    with Load(run.listen_port, clients=4, slow_every=8, slow_ms=2000) as load:
        wait_until(lambda: load.slow_ok >= 1, 60, "load with slow requests")
        state = swap_and_kill_daemon_at(run, v2, phase)
        # Nothing the daemon ran died with it: nginx and the app keep serving.
        assert psutil.pid_exists(old_pid)
        assert http_get(run.listen_port, "/")[0] == 200
        run.start()
        st = run.status()
        after = load.total
        wait_until(lambda: load.total >= after + 10, 60, "requests after the restart")
    # The kill lands just after the phase began; the runtime switch and commit take about a
    # millisecond each, so a kill at "switch" may already find the swap committed: state.json says.
    committed = state["active"]["build"] == str(v2)
    assert committed or phase not in ("drain", "stop")
    assert st["daemon"]["status"] == "serving" and st["standby"] is None
    if committed:
        assert st["active"]["build"] == str(v2) and st["active"]["pid"] == state["swap"]["standby"]["pid"]
        wait_until(lambda: not psutil.pid_exists(old_pid), 30, "the old app to be drained and stopped")
        if phase == "drain":
            holder.join(30)
            assert held["reply"] == (200, "v1 slow 4000\n")  # finished on the old build, across the restart
    else:
        assert st["active"]["pid"] == old_pid  # adopted, not restarted
        assert st["active"]["build"] == str(v1)
    assert [e["event"] for e in st["events"]][-1] == "adopted"
    active_port = st["active"]["port"]
    other = run.ports[1] if active_port == run.ports[0] else run.ports[0]
    routed = (run.dir / "run" / "nginx" / "route").read_text().strip() if switch == "runtime" else upstream_port(run)
    assert int(routed) == active_port
    wait_until(lambda: not sockets.listening(other), 30, "the leftover slot to be stopped")
    saved = json.loads((run.dir / "run" / "state.json").read_text())
    assert saved["swap"] is None and saved["active"]["pid"] == st["active"]["pid"]
    # The interrupted swap ends like any other: one history line (none if the kill came before
    # anything was recorded), with who asked it and how it ended.
    entries = [json.loads(x) for x in run.cli("history", "--json").stdout.splitlines()]
    swaps = [e for e in entries if e["reason"] == "swap"]
    assert len(swaps) == (0 if state["swap"] is None else 1), entries
    if swaps:
        e = swaps[0]
        assert e["by"]["uid"] == os.getuid() and e["from"] == str(v1) and e["to"] == str(v2), e
        if committed:
            assert e["outcome"] == "done" and e["traffic"] == "moved", e
        else:
            assert e["outcome"] == "failed" and e["error"]["code"] == "interrupted" and e["traffic"] is None, e
    print(f"\nkill -9 in {phase}: {load.total} requests, failures {dict(load.failures)}")
    assert not load.failures, (load.failures, load.examples)


def test_quit_keep_serving_then_restart_adopts_without_restarting(make_daemon, releases: Path) -> None:
    run = make_daemon()
    st = run.status()
    app_pid, nginx_pid = st["active"]["pid"], st["nginx"]["master_pid"]
    with Load(run.listen_port, clients=4, slow_every=10, slow_ms=500) as load:
        wait_until(lambda: load.ok >= 10, 30, "load")
        q = run.cli("quit", "--keep-serving")
        assert q.returncode == 0 and "keep serving" in q.stdout
        assert run.proc.wait(30) == 0
        assert not run.socket.exists()
        assert psutil.pid_exists(app_pid) and psutil.pid_exists(nginx_pid)
        mid = load.total
        wait_until(lambda: load.total >= mid + 10, 30, "requests with no daemon at all")
        run.start()
        st = run.status()
        assert st["active"]["pid"] == app_pid and st["nginx"]["master_pid"] == nginx_pid
        assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    assert not load.failures, (load.failures, load.examples)
    assert serves(run, "v2")


def test_on_stop_keep_makes_sigterm_leave_the_app_serving(make_daemon) -> None:
    run = make_daemon(extra="", nginx=None)
    cfg = run.config.read_text().replace('state_dir = "run"', 'state_dir = "run"\non_stop = "keep"')
    run.stop()
    run.config.write_text(cfg)
    run.seen.clear()
    run.start()
    st = run.status()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 0
    assert psutil.pid_exists(st["active"]["pid"]) and serves(run, "v1")
    run.start()
    assert run.status()["active"]["pid"] == st["active"]["pid"]


# ---- the control socket


def test_socket_is_private_by_default(make_daemon) -> None:
    run = make_daemon()
    assert stat.S_IMODE(run.socket.stat().st_mode) == 0o600


def test_peers_not_allowed_are_refused(make_daemon) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    run = make_daemon()
    os.chmod(run.dir, 0o755)
    os.chmod(run.dir / "run", 0o755)
    os.chmod(run.socket, 0o666)  # a careless chmod: the credentials check still holds
    client = subprocess.run(
        [sys.executable, "-c", f"""
import os, socket
os.setgid(65534); os.setgroups([]); os.setuid(65534)
s = socket.socket(socket.AF_UNIX); s.connect({str(run.socket)!r}); s.sendall(b"status\\n")
print(s.makefile().readline())
"""], capture_output=True, text=True, timeout=30)
    assert client.stdout.strip(), f"no reply; client stderr: {client.stderr}"
    reply = json.loads(client.stdout)
    assert reply["error"]["code"] == "forbidden" and "uid 65534" in reply["error"]["message"]
    assert "daemon.allow_users" in reply["error"]["message"]


def test_garbage_on_the_socket_never_hurts(make_daemon, releases: Path) -> None:
    run = make_daemon()
    assert raw(run, b"\x00\xff\xfe garbage\n")[0]["error"]["code"] == "bad_request"
    assert raw(run, b'{"cmd": "swap", "build": ["/x"]}\n')[0]["error"]["code"] == "bad_request"
    assert raw(run, b'{"cmd": "swap", "build": "/etc/passwd"}\n')[0]["error"]["code"] == "build_invalid"
    nul = raw(run, b'{"cmd": "swap", "build": "/srv/app\\u0000.war"}\n')[0]["error"]
    assert nul["code"] == "build_invalid" and "NUL byte" in nul["message"], nul
    too_long = raw(run, b"{" + b" " * 70000 + b"\n")
    assert too_long[0]["error"]["code"] == "bad_request" and "longer than 65536" in too_long[0]["error"]["message"]
    raw(run, b"stat", read=False)  # half a line, then gone
    # A client that never sends is dropped after client_timeout (10 s): it must not block others.
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(run.socket))
    try:
        assert raw(run, b"status\n")[-1]["ok"]
        # A client that leaves mid-swap: the swap goes on to the end.
        v2 = make_build(releases, "v2", boot_delay_ms=1000)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(run.socket))
            s.sendall(json.dumps({"cmd": "swap", "build": str(v2)}).encode() + b"\n")
            s.recv(100)
        wait_until(lambda: (run.status() or {}).get("last_swap") and run.status()["last_swap"]["outcome"] == "done",
                   60, "the abandoned swap to finish")
        assert serves(run, "v2")
    finally:
        idle.close()
    assert run.proc.poll() is None


def test_socket_group_shares_the_socket_with_its_members(make_daemon) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    run = make_daemon(start=False)
    run.config.write_text(run.config.read_text().replace('state_dir = "run"',
                                                          'state_dir = "run"\nsocket_group = "nogroup"'))
    run.start()
    import grp

    st = run.socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid
    os.chmod(run.dir, 0o755)
    os.chmod(run.dir / "run", 0o755)
    client = subprocess.run(
        [sys.executable, "-c", f"""
import os, socket
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX); s.connect({str(run.socket)!r}); s.sendall(b"status\\n")
print(s.makefile().readline())
"""], capture_output=True, text=True, timeout=30)
    assert json.loads(client.stdout)["ok"], client.stdout + client.stderr


def test_a_request_past_drain_timeout_that_the_old_build_finishes_is_not_reported_as_cut(make_daemon,
                                                                                       releases: Path) -> None:
    """The drain's timeout cuts nothing by itself: the old build gets SIGTERM, and the example app
    finishes its requests before it exits. The swap says exactly that."""
    run = make_daemon(drain_timeout=1, stop_timeout=30)
    import threading

    got: dict[str, object] = {}
    t = threading.Thread(target=lambda: got.update(reply=http_get(run.listen_port, "/slow?ms=3000", timeout=60)))
    t.start()
    wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the long request to reach the old app")
    r = run.cli("swap", str(make_build(releases, "v2")))
    t.join(60)
    assert r.returncode == 0, r.stderr
    assert got["reply"] == (200, "v1 slow 3000\n")  # finished, not cut
    assert "the 1 connection(s) left open at drain.timeout were not cut: the old build finished them and exited " \
           "with code 0 after SIGTERM" in r.stdout, r.stdout


def test_allow_users_lets_a_listed_user_in_and_refuses_the_others(make_daemon) -> None:
    """daemon.allow_users works as documented: the listed user drives the daemon, another local
    user is refused by name (`forbidden`), both through the socket's file mode and SO_PEERCRED."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as other users")
    import pwd

    run = make_daemon(daemon='allow_users = ["nobody"]')
    assert stat.S_IMODE(run.socket.stat().st_mode) == 0o666
    os.chmod(run.dir, 0o755)
    os.chmod(run.dir / "run", 0o755)

    def ask_as(user: str) -> dict:
        uid = pwd.getpwnam(user).pw_uid
        gid = pwd.getpwnam(user).pw_gid
        client = subprocess.run([sys.executable, "-c", f"""
import os, socket
os.setgroups([]); os.setgid({gid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX); s.connect({str(run.socket)!r}); s.sendall(b"status\\n")
print(s.makefile().readline())
"""], capture_output=True, text=True, timeout=30)
        return json.loads(client.stdout)

    assert ask_as("nobody")["ok"]
    refused = ask_as("daemon")
    assert not refused["ok"] and refused["error"]["code"] == "forbidden", refused
    assert "user daemon" in refused["error"]["message"] and "daemon.allow_users" in refused["error"]["message"]


def test_a_directory_in_place_of_state_json_is_named_and_no_swap_switches_until_it_is_gone(make_daemon,
                                                                                            releases: Path) -> None:
    """Someone puts a directory where state.json is (a cleanup script, a slip of `mkdir`): the
    daemon serves on, says why state.json cannot be written and what to do, and refuses a swap
    before nginx is switched (not at its commit, after the new build served); once the directory
    is gone, the state is written again and swaps work."""
    from shapes import app_build

    run = make_daemon()
    state = run.dir / "run" / "state.json"
    slow = app_build(releases, "v2", boot_ms=3000)
    swap = run.cli_background("swap", str(slow))
    wait_until(lambda: run.phase() == "ready", 60, "the swap to wait for the slow build")
    state.unlink()
    state.mkdir()
    wait_until(lambda: run.status()["daemon"]["state_saved"] is False, 30, "the daemon to find it cannot write")
    out, err = swap.communicate(timeout=120)
    assert swap.returncode == 1, out + err
    assert "nginx was not switched" in out + err and "Is a directory" in out + err, out + err
    assert serves(run, "v1")
    text = run.cli("status").stdout
    assert "NOT SAVED: cannot write" in text and f"move {state} away" in text, text
    v3 = make_build(releases, "v3")
    r = run.cli("swap", str(v3))
    assert r.returncode == 1 and "no swap until state.json can be written" in r.stdout + r.stderr \
        and "Is a directory" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "None" not in r.stdout + r.stderr
    state.rmdir()
    wait_until(lambda: state.is_file() and run.status()["daemon"]["state_saved"], 30, "state.json written again")
    assert run.cli("swap", str(v3)).returncode == 0
    assert serves(run, "v3")


def test_a_burst_of_status_commands_is_never_refused(make_daemon) -> None:
    """A monitoring loop's burst: 200 clients connect at once and each sends `status`. The control
    socket's backlog is the kernel's limit, not asyncio's 100: none is refused (EAGAIN), all answer;
    the daemon measures the apps' memory once for the burst, not once per command."""
    import threading

    run = make_daemon()
    answers: list[bool] = []
    refused: list[str] = []
    barrier = threading.Barrier(200)

    def ask() -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(120)
        try:
            barrier.wait(30)
            s.connect(str(run.socket))
            s.sendall(b"status\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            answers.append(json.loads(data.splitlines()[-1]).get("ok", False))
        except OSError as e:
            refused.append(repr(e))
        finally:
            s.close()

    threads = [threading.Thread(target=ask) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not refused, refused[:5]
    assert answers.count(True) == 200
