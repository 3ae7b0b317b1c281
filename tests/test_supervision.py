"""Supervision never pauses: while a swap waits on a person (paused), a verdict (a rollout step,
the watch) or a hook, nginx is restarted with its whole routing state, and the new build dying
sends traffic back to the old one at once. On both nginx shapes (tests/shapes.py)."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import psutil
import pytest

from helpers import ClientThreads, DaemonRun, answering, answers, http_get, running, wait_until
from shapes import UserNginx, app_build, start_on

pytestmark = pytest.mark.e2e
PREVIEW = {"X-Bluegreen-Preview": "1"}


def restart_nginx(run: DaemonRun, user: UserNginx | None, how: str = "restart") -> None:
    """The managed master killed (the daemon restarts it), or the user's nginx stopped and started
    by hand (`systemctl restart nginx`): either way a fresh nginx with an empty routing table.
    `how="reload"`: an outside reload instead (SIGHUP to the master, what `nginx -s reload` sends)."""
    if how == "reload":
        master = run.status()["nginx"]["master_pid"]
        old = {c.pid for c in psutil.Process(master).children()}
        os.kill(master, signal.SIGHUP)
        wait_until(lambda: {c.pid for c in psutil.Process(master).children()} - old, 30, "new workers")
        return
    if user is not None:
        user.stop()
        time.sleep(0.5)  # the scenario: nginx down for a moment (a restart that takes its time)
        user.start()
        return
    master = run.status()["nginx"]["master_pid"]
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: (st := run.status()) and st["nginx"].get("master_pid") not in (None, master), 60,
               "the daemon to restart its nginx during the swap", run.output)


def bucket_user(share: int, inside: bool) -> str:
    """A rollout cookie whose bucket is inside (or outside) the first `share` % of users."""
    for i in range(10_000):
        user = f"user{i}"
        if (zlib.crc32(user.encode()) % 100 < share) == inside:
            return user
    raise AssertionError("no such user")


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_nginx_restarted_while_paused_comes_back_with_the_preview(shape, releases: Path, how: str) -> None:
    run, user = shape()
    assert run.cli("swap", str(app_build(releases, "v2")), "--pause").returncode == 0  # returns once paused
    assert run.phase() == "paused"
    assert answers(run.listen_port, **PREVIEW) == {"v2": 10}
    restart_nginx(run, user, how)
    # The swap still waits for a person; the new nginx routes as the old one did, preview included.
    wait_until(lambda: answering(run.listen_port, {"v2": 4}, **PREVIEW), 30, "the preview on the new nginx",
               run.output)
    assert answers(run.listen_port) == {"v1": 10} and run.phase() == "paused"
    if how == "restart":
        assert any(e["event"] in ("nginx_restarted", "routing_restored") for e in run.status()["events"])
    r = run.cli("abort")
    assert r.returncode == 0 and "traffic never moved" in r.stdout, r.stdout + r.stderr
    # After the abort everyone, preview header or not, is on the old build (never a stopped standby).
    assert answers(run.listen_port, **PREVIEW) == {"v1": 10} and answers(run.listen_port) == {"v1": 10}


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_nginx_restarted_mid_rollout_comes_back_with_the_split(shape, releases: Path, how: str) -> None:
    run, user = shape("[rollout]\nmin_requests = 100000")  # the step never passes by itself
    swap = run.cli_background("swap", str(app_build(releases, "v2")), "--rollout", "30,100", "--step", "600")
    wait_until(lambda: (st := run.status()) and st["rollout"] and st["rollout"]["share"] == 30, 60, "step 1",
               run.output)
    inside, outside = bucket_user(30, True), bucket_user(30, False)
    assert answers(run.listen_port, Cookie=f"bluegreen_id={inside}") == {"v2": 10}
    assert "rollout 30 %" in run.cli("status").stdout  # the new build's row says what it does
    restart_nginx(run, user, how)
    wait_until(lambda: answering(run.listen_port, {"v2": 4}, Cookie=f"bluegreen_id={inside}"), 30,
               "the split on the new nginx", run.output)
    assert answers(run.listen_port, Cookie=f"bluegreen_id={outside}") == {"v1": 10}
    assert run.cli("abort").returncode == 0
    swap.communicate(timeout=120)
    assert swap.returncode == 1
    assert answers(run.listen_port, Cookie=f"bluegreen_id={inside}") == {"v1": 10}


class Users(ClientThreads):
    """Users, each with its own rollout cookie, on fresh connections; answers counted by kind."""

    def __init__(self, port: int, clients: int = 4) -> None:
        super().__init__(clients)
        self.port = port
        self.answers: Counter[str] = Counter()

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            cookie = f"bluegreen_id=u{rng.getrandbits(48):x}"
            try:
                status, body = http_get(self.port, "/", timeout=30, headers={"Cookie": cookie})
                kind = body.split()[-1] if status == 200 else f"http_{status}"
            except OSError as e:
                kind = type(e).__name__
            with self.lock:
                self.answers[kind] += 1


def kill_new_build(run: DaemonRun) -> int:
    pid = run.status()["standby"]["pid"]
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return pid


def test_the_new_build_killed_mid_rollout_step_sends_everyone_back_at_once(shape, releases: Path) -> None:
    """Not after min_requests failures: at once, whatever the verdict (here one that never comes)."""
    run, user = shape("[rollout]\nmin_requests = 100000")
    with Users(run.listen_port) as users:
        swap = run.cli_background("swap", str(app_build(releases, "v2")), "--rollout", "30,100", "--step", "600")
        wait_until(lambda: users.answers["v2"] >= 5, 60, "the new build's share to be served", run.output)
        kill_new_build(run)
        out, err = swap.communicate(timeout=120)
        wait_until(lambda: users.answers["v1"] >= 20, 30, "more answers")
    assert swap.returncode == 1, out + err
    assert "[app_exited]" in err and "during the rollout" in err and "everyone is back on the old build" in err, err
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["standby"] is None and st["last_swap"]["traffic"] == "restored"
    assert answers(run.listen_port, Cookie=f"bluegreen_id={bucket_user(30, True)}") == {"v1": 10}


def test_the_new_build_dying_during_the_watch_sends_traffic_back_at_once(shape, releases: Path) -> None:
    run, user = shape("[release]\nwatch_seconds = 600\n[rollout]\nmin_requests = 100000")
    swap = run.cli_background("swap", str(app_build(releases, "v2")))
    wait_until(lambda: run.phase() == "watch", 60, "the watch", run.output)
    assert answers(run.listen_port) == {"v2": 10}
    st = run.status()  # the old build still runs, and status says so: it is the way back
    assert st["retiring"]["build"].endswith("/v1") and running(st["retiring"]["pid"]), st
    text = run.cli("status").stdout
    assert re.search(r"^│ old +│ blue +│.*│ no traffic; the way back +│$", text, re.M), text
    os.killpg(os.getpgid(run.status()["active"]["pid"]), signal.SIGKILL)  # committed: the new build is active
    out, err = swap.communicate(timeout=120)
    assert swap.returncode == 1 and "[app_exited]" in err and "during the watch" in err, err
    st = run.status()
    assert st["last_swap"]["traffic"] == "restored" and st["active"]["slot"] == "blue"
    assert answers(run.listen_port) == {"v1": 10}


def test_the_new_build_dying_during_after_switch_goes_back_while_the_hook_still_runs(
        shape, releases: Path, short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    hook = short_tmp / "contract.sh"
    hook.write_text(f"#!/bin/sh\necho contract step\nwhile [ ! -e {gate} ]; do sleep 0.05; done\necho done\n")
    hook.chmod(0o755)
    run, user = shape(f'[hooks]\nafter_switch = ["{hook}"]')
    swap = run.cli_background("swap", str(app_build(releases, "v2")))
    wait_until(lambda: run.phase() == "after_switch", 60, "the contract step", run.output)
    new = run.status()["active"]["pid"]
    os.killpg(os.getpgid(new), signal.SIGKILL)
    # Back on the old build while the hook still waits for its gate.
    wait_until(lambda: answering(run.listen_port, {"v1": 3}), 30, "traffic back on the old build", run.output)
    assert swap.poll() is None, "the hook was cut short"
    gate.touch()
    out, err = swap.communicate(timeout=120)
    assert swap.returncode == 1 and "[app_exited]" in err and "during the after_switch" in err, err
    assert "the hook ran to its end" in err
    assert run.status()["last_swap"]["traffic"] == "restored"


def test_a_rollout_step_that_never_reaches_a_verdict_ends_at_step_timeout(shape, releases: Path) -> None:
    run, user = shape("[rollout]\nmin_requests = 100000\nstep_seconds = 1\nstep_timeout = 3")
    r = run.cli("swap", str(app_build(releases, "v2")), "--rollout", "10,100")
    assert r.returncode == 1 and "[rollout_aborted]" in r.stderr, r.stderr
    assert "rollout.step_timeout (3s)" in r.stderr and "waiting for 100000 requests" in r.stderr, r.stderr
    assert run.status()["last_swap"]["traffic"] == "restored"
    assert answers(run.listen_port) == {"v1": 10}


def test_a_preview_nobody_promoted_is_not_made_active_by_the_next_daemon(shape, releases: Path) -> None:
    """Killed while paused, and the active build dies before the next daemon starts: the preview
    was never approved, so the old build is started again and the preview stopped."""
    run, user = shape()
    assert run.cli("swap", str(app_build(releases, "v2")), "--pause").returncode == 0
    st = run.status()
    standby, active = st["paused"]["standby"]["pid"], st["active"]["pid"]
    run.kill()
    os.killpg(os.getpgid(active), signal.SIGKILL)
    run.start()
    wait_until(lambda: not running(standby),
               60, "the unapproved preview to be stopped")
    assert answers(run.listen_port) == {"v1": 10} and answers(run.listen_port, **PREVIEW) == {"v1": 10}
    last = run.status()["last_swap"]
    assert last["outcome"] == "failed" and last["error"]["code"] == "interrupted", last
    assert "nobody promoted" in last["error"]["message"]


def test_a_contract_step_the_killed_daemon_never_ran_is_named_in_status_and_history(
        shape, releases: Path, short_tmp: Path) -> None:
    hook = short_tmp / "contract.sh"
    hook.write_text("#!/bin/sh\necho contract\n")
    hook.chmod(0o755)
    run, user = shape(f'[hooks]\nafter_switch = ["{hook}"]', drain_timeout=60)
    held = threading.Thread(target=lambda: http_get(run.listen_port, "/slow?ms=3000", timeout=30))
    held.start()
    wait_until(lambda: run.status()["active"] and inflight_to(run, run.ports[0]), 30, "a request in flight")
    swap = run.cli_background("swap", str(app_build(releases, "v2")))
    wait_until(lambda: run.phase() == "drain", 60, "the drain", run.output)
    run.kill()
    swap.communicate(timeout=60)
    held.join(30)
    run.start()
    st = run.status()
    assert "hook_skipped: hooks.after_switch" in (st["daemon"]["warning"] or ""), st["daemon"]
    last = run.cli("history", "--json", "-n", "1").stdout
    assert "hook_skipped" in last and '"outcome": "done"' in last, last
    assert answers(run.listen_port) == {"v2": 10}


def inflight_to(run: DaemonRun, port: int) -> bool:
    from supervisor.processes import sockets

    return sockets.inflight(port) > 0


def test_the_new_build_dying_while_paused_ends_the_preview_at_once(shape, releases: Path) -> None:
    run, user = shape()
    assert run.cli("swap", str(app_build(releases, "v2")), "--pause").returncode == 0
    kill_new_build(run)
    wait_until(lambda: run.phase() is None, 30, "the paused swap to end", run.output)
    st = run.status()
    assert st["paused"] is None and st["standby"] is None and st["active"]["slot"] == "blue"
    last = st["last_swap"]
    assert last["error"]["code"] == "app_exited" and "while paused; the preview ended" in last["error"]["message"], last
    assert last["traffic"] == "unchanged"
    assert answers(run.listen_port, **PREVIEW) == {"v1": 10} and answers(run.listen_port) == {"v1": 10}


def test_a_rollout_ended_while_your_nginx_is_down_never_sends_users_to_the_stopped_build(make_daemon, short_tmp: Path,
                                                                                        releases: Path) -> None:
    """Your nginx stopped mid-rollout; the rollout ends meanwhile (nginx cannot be told); nginx
    starts again: its table must end up with no split at all, never the split to the build that
    was stopped (the daemon's reconcile follows what it meant, not what it last managed to set)."""
    run, user = start_on("debian", make_daemon, short_tmp, app_build(releases, "v1"), "[rollout]\nmin_requests = 100000")
    assert user is not None
    try:
        swap = run.cli_background("swap", str(app_build(releases, "v2")), "--rollout", "30,100", "--step", "600")
        wait_until(lambda: (st := run.status()) and st["rollout"] and st["rollout"]["share"] == 30, 60, "step 1",
                   run.output)
        user.stop()
        run.cli("abort")  # (or the rollout already failed on its own: nginx's counters are gone)
        out, err = swap.communicate(timeout=120)
        assert swap.returncode == 1, out + err
        wait_until(lambda: run.status()["standby"] is None, 60, "the new build to be stopped", run.output)
        user.start()
        inside = bucket_user(30, True)
        wait_until(lambda: answering(run.listen_port, {"v1": 10}, Cookie=f"bluegreen_id={inside}"), 30,
                   "the users of the share back on the old build", run.output)
        time.sleep(2)  # two of the daemon's reconcile rounds: it must not put the dead split back
        assert answers(run.listen_port, 20, Cookie=f"bluegreen_id={inside}") == {"v1": 20}
    finally:
        run.stop()
        user.close()


def test_no_request_leaves_an_uninitialized_variable_warning_in_nginx_s_log(shape, releases: Path) -> None:
    run, user = shape()
    for path in ("/", "/missing", "/boom", "/health"):
        http_get(run.listen_port, path)
    log = (user.prefix / "error.log") if user is not None else (run.dir / "run" / "nginx" / "error.log")
    assert "uninitialized" not in log.read_text()
