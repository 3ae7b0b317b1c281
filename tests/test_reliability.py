"""Faults users really meet: each test pins down a promise that once broke (issue 8).

Every test drives a real daemon, a real nginx and real app processes through the CLI, the
socket and HTTP only, and waits on conditions, never on the clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from helpers import (SLOW_TO_STOP, bluegreen, crashes_after_ready, DaemonRun, free_ports, http_get, kill_tree, Load,
                     make_build, managed_nginx, raw, serves, wait_until)
from supervisor.processes import sockets, slots

pytestmark = pytest.mark.e2e

CRASHES_AFTER_READY = crashes_after_ready(300)


def status_where(run: DaemonRun, predicate: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: (lambda s: s if s and predicate(s) else None)(run.status()), timeout, what, run.output)


class Background:
    """A request held in flight on its own thread (e.g. a slow one the drain must wait for)."""

    def __init__(self, port: int, path: str) -> None:
        self.reply: Any = None
        self.thread = threading.Thread(target=self._run, args=(port, path), daemon=True)
        self.thread.start()

    def _run(self, port: int, path: str) -> None:
        try:
            self.reply = http_get(port, path, timeout=120)
        except OSError as e:
            self.reply = repr(e)

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self) -> Any:
        self.thread.join(120)
        return self.reply


def swap_over_socket(run: DaemonRun, build: Path, until_phase: str) -> tuple[socket.socket, Any]:
    """Start a swap over the socket; return once `until_phase` has begun (the connection stays open)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(str(run.socket))
    s.sendall(json.dumps({"cmd": "swap", "build": str(build)}).encode() + b"\n")
    f = s.makefile("rb")
    for line in f:
        msg = json.loads(line)
        assert "ok" not in msg, msg
        if msg.get("event") == until_phase and msg.get("status") == "begin":
            return s, f
    raise AssertionError(f"the swap never reached {until_phase}")


def final_reply(f: Any) -> dict[str, Any]:
    for line in f:
        msg = json.loads(line)
        if "ok" in msg:
            return msg
    raise AssertionError("no final reply")


# ---- 1. a full disk during a swap


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """state_dir on its own small tmpfs, which a test can fill at a chosen moment."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    mnt = short_tmp / "run"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# nginx, except that `nginx -t` can fill the state_dir's disk first (right after bluegreen wrote
# the upstream that names the new port), or fail once, and a start can fail. The trigger files
# live off that disk. Every failure is the real nginx's, in its own words: it is given a directive
# it refuses (`-g`, the last one given wins).
NGINX_WRAPPER = """#!/bin/sh
case " $* " in *" -t "*)
  if [ -e "{t}/fail-next-test" ]; then rm -f "{t}/fail-next-test"; exec {nginx} "$@" -g "injected_test_failure on;"; fi
  if [ -e "{t}/fill-on-test" ]; then
    mode=$(cat "{t}/fill-on-test"); rm -f "{t}/fill-on-test"
    dd if=/dev/zero of="{disk}/filler" bs=4k 2>/dev/null
    [ "$mode" = "then-fail" ] && touch "{t}/fail-next-test"
    touch "{t}/filled"
  fi;;
esac
if [ -e "{t}/fail-start" ]; then
  case " $* " in *" -t "*) ;; *) exec {nginx} "$@" -g "injected_start_failure_$(cat "{t}/fail-start") on;";; esac
fi
exec {nginx} "$@"
"""


def nginx_wrapper(d: Path, disk: Path) -> Path:
    import shutil

    real = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    w = d / "nginx-wrapper"
    w.write_text(NGINX_WRAPPER.format(t=d, disk=disk, nginx=real))
    w.chmod(0o755)
    return w


class KeepFull:
    """Once the wrapper has filled the disk, take back every page anything frees (a real full
    disk stays full: on tmpfs a single freed page would let state.json be written again)."""

    def __init__(self, trigger_dir: Path, disk: Path) -> None:
        self.filled, self.filler = trigger_dir / "filled", disk / "filler-more"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            while not self.stop.wait(0.001):
                if not self.filled.exists():
                    continue
                try:
                    while f.write(b"\0" * 4096):
                        pass
                except OSError:
                    pass

    def release(self) -> None:
        self.stop.set()
        self.thread.join(10)
        try:
            self.filler.unlink(missing_ok=True)
        except OSError:
            pass


def managed_with(binary: Path, listen: int) -> str:
    return managed_nginx(listen, binary=str(binary))


def test_disk_full_after_the_switch_puts_traffic_back_on_the_old_build(make_daemon, short_tmp: Path,
                                                                       small_disk: Path, releases: Path) -> None:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_with(nginx_wrapper(short_tmp, small_disk), listen))
    blue_pid = run.status()["active"]["pid"]
    with Load(run.listen_port, clients=4, slow_every=1000) as load:
        wait_until(lambda: load.ok >= 20, 30, "load")
        (short_tmp / "fill-on-test").write_text("fill")
        r = run.cli("swap", str(make_build(releases, "v2")))
        after = load.total
        wait_until(lambda: load.total >= after + 20, 30, "requests after the failed swap")
    assert r.returncode == 1, r.stdout + r.stderr + run.output()
    assert "[state_write_failed]" in r.stderr and "No space left on device" in r.stderr
    assert "traffic is back on the old build" in r.stderr
    st = run.status()
    assert st["active"]["pid"] == blue_pid and st["active"]["alive"] and st["daemon"]["status"] == "serving"
    assert serves(run, "v1")
    assert not load.failures, (load.failures, load.examples)
    (small_disk / "filler").unlink()  # room again: the next release goes through
    assert run.cli("swap", str(make_build(releases, "v3"))).returncode == 0
    assert serves(run, "v3")


def test_disk_full_and_no_way_back_keeps_the_new_build_serving_and_says_so(make_daemon, short_tmp: Path,
                                                                           small_disk: Path, releases: Path) -> None:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_with(nginx_wrapper(short_tmp, small_disk), listen))
    full = KeepFull(short_tmp, small_disk)
    try:
        with Load(run.listen_port, clients=4, slow_every=1000) as load:
            wait_until(lambda: load.ok >= 20, 30, "load")
            (short_tmp / "fill-on-test").write_text("then-fail")
            v2 = make_build(releases, "v2")
            r = run.cli("swap", str(v2))
            after = load.total
            wait_until(lambda: load.total >= after + 20, 30, "requests after the swap")
        assert r.returncode == 4, r.stdout + r.stderr + run.output()
        assert "the new build serves" in r.stderr and "state.json" in r.stderr
        # (for nginx's 100 ms after a reload its old workers still answer from the old build)
        wait_until(lambda: serves(run, "v2"), 30, "the new build to serve", run.output)
        assert not load.failures, (load.failures, load.examples)
        st = run.status()
        assert st["active"]["build"] == str(v2) and st["active"]["alive"]
        assert "state.json" in (st["daemon"]["warning"] or "")
        assert "NOT SAVED" in run.cli("status").stdout
        # Meanwhile the old build keeps running (state.json still names it: a restarted daemon
        # finds a consistent world), and no swap is accepted.
        old_pid = json.loads((small_disk / "state.json").read_text())["active"]["pid"]
        assert psutil.pid_exists(old_pid) and old_pid != st["active"]["pid"]
        refused = run.cli("swap", str(make_build(releases, "v3")))
        assert refused.returncode == 1 and "[state_write_failed]" in refused.stderr \
            and "no swap until state.json can be written" in refused.stderr, refused.stderr
    finally:
        full.release()
    (small_disk / "filler").unlink()  # once there is room, the daemon writes the truth by itself
    wait_until(lambda: json.loads((small_disk / "state.json").read_text())["active"]["build"] == str(v2), 30,
               "state.json to name the new build", run.output)
    assert status_where(run, lambda s: s["daemon"]["warning"] is None, "the warning to clear")
    # ...then the old build is drained and stopped
    wait_until(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE,
               60, "the old build to be stopped once the state is saved", run.output)
    assert not sockets.listening(run.ports[0])


# ---- 2. "previous" is the last build a user released


def test_rollback_after_crash_restarts_returns_to_the_last_good_release(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[app.restart]\nattempts = 2\nbackoff = 0.1\nbackoff_max = 0.2")
    v1 = run.status()["active"]["build"]
    crashing = make_build(releases, "crashing", server_js=CRASHES_AFTER_READY)
    run.cli("swap", str(crashing))
    st = status_where(run, lambda s: s["daemon"]["status"] == "failed", "the crashing build to be given up on")
    assert st["previous_build"] == v1
    r = run.cli("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert serves(run, "v1") and run.status()["active"]["build"] == v1
    # A restart (swap without a build) is no release: it leaves "previous" alone.
    assert run.cli("swap").returncode == 0
    assert run.status()["previous_build"] == str(crashing)


# ---- 3. the new build dies during the drain


def test_new_build_dying_during_the_drain_sends_traffic_back_at_once(make_daemon, releases: Path) -> None:
    run = make_daemon()
    long = Background(run.listen_port, "/slow?ms=6000")  # long enough: the revert comes at once
    wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the long request to reach v1")
    s, f = swap_over_socket(run, make_build(releases, "v2"), "drain")
    with s:
        new_pid = run.status()["active"]["pid"]
        os.kill(new_pid, signal.SIGKILL)
        wait_until(lambda: serves(run, "v1"), 60, "traffic to be served again", run.output)
        assert not long.done, "traffic came back only when the drain ended"
        reply = final_reply(f)
    assert not reply["ok"] and reply["error"]["code"] == "app_exited", reply
    assert reply["error"]["traffic"] == "restored"
    assert long.result() == (200, "v1 slow 6000\n")
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["daemon"]["status"] == "serving"




def test_new_build_dying_after_the_old_one_stopped_is_reported_and_restarted(make_daemon, releases: Path) -> None:
    run = make_daemon(build=make_build(releases, "v1", server_js=SLOW_TO_STOP), stop_timeout=3)
    s, f = swap_over_socket(run, make_build(releases, "v2"), "stop")
    with s:
        new_pid = run.status()["active"]["pid"]
        os.kill(new_pid, signal.SIGKILL)
        reply = final_reply(f)
    assert not reply["ok"] and reply["error"]["code"] == "app_exited", reply
    assert reply["error"]["traffic"] == "moved" and "restarts it" in reply["error"]["message"]
    st = status_where(run, lambda s: s["active"]["pid"] != new_pid and s["active"]["alive"]
                      and s["daemon"]["status"] == "serving", "the crash restart")
    assert st["active"]["build"].endswith("v2")
    wait_until(lambda: serves(run, "v2"), 30, "v2 to serve again")


# ---- 4. a shutdown during the drain


def in_drain_with_a_long_request(run: DaemonRun, releases: Path, ms: int) -> tuple[int, Background, Any, Any]:
    """A request of `ms` in flight on v1, and a swap to v2 that has begun draining it."""
    old_pid = run.status()["active"]["pid"]
    long = Background(run.listen_port, f"/slow?ms={ms}")
    wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the long request to reach v1")
    s, f = swap_over_socket(run, make_build(releases, "v2"), "drain")
    return old_pid, long, s, f


def test_quit_keep_serving_during_the_drain_hands_the_old_app_to_the_next_daemon(make_daemon,
                                                                                 releases: Path) -> None:
    run = make_daemon()
    old_pid, long, s, f = in_drain_with_a_long_request(run, releases, 6000)
    with s:
        assert run.cli("quit", "--keep-serving").returncode == 0
        reply = final_reply(f)
    assert reply["ok"], reply
    assert any("handed over" in w for w in reply["result"]["swap"]["warnings"])
    assert run.proc.wait(30) == 0
    run.start()
    wait_until(lambda: not psutil.pid_exists(old_pid), 60, "the next daemon to drain and stop the old app")
    assert long.result() == (200, "v1 slow 6000\n")
    r = run.cli("swap", str(make_build(releases, "v3")))
    assert r.returncode == 0, r.stderr
    assert serves(run, "v3")


def test_sigterm_during_the_drain_leaves_no_process_behind(make_daemon, releases: Path) -> None:
    run = make_daemon()
    old_pid, long, s, f = in_drain_with_a_long_request(run, releases, 3000)
    with s:
        run.proc.send_signal(signal.SIGTERM)
        reply = final_reply(f)
    assert run.proc.wait(60) == 0
    assert reply["ok"], reply
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert not sockets.listening(run.ports[0]) and not sockets.listening(run.ports[1])
    assert long.result() == (200, "v1 slow 3000\n")  # nginx stopped gracefully: it finished


# ---- 5. a start script that puts the server in the background


FORKS = "node server.js &\n"


def test_start_script_that_forks_is_refused_and_leaves_no_orphan(make_daemon, releases: Path) -> None:
    run = make_daemon(command='["sh", "start.sh"]')
    # (its server binds after 1 s: the script has surely exited before readiness could pass; if the
    # server won that race, the exit would be a crash of a serving app: same hint, see recover())
    r = run.cli("swap", str(make_build(releases, "forks", start_sh=FORKS, boot_delay_ms=1000)))
    assert r.returncode == 1
    assert "[app_exited]" in r.stderr and "background" in r.stderr and "foreground" in r.stderr
    assert not slots.marked(run.dir / "run", "green"), "the backgrounded server outlived its slot"
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    assert serves(run, "v2")


def test_first_start_of_a_forking_script_leaves_no_orphan(make_daemon, releases: Path) -> None:
    run = make_daemon(start=False, command='["sh", "start.sh"]',
                      build=make_build(releases, "forks", start_sh=FORKS, boot_delay_ms=1000))
    run.start(wait=False)
    assert run.proc.wait(60) == 1
    assert "foreground" in run.output()
    assert not slots.marked(run.dir / "run"), "the backgrounded server outlived the daemon"


def test_a_leftover_of_ours_on_the_standby_port_is_cleared(make_daemon, releases: Path) -> None:
    run = make_daemon()
    state_dir = run.dir / "run"
    env = {**os.environ, "PORT": str(run.ports[1]), "BLUEGREEN_STATE_DIR": str(state_dir), "BLUEGREEN_SLOT": "green"}
    build = make_build(releases, "stray")
    stray = subprocess.Popen(["node", "server.js"], cwd=build, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sockets.listening(run.ports[1]), 30, "the stray server to listen")
        r = run.cli("swap", str(make_build(releases, "v2")))
        assert r.returncode == 0, r.stderr
        wait_until(lambda: stray.poll() is not None, 30, "the stray server of ours to be stopped")
        assert serves(run, "v2")
    finally:
        kill_tree([stray.pid])


# ---- 6. two daemons, one socket


def test_a_second_daemon_never_takes_over_a_live_socket(make_daemon, short_tmp: Path) -> None:
    run = make_daemon()
    other_dir = short_tmp / "other"
    other_dir.mkdir()
    picked = free_ports(3)
    other = DaemonRun(dir=other_dir, config=other_dir / "bluegreen.toml", listen_port=picked[0],
                      ports=(picked[1], picked[2]))
    text = run.config.read_text().replace('state_dir = "run"', f'state_dir = "run"\nsocket = "{run.socket}"')
    for old, new in zip((run.listen_port, *run.ports), picked):
        text = text.replace(str(old), str(new))
    other.config.write_text(text)
    other.start(wait=False)
    try:
        assert other.proc.wait(60) == 1
        assert "another bluegreen daemon answers on" in other.output()
        assert run.socket.exists() and run.status()["daemon"]["config"] == str(run.config)
    finally:
        other.stop()


# ---- 7. a `current` symlink


def test_current_symlink_is_resolved_at_each_swap(make_daemon, releases: Path) -> None:
    r1, r2, r3 = (make_build(releases, n) for n in ("r1", "r2", "r3"))
    current = releases / "current"
    current.symlink_to(r1)
    run = make_daemon(build=current)
    assert run.status()["active"]["build"] == str(r1)
    os.unlink(current)
    current.symlink_to(r2)
    assert run.cli("swap", str(current)).returncode == 0
    st = run.status()
    assert st["active"]["build"] == str(r2) and st["previous_build"] == str(r1)
    # Restaged but not released: a crash restart brings back what was released.
    os.unlink(current)
    current.symlink_to(r3)
    os.kill(st["active"]["pid"], signal.SIGKILL)
    st = status_where(run, lambda s: s["active"]["pid"] != st["active"]["pid"] and s["active"]["alive"]
                      and s["daemon"]["status"] == "serving", "the crash restart")
    assert st["active"]["build"] == str(r2) and serves(run, "r2")
    assert run.cli("rollback").returncode == 0
    assert serves(run, "r1")


# ---- 8. the nginx master dies while a long request is in flight


def test_killed_master_is_replaced_without_waiting_for_its_workers_requests(make_daemon) -> None:
    run = make_daemon()
    long = Background(run.listen_port, "/slow?ms=8000")
    wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the long request to reach the app")
    master = run.status()["nginx"]["master_pid"]
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: (run.status() or {"nginx": {}})["nginx"].get("master_pid") not in (None, master), 30,
               "a new master", run.output)
    run.remember(run.status())
    wait_until(lambda: serves(run, "v1"), 30, "the front port to answer again")
    assert not long.done, "the front port came back only after the old workers' request ended"
    assert long.result() == (200, "v1 slow 8000\n")  # the dead master's worker finished it


def test_nginx_that_cannot_restart_backs_off_and_status_says_why(make_daemon, short_tmp: Path) -> None:
    listen = free_ports(1)[0]
    disk = short_tmp / "run"
    run = make_daemon(listen=listen, nginx=managed_with(nginx_wrapper(short_tmp, disk), listen))
    with open(disk / "nginx" / "error.log", "a") as log:  # an old failure, far back in a large log
        log.write("2020/01/01 00:00:00 [emerg] 1#1: stale failure from long ago\n" + "x" * 100_000 + "\n")
    (short_tmp / "fail-start").write_text("now")
    master = run.status()["nginx"]["master_pid"]
    os.kill(master, signal.SIGKILL)
    st = status_where(run, lambda s: [e["event"] for e in s["events"]].count("nginx_restart_failed") >= 3,
                      "three failed restarts")
    delays = [e["retry_in"] for e in st["events"] if e["event"] == "nginx_restart_failed"]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    # nginx's own words, from the real nginx
    assert not st["nginx"]["running"] and 'unknown directive "injected_start_failure_now"' in st["nginx"]["error"], \
        st["nginx"]
    assert "stale failure" not in st["nginx"]["error"]
    assert st["daemon"]["status"] != "serving"
    (short_tmp / "fail-start").unlink()
    st = status_where(run, lambda s: s["nginx"].get("running") and s["daemon"]["status"] == "serving",
                      "nginx back", timeout=120)
    run.remember(st)
    assert serves(run, "v1")


# ---- 9. configs that would fail later are refused up front


def test_daemon_runs_from_a_directory_whose_path_has_a_space(make_daemon, short_tmp: Path) -> None:
    spaced = short_tmp / "my app"
    spaced.mkdir()
    run = make_daemon(start=False)
    run.dir = spaced
    run.config = spaced / "bluegreen.toml"
    run.config.write_text((short_tmp / "bluegreen.toml").read_text())
    run.start()
    assert serves(run, "v1")


def test_check_config_names_every_late_failure(short_tmp: Path) -> None:
    (short_tmp / "afile").write_text("")
    cfg = short_tmp / "bad.toml"
    cfg.write_text("""
[daemon]
state_dir = "afile/run"
[app]
command = ["no-such-program-xyz"]
ports = [9101, 9102]
build = "missing-build"
[app.ready]
url = "http://127.0.0.1:9101/health"
[nginx]
listen = "127.0.0.1:9102"
upstream_name = "my app"
""")
    r = bluegreen("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ("app.ready.url", "app.build", "app.command", "nginx.listen", "nginx.upstream_name", "daemon.state_dir"):
        assert key in r.stderr, (key, r.stderr)
    assert "Traceback" not in r.stderr


# ---- 10. the socket and the CLI


def test_hostile_requests_get_a_clear_answer(make_daemon, releases: Path) -> None:
    run = make_daemon()
    long_name = raw(run, json.dumps({"cmd": "swap", "build": "/" + "a" * 300}).encode() + b"\n")
    assert long_name[-1]["error"]["code"] == "build_invalid", long_name
    deep = raw(run, b'{"cmd": "status", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}\n")
    assert deep[-1]["error"]["code"] == "bad_request", deep
    unknown = raw(run, b"x" * 60000 + b"\n")
    assert unknown[-1]["error"]["code"] == "bad_request" and len(unknown[-1]["error"]["message"]) < 500
    surrogate = raw(run, b'{"cmd": "swap", "build": "/srv/\\ud800"}\n')  # valid JSON, no valid path
    assert surrogate[-1]["error"]["code"] == "bad_request" and "not valid Unicode" in surrogate[-1]["error"]["message"]
    spaced = releases / "with space"
    make_build(releases, "with space", version="spaced")
    words = raw(run, f'swap "{spaced}"\n'.encode())
    assert words[-1]["ok"], words[-1]
    assert serves(run, "spaced")
    assert run.proc.poll() is None


def test_cli_against_a_hung_daemon_exits_3(make_daemon, releases: Path) -> None:
    run = make_daemon()
    run.proc.send_signal(signal.SIGSTOP)
    try:
        st = run.cli("status", "--timeout", "2")
        assert st.returncode == 3 and "Traceback" not in st.stderr and "not answering" in st.stderr, st.stderr
        sw = run.cli("swap", str(make_build(releases, "v2")), "--timeout", "2")
        assert sw.returncode == 3 and "Traceback" not in sw.stderr, sw.stderr
    finally:
        run.proc.send_signal(signal.SIGCONT)


def test_state_dir_under_a_file_is_a_clear_error(short_tmp: Path) -> None:
    (short_tmp / "afile").write_text("")
    cfg = short_tmp / "bluegreen.toml"
    build = make_build(short_tmp / "releases", "v1")
    cfg.write_text(f'[daemon]\nstate_dir = "afile/run"\n[app]\ncommand = ["node", "server.js"]\n'
                   f'ports = [9101, 9102]\nbuild = "{build}"\n')
    r = bluegreen("daemon", "-c", str(cfg), timeout=60)
    assert r.returncode == 2 and "daemon.state_dir" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- 11. the smaller promises


def test_nginx_listen_port_held_at_start_names_the_holder(make_daemon) -> None:
    run = make_daemon(start=False)
    squatter = subprocess.Popen([sys.executable, "-c", f"""
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {run.listen_port})); s.listen(); print("bound", flush=True); time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "bound"
        run.start(wait=False)
        assert run.proc.wait(60) == 1
        assert f"pid {squatter.pid}" in run.output(), run.output()
    finally:
        squatter.kill()
        squatter.wait()


HEALTH = '[app.health]\nurl = "http://127.0.0.1:{port}/health"\ninterval = 0.2\ntimeout = 0.5\nfailures = 3'


def test_hung_active_app_is_replaced(make_daemon) -> None:
    run = make_daemon(extra=HEALTH, drain_timeout=2, stop_timeout=1)
    hung = run.status()["active"]
    os.kill(hung["pid"], signal.SIGSTOP)
    try:
        st = status_where(run, lambda s: s["active"]["pid"] != hung["pid"] and s["daemon"]["status"] == "serving",
                          "the hung app to be replaced")
        # (a request an old nginx worker took in the 100 ms after the reload waits on the hung app)
        wait_until(lambda: serves(run, "v1"), 60, "the replacement to serve", run.output)
        assert "unhealthy" in [e["event"] for e in st["events"]]
        wait_until(lambda: not psutil.pid_exists(hung["pid"]), 60, "the hung app to be killed")
    finally:
        try:
            os.kill(hung["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_file_build_survives_a_daemon_restart(make_daemon, releases: Path) -> None:
    """A build can be a file (a WAR, a bundle): the next daemon starts the one that served last,
    as it does a directory, not app.build."""
    from shapes import app_source

    def bundle(name: str) -> Path:  # one executable file, as a single-file build tool makes
        path = releases / f"app-{name}"
        path.write_text("#!/usr/bin/env node\n" + app_source(name))
        path.chmod(0o755)
        return path

    run = make_daemon(build=bundle("v1"), command='["{build}"]')
    assert run.cli("swap", str(bundle("v2"))).returncode == 0
    assert run.stop() == 0
    run.start()
    assert http_get(run.listen_port) == (200, "hello from v2\n")
    assert run.status()["active"]["build"] == str(releases / "app-v2")
    assert "is gone" not in run.output()
