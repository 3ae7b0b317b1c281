"""App processes and readiness, against real processes."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from helpers import free_ports, wait_until
from supervisor.processes import sockets, probes, slots
from supervisor.config.schema import ReadyConfig
from supervisor.errors import AppError

PY = sys.executable


def spawn(tmp: Path, code: str, port: int = 0) -> slots.AppProcess:
    script = tmp / "app.py"
    script.write_text(textwrap.dedent(code))
    return asyncio.get_event_loop().run_until_complete(
        slots.spawn([PY, str(script)], tmp, {"PORT": str(port)}, slot="blue", port=port, build=tmp,
                    log_path=tmp / "logs" / "blue.log"))


def http_app(status: int) -> str:
    """A tiny HTTP server on $PORT that answers every GET with `status`."""
    return f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response({status}); self.end_headers()
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
    """


@pytest.fixture
def loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


def test_graceful_app_exits_on_sigterm(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    app = spawn(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        print("up", flush=True)
        while True: time.sleep(1)
    """)
    assert __import__("os").getpgid(app.pid) == app.pid  # its own process group
    wait_until(lambda: "up" in app.log_path.read_text(), 20, "the app to install its SIGTERM handler")
    result = loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 10))
    assert result["how"] == "exited with code 0 after SIGTERM" and not result["killed"]
    assert not app.alive()


def test_app_ignoring_sigterm_is_killed_with_its_whole_tree(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    pidfile = tmp_path / "child.pid"
    app = spawn(tmp_path, f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        while True: time.sleep(1)
    """)
    from helpers import wait_until
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20, "the child to start")
    child = psutil.Process(int(pidfile.read_text()))
    result = loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 0.5))
    assert result["killed"] and "did not exit within 0.5s of SIGTERM: killed with SIGKILL" in result["how"]
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_describe_exit() -> None:
    assert slots.describe_exit(3) == "exited with code 3"
    assert slots.describe_exit(143) == "exited with code 143 (128+SIGTERM)"
    assert slots.describe_exit(-9) == "killed by SIGKILL (perhaps out of memory?)"
    assert slots.describe_exit(-9, we_killed=True) == "killed by SIGKILL"
    assert slots.describe_exit(-15) == "killed by SIGTERM"


def test_ready_fails_at_once_when_the_app_exits_and_shows_its_log(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    app = spawn(tmp_path, """
        import sys
        print("FATAL: cannot connect to database", flush=True)
        sys.exit(3)
    """)
    ready = ReadyConfig(url=None, timeout=120, interval=0.05)
    with pytest.raises(AppError) as e:
        loop.run_until_complete(probes.wait_ready(app, ready, None))
    assert e.value.code == "app_exited"
    assert "exited with code 3 before it was ready" in e.value.message
    assert "FATAL: cannot connect to database" in e.value.message


def test_ready_times_out_when_health_never_passes(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    (port,) = free_ports(1)
    app = spawn(tmp_path, http_app(503), port)
    ready = ReadyConfig(url=f"http://127.0.0.1:{port}/health", timeout=1.0, interval=0.05)
    try:
        with pytest.raises(AppError) as e:
            loop.run_until_complete(probes.wait_ready(app, ready, ready.url))
        assert e.value.code == "not_ready"
        assert "HTTP 503" in e.value.message
    finally:
        loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))


def test_ready_passes_on_2xx(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    (port,) = free_ports(1)
    app = spawn(tmp_path, http_app(204), port)
    try:
        r = loop.run_until_complete(probes.wait_ready(app, ReadyConfig(f"http://127.0.0.1:{port}/", 30, 0.05),
                                                      f"http://127.0.0.1:{port}/"))
        assert r.checks >= 1
        tcp = loop.run_until_complete(probes.wait_ready(app, ReadyConfig(None, 30, 0.05), None))
        assert tcp.target == f"tcp://127.0.0.1:{port}"
    finally:
        loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))


def sequence_app(answers: list[tuple[int, str]]) -> str:
    """An HTTP app that gives `answers` in order (then repeats the last), like an app still warming up."""
    return f"""
        import http.server, os
        answers = {answers!r}
        n = 0
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                global n
                status, body = answers[min(n, len(answers) - 1)]
                n += 1
                self.send_response(status); self.end_headers(); self.wfile.write(body.encode())
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
    """


def ready_with(tmp: Path, loop: asyncio.AbstractEventLoop, answers: list[tuple[int, str]], **kw) -> probes.ReadyResult:
    (port,) = free_ports(1)
    app = spawn(tmp, sequence_app(answers), port)
    url = f"http://127.0.0.1:{port}/health"
    try:
        wait_until(lambda: sockets.listening(port), 30, "the app to listen")  # so every check gets an answer
        return loop.run_until_complete(probes.wait_ready(app, ReadyConfig(url, 30, 0.02, **kw), url))
    finally:
        loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))


def test_body_check_waits_for_the_expected_text(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    answers = [(200, "STARTING")] * 3 + [(200, "status: UP")]
    assert ready_with(tmp_path, loop, answers).checks == 1  # any 2xx would do
    assert ready_with(tmp_path, loop, answers, body="UP").checks == 4


def test_passes_needs_consecutive_successes(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    flaky = [(200, "ok"), (503, "gc pause"), (200, "ok"), (200, "ok"), (200, "ok")]
    assert ready_with(tmp_path, loop, flaky, passes=3).checks == 5


def test_log_pattern_counts_only_lines_of_this_start(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    import re

    (port,) = free_ports(1)
    log = tmp_path / "logs" / "blue.log"
    log.parent.mkdir()
    log.write_text("Server startup in 999 ms   <- a previous start's line\n")
    pattern = re.compile("Server startup in")
    # This start answers on its port but never logs the line: not ready, whatever the old log says.
    silent = spawn(tmp_path, http_app(200), port)
    try:
        with pytest.raises(AppError, match="no log line matching 'Server startup in' yet"):
            loop.run_until_complete(probes.wait_ready(silent, ReadyConfig(None, 1.0, 0.02, log=pattern), None))
    finally:
        loop.run_until_complete(slots.stop(silent, slots.signal.SIGTERM, 5))
    # This start prints the line: ready, and the matched line is reported.
    booting = spawn(tmp_path, http_app(200).replace("http.server.HTTPServer(",
                                                      "print('INFO Server startup in [1234] milliseconds', flush=True)\n        http.server.HTTPServer("), port)
    try:
        r = loop.run_until_complete(probes.wait_ready(booting, ReadyConfig(None, 30, 0.02, log=pattern), None))
        assert r.log_line == "INFO Server startup in [1234] milliseconds"
    finally:
        loop.run_until_complete(slots.stop(booting, slots.signal.SIGTERM, 5))


class Vanishing:
    """A psutil.Process whose process exits between two calls (is_running, then status)."""

    pid = 999999

    def is_running(self) -> bool:
        return True

    def status(self) -> str:
        raise psutil.NoSuchProcess(self.pid)


def test_a_child_exiting_between_two_checks_counts_as_gone(loop: asyncio.AbstractEventLoop) -> None:
    import time

    assert loop.run_until_complete(slots._gone([Vanishing()], time.monotonic() + 1)) == []


def test_stop_clears_what_a_start_script_left_in_the_background(tmp_path: Path,
                                                                loop: asyncio.AbstractEventLoop) -> None:
    pidfile = tmp_path / "server.pid"
    script = tmp_path / "start.sh"
    script.write_text(f"sleep 600 &\necho $! > {pidfile}\n")  # exits 0 at once, its server keeps running
    app = loop.run_until_complete(slots.spawn(
        ["sh", str(script)], tmp_path, {"BLUEGREEN_STATE_DIR": str(tmp_path), "BLUEGREEN_SLOT": "blue"},
        slot="blue", port=0, build=tmp_path, log_path=tmp_path / "logs" / "blue.log"))
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the background server")
    server = psutil.Process(int(pidfile.read_text()))
    loop.run_until_complete(app.wait())
    result = loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))
    assert "stopped 1 process(es) it left running" in result["how"]
    psutil.wait_procs([server], timeout=10)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_stopping_an_app_whose_leader_is_long_dead_never_signals_whoever_got_its_pid(tmp_path: Path) -> None:
    """Minutes after the app died its pid (its process group's id) may belong to someone else: only
    processes that carry our markers are stopped then, never a whole group by number."""
    import subprocess

    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a group whose id is "our" old pid
    try:
        gone = slots.AppProcess("blue", 1, tmp_path, stranger.pid, create_time=1.0, log_path=tmp_path / "blue.log",
                                state_dir=tmp_path)  # same pid, another start time: not the process we ran
        assert not gone.alive()
        result = asyncio.run(slots.stop(gone, signal.SIGTERM, 1.0))
        assert result["how"].startswith("already gone")
        assert stranger.poll() is None, "the process that took the pid was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_an_app_listening_on_ipv6_loopback_only_is_named(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    """nginx and the check connect to 127.0.0.1: an app bound to ::1 only is never ready, and the
    error says where it listens and what to change."""
    (port,) = free_ports(1)
    app = spawn(tmp_path, """
        import os, socket, time
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", int(os.environ["PORT"])))
        s.listen()
        while True: time.sleep(1)
    """, port)
    try:
        wait_until(lambda: sockets.listening(port), 20, "the app to listen")
        with pytest.raises(AppError) as e:
            loop.run_until_complete(probes.wait_ready(app, ReadyConfig(None, 1.0, 0.05), None))
        assert e.value.code == "not_ready"
        assert f"listens on port {port} at ::1 only" in e.value.message and "127.0.0.1" in e.value.message
    finally:
        loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))


def test_no_readiness_attempt_runs_past_app_ready_timeout(tmp_path: Path, loop: asyncio.AbstractEventLoop,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each attempt gets at most what is left of app.ready.timeout, never the 2 s an attempt may
    take otherwise."""
    from supervisor.processes import grpc_health

    (port,) = free_ports(1)
    app = spawn(tmp_path, http_app(204), port)
    given: list[float] = []

    async def never_serving(port: int, service: str = "", timeout: float = 2.0) -> str:
        given.append(timeout)
        return "NOT_SERVING"

    monkeypatch.setattr(grpc_health, "check", never_serving)
    try:
        with pytest.raises(AppError):
            loop.run_until_complete(probes.wait_ready(app, ReadyConfig(None, 0.5, 0.05, grpc_service=""), None))
        assert given and max(given) <= 0.5, given
    finally:
        loop.run_until_complete(slots.stop(app, slots.signal.SIGTERM, 5))


def test_the_grpc_health_client_reads_padded_frames_and_a_graceful_goaway(loop: asyncio.AbstractEventLoop) -> None:
    """A server that says GOAWAY with NO_ERROR (it is going down, stream 1 still answered) and pads
    its DATA frames is SERVING; a GOAWAY that leaves stream 1 out is a refusal."""
    import struct

    from supervisor.processes import grpc_health as g

    def answer(goaway_last: int) -> bytes:
        message = b"\x00" + struct.pack("!I", 2) + b"\x08\x01"  # HealthCheckResponse{status: SERVING}
        padded = bytes([3]) + message + b"\x00" * 3
        return (g.frame(g.SETTINGS, 0, 0) + g.frame(g.GOAWAY, 0, 0, struct.pack("!II", goaway_last, 0))
                + g.frame(g.HEADERS, g.END_HEADERS, 1, g.literal(":status", "200"))
                + g.frame(g.DATA, g.PADDED, 1, padded)
                + g.frame(g.HEADERS, g.END_HEADERS | g.END_STREAM, 1, g.literal("grpc-status", "0")))

    async def serve(goaway_last: int) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1000)  # the preface and the call
            writer.write(answer(goaway_last))
            await writer.drain()
            await reader.read(1000)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            return await g.check(server.sockets[0].getsockname()[1])
        finally:
            server.close()

    assert loop.run_until_complete(serve(1)) == "SERVING"
    assert loop.run_until_complete(serve(0)).startswith("the server refused the call (GOAWAY")


def test_a_process_whose_exit_has_begun_is_told_apart_before_it_is_reaped() -> None:
    """A SIGKILLed child not reaped yet is still "running" to psutil; its kernel flags say its
    exit has begun (the crash count's baseline must not be taken then)."""
    import os
    import signal
    import subprocess

    from supervisor.processes import procs

    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not procs.exiting(p.pid) and not procs.exiting(os.getpid())
        os.kill(p.pid, signal.SIGKILL)
        wait_until(lambda: procs.exiting(p.pid), 10, "the kill to begin its exit")
    finally:
        p.kill()
        p.wait()
    assert procs.exiting(p.pid)  # reaped: gone
