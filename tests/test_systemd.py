"""systemd (issue 13): the shipped units verify with systemd-analyze and are the ones the manual (docs/operations.md)
shows; the daemon speaks the notify protocol to a real datagram socket: READY=1 only once the
app serves, STATUS= with a swap's phase, watchdog pings, STOPPING=1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ROOT, http_get, make_build, wait_until
from supervisor.daemon.notify import Notifier

UNITS = ROOT / "supervisor" / "systemd"


@pytest.mark.parametrize("unit, instance", [("bluegreen.service", "bluegreen.service"),
                                            ("bluegreen@.service", "bluegreen@shop.service")])
def test_the_shipped_units_verify_and_are_the_ones_the_readme_shows(unit: str, instance: str,
                                                                    tmp_path: Path) -> None:
    text = (UNITS / unit).read_text()
    assert f"```ini\n{text}```" in (ROOT / "docs" / "operations.md").read_text(), f"docs/operations.md does not show {unit} as shipped"
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^KillMode=process$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+$", text, re.M)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: run scripts/test, which installs it")
    # The real ExecStart, pointed at this checkout's CLI (the unit names /opt/bluegreen).
    bin_ = Path(sys.executable).parent / "bluegreen"
    (tmp_path / instance).write_text(text.replace("/opt/bluegreen/bin/bluegreen", str(bin_)))
    r = subprocess.run([analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if instance in ln or "bluegreen" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


class NotifySocket:
    """A datagram socket in NOTIFY_SOCKET's place: collects what the daemon sends, with when."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[dict[str, str]] = []
        self.on_ready: list[int] = []  # the public port's answer at the moment READY=1 arrived
        self.pings: list[float] = []  # when each WATCHDOG=1 arrived (monotonic)
        self.port = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            if msg.get("READY") == "1":
                self.on_ready.append(http_get(self.port, "/", timeout=5)[0])
            if msg.get("WATCHDOG") == "1":
                self.pings.append(time.monotonic())
            self.messages.append(msg)

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in list(self.messages) if "STATUS" in m]

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def test_ready_status_watchdog_and_stopping_over_a_real_notify_socket(make_daemon, short_tmp: Path,
                                                                      releases: Path) -> None:
    run = make_daemon(start=False, build=make_build(releases, "v1", boot_delay_ms=1500))
    notify = NotifySocket(short_tmp / "notify.sock")
    notify.port = run.listen_port
    try:
        run.start(wait=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"})
        wait_until(lambda: any("READY" in m for m in notify.messages), 60, "READY=1", run.output)
        ready = next(m for m in notify.messages if "READY" in m)
        assert ready["MAINPID"] == str(run.proc.pid)
        assert notify.on_ready == [200]  # READY=1 only once the app answers through nginx
        assert re.fullmatch(r"serving: v1 on blue :\d+ \(pid \d+\)", ready["STATUS"]), ready
        assert not any("READY" in m for m in notify.messages[:notify.messages.index(ready)])

        r = run.cli("swap", str(make_build(releases, "v2", boot_delay_ms=1500)))
        assert r.returncode == 0, r.stderr
        wait_until(lambda: notify.statuses()[-1].startswith("serving: v2 on green"), 10, "STATUS back to serving")
        during = notify.statuses()
        for phase in ("start", "ready", "switch", "drain", "stop"):
            assert f"swap to v2: {phase}" in during, during
        pings = sum(1 for m in notify.messages if m.get("WATCHDOG") == "1")
        assert pings >= 5  # every 0.3 s (half of WATCHDOG_USEC) while the swap took over 1.5 s

        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(60) == 0
        assert any(m.get("STOPPING") == "1" for m in notify.messages)
    finally:
        notify.close()


def test_a_hung_event_loop_misses_its_watchdog_pings(make_daemon, short_tmp: Path) -> None:
    """The pings come from the event loop itself: block the loop (a fault hook only tests set) and
    they stop for that long, so systemd's watchdog would restart the daemon; then they resume."""
    block = short_tmp / "block-loop"
    run = make_daemon(start=False)
    notify = NotifySocket(short_tmp / "notify.sock")
    notify.port = run.listen_port
    try:
        run.start(wait=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000",
                                   "BLUEGREEN_FAULT_BLOCK_LOOP": str(block)})
        wait_until(lambda: any("READY" in m for m in notify.messages), 60, "READY=1", run.output)
        wait_until(lambda: len(notify.pings) >= 3, 10, "regular pings")
        block.write_text("2.5")  # the loop sleeps 2.5 s without yielding: hung
        wait_until(lambda: not block.exists(), 10, "the loop to take the fault")
        before = len(notify.pings)
        wait_until(lambda: len(notify.pings) >= before + 3, 30, "pings to resume", run.output)
        gaps = [b - a for a, b in zip(notify.pings, notify.pings[1:])]
        assert max(gaps) >= 2.0, gaps  # every 0.2 s, except while the loop was hung
    finally:
        notify.close()


def test_the_notifier_speaks_to_abstract_sockets_and_only_pings_for_its_own_pid() -> None:
    name = f"bluegreen-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == 5.0
        n.status("serving")
        n.status("serving")  # unchanged: not sent again
        n.ping()
        assert s.recv(100) == b"STATUS=serving" and s.recv(100) == b"WATCHDOG=1"
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.ready("serving")  # no socket: nothing happens, nothing fails
