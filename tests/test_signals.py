"""Signals to the daemon: SIGHUP never stops it, a second SIGTERM always does, at once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from helpers import ROOT, DaemonRun, http_get, running, wait_until
from shapes import app_build

pytestmark = pytest.mark.e2e


def test_sighup_reopens_the_daemon_log_and_never_stops_the_daemon(make_daemon) -> None:
    run: DaemonRun = make_daemon()
    log = run.dir / "run" / "logs" / "daemon.log"
    log.rename(log.with_name("daemon.log.old"))  # what logrotate does before it sends HUP
    assert run.proc is not None
    run.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: log.exists() and "SIGHUP: logs/daemon.log reopened" in log.read_text(), 30,
               "the daemon to reopen its log", run.output)
    assert run.proc.poll() is None and run.status()["daemon"]["status"] == "serving"
    assert http_get(run.listen_port, "/")[0] == 200


def test_a_removed_daemon_log_comes_back(make_daemon, releases: Path) -> None:
    run: DaemonRun = make_daemon()
    logs = run.dir / "run" / "logs"
    for f in logs.iterdir():
        f.unlink()
    logs.rmdir()
    r = run.cli("logs", "daemon")  # not "has the daemon run?": it runs, its logs were removed
    assert r.returncode == 1 and "is missing (removed while the daemon ran?)" in r.stderr, r.stdout + r.stderr
    assert run.cli("swap", str(app_build(releases, "v2"))).returncode == 0
    wait_until(lambda: (logs / "daemon.log").exists() and "swap to" in (logs / "daemon.log").read_text(), 30,
               "daemon.log to be written again")


def test_a_second_sigterm_forces_the_shutdown_while_a_swap_waits_for_the_old_build_to_stop(make_daemon,
                                                                                          short_tmp: Path) -> None:
    """The first SIGTERM waits for the swap's stop of an old build that takes its time to exit
    (60 s of app.stop.timeout); the second one must not: nginx and both builds are killed and
    the daemon exits."""
    gate = short_tmp / "gate"  # never opened: the old build's SIGTERM handler waits for it
    releases = short_tmp / "releases"
    run: DaemonRun = make_daemon(build=app_build(releases, "v1", gate=gate, stop_gate=True), stop_timeout=60)
    swap = run.cli_background("swap", str(app_build(releases, "v2")))
    wait_until(lambda: run.phase() == "stop", 60, "the swap to wait for the old build's stop", run.output)
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in run.output(), 30, "the graceful shutdown to begin")
    assert run.proc.poll() is None  # still waiting, gracefully
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: run.proc.poll() is not None, 30, "the second SIGTERM to end the daemon", run.output)
    assert "second signal: forcing shutdown" in run.output()
    swap.communicate(timeout=30)
    # (what got SIGKILL is gone within moments; nothing may have been started again meanwhile)
    wait_until(lambda: run.leftovers() == [], 10, "no process left after a forced shutdown", run.output)
    assert "restarted" not in run.output().split("second signal")[-1]


def _get(port: int, path: str) -> None:
    try:
        http_get(port, path, timeout=120)
    except OSError:
        pass


def test_an_idle_client_is_dropped_at_client_timeout_and_blocks_no_one(make_daemon) -> None:
    import socket

    run: DaemonRun = make_daemon(daemon="client_timeout = 1")
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(run.socket))
    idle.settimeout(30)
    try:
        assert run.status()["daemon"]["status"] == "serving"  # others are served meanwhile
        said = b""
        while chunk := idle.recv(4096):  # then the daemon says why and hangs up on the silent one
            said += chunk
        assert b'"bad_request"' in said and b"within 1s" in said, said
    finally:
        idle.close()


def test_sigint_to_the_cli_mid_swap_leaves_the_swap_running_and_status_shows_it(make_daemon, releases: Path) -> None:
    run: DaemonRun = make_daemon()
    swap = run.cli_background("swap", str(app_build(releases, "v2", boot_ms=1500)))
    wait_until(lambda: run.phase() in ("start", "ready"), 30, "the swap to start", run.output)
    swap.send_signal(signal.SIGINT)  # Ctrl-C in the operator's terminal
    out, err = swap.communicate(timeout=30)
    assert swap.returncode != 0
    assert run.phase() is not None or run.status()["last_swap"]["outcome"] == "done"  # it went on
    wait_until(lambda: run.phase() is None, 60, "the swap to finish without its client")
    assert run.status()["last_swap"]["outcome"] == "done" and http_get(run.listen_port, "/")[1] == "hello from v2\n"


def test_cancel_before_the_switch_stops_the_standby_and_leaves_traffic_alone(make_daemon, releases: Path) -> None:
    run: DaemonRun = make_daemon()
    swap = run.cli_background("swap", str(app_build(releases, "v2", boot_ms=60_000)))
    standby = wait_until(lambda: (run.status() or {}).get("standby"), 30, "the standby to start")
    r = run.cli("cancel")
    assert r.returncode == 0, r.stdout + r.stderr
    out, err = swap.communicate(timeout=60)
    assert swap.returncode == 1 and "[cancelled]" in err and "traffic is unchanged" in err, err
    assert not running(standby["pid"])
    st = run.status()
    assert st["standby"] is None and st["last_swap"]["error"]["code"] == "cancelled"
    assert http_get(run.listen_port, "/")[1] == "hello from v1\n"


def test_sigterm_before_the_switch_cancels_the_swap_and_stops_everything(make_daemon, releases: Path) -> None:
    run: DaemonRun = make_daemon()
    swap = run.cli_background("swap", str(app_build(releases, "v2", boot_ms=60_000)))
    wait_until(lambda: (run.status() or {}).get("standby"), 30, "the standby to start")
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: run.proc.poll() is not None, 120, "the daemon to stop", run.output)
    assert run.proc.returncode == 0, run.output()
    out, err = swap.communicate(timeout=60)
    assert swap.returncode != 0 and ("[cancelled]" in err or "[shutting_down]" in err), err
    assert run.leftovers() == []
    assert "Traceback" not in run.output(), run.output()  # the attached client was told, nothing more


def test_a_cli_whose_reader_left_says_nothing_more(make_daemon) -> None:
    import subprocess
    import sys

    run: DaemonRun = make_daemon()
    r = subprocess.run(f"{sys.executable} -m supervisor status -c {run.config} | true", shell=True,
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_a_task_that_ignores_its_cancellation_is_cancelled_again_past_the_bound() -> None:
    """A shutdown cancels a task once; one that swallows it (a hung cleanup) is cancelled again
    once the bound has passed, and the shutdown goes on."""
    import asyncio

    from supervisor.daemon.process import cancelled

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # swallowed
        await asyncio.sleep(30)

    async def main() -> bool:
        task = asyncio.ensure_future(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancelled(task, 0.2), 10)
        return task.cancelled()

    assert asyncio.run(main())


def test_a_cancelled_swap_s_shielded_cleanup_runs_to_its_end() -> None:
    """The shutdown cancels a swap once, and waits: a cleanup the swap shields (stopping a paused
    swap's standby) is never cut short by a cancellation sent again each second."""
    import asyncio

    from supervisor.aio import shielded
    from supervisor.daemon.process import cancelled

    done: list[str] = []

    async def cleanup() -> None:
        await asyncio.sleep(1.5)  # longer than the one-second re-cancellation it once got
        done.append("standby stopped")

    async def swap() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await shielded(cleanup())

    async def main() -> None:
        task = asyncio.ensure_future(swap())
        await asyncio.sleep(0)
        await cancelled(task, 10)

    asyncio.run(main())
    assert done == ["standby stopped"]
