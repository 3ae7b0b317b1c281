"""The runtime switch (nginx.switch = "runtime"; the drain of a request in flight is in
test_e2e, in both modes): traffic moves through a routing table inside
nginx, with no reload: keep-alive clients see no failure and no answer from the old build once
the new one has answered. Real nginx with Debian's lua module, real apps, real sockets."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import DaemonRun, Load, free_ports, http_get, make_build, managed_nginx, wait_until
pytestmark = pytest.mark.e2e


def runtime(make_daemon: Any, **kw: Any) -> DaemonRun:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, "runtime"), **kw)
    assert run.status()["nginx"]["switch"] == "runtime"
    return run


def serves(run: DaemonRun, version: str) -> bool:
    try:
        return http_get(run.listen_port, "/") == (200, f"hello from {version}\n")
    except OSError:  # e.g. a connection the killed master's workers took as they quit
        return False


class KeepAlive:
    """Clients that each keep one connection open and send a request every few milliseconds;
    every answer is recorded with the times it was asked for and arrived, every failure counted."""

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, str]] = []  # (sent, arrived, version)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "KeepAlive":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.wait(0.003):
            try:
                sent = time.monotonic()
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode()
                with self.lock:
                    if r.status == 200:
                        self.answers.append((sent, time.monotonic(), body.split()[-1]))
                    else:
                        self.failures.append(f"http_{r.status}")
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def torn(self, old: str, new: str) -> int:
        """Answers from `old` to requests sent after the first answer from `new` arrived, on any
        client. (A request already on its way to the old build may still answer after that: it
        was routed before the switch, and the page that sent it saw only the old build.)"""
        with self.lock:
            answers = list(self.answers)
        first_new = min((arrived for _, arrived, v in answers if v == new), default=None)
        return 0 if first_new is None else sum(1 for sent, _, v in answers if v == old and sent > first_new)


def test_keep_alive_clients_see_no_failure_and_no_torn_answer_across_swaps(make_daemon, releases: Path) -> None:
    run = runtime(make_daemon)
    builds = [f"v{i}" for i in range(1, 22)]  # 20 swaps
    with KeepAlive(run.listen_port) as clients, Load(run.listen_port, clients=3, slow_every=10, slow_ms=500) as fresh:
        wait_until(lambda: len(clients.answers) >= 50, 30, "keep-alive answers")
        for old, new in zip(builds, builds[1:]):
            r = run.cli("swap", str(make_build(releases, new)))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "no reload" in r.stdout
            count = len(clients.answers)
            wait_until(lambda: len(clients.answers) >= count + 20, 30, "answers from the new build")
            assert clients.torn(old, new) == 0, f"answers from {old} after {new} answered"
    assert not clients.failures, clients.failures[:5]
    assert not fresh.failures, (fresh.failures, fresh.examples)
    assert serves(run, "v21")
    print(f"\nruntime: {len(clients.answers)} keep-alive and {fresh.total} fresh requests, 20 swaps, 0 failed, 0 torn")


def control(run: DaemonRun, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(run.dir / "run" / "nginx" / "control.sock"))
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def put(body: bytes) -> bytes:
    return b"PUT /.bluegreen/route HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def test_the_control_endpoint_is_private_and_takes_only_a_port(make_daemon) -> None:
    run = runtime(make_daemon)
    assert http_get(run.listen_port, "/.bluegreen/route")[0] == 404  # never on the public listener
    sock = run.dir / "run" / "nginx" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    for garbage in (put(b"abc"), put(b"99999"), put(b"-1"), put(b"8001; drop"), put(b"1" * 5000),
                    b"\x00\xff garbage\r\n\r\n"):
        assert b" 200 " not in control(run, garbage).split(b"\r\n", 1)[0]
    # concurrent writes of the same valid port all read it back; the route never changed meanwhile
    port = str(run.ports[0]).encode()
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(control(run, put(port)))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(r.endswith(port + b"\n") for r in results)
    assert serves(run, "v1")


def test_a_restarted_nginx_routes_to_the_active_slot(make_daemon, releases: Path) -> None:
    run = runtime(make_daemon)
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    master = run.status()["nginx"]["master_pid"]
    os.kill(master, signal.SIGKILL)
    st = wait_until(lambda: (lambda s: s if s and s["nginx"].get("running") and s["nginx"]["master_pid"] != master
                             else None)(run.status()), 30, "nginx to be restarted", run.output)
    run.remember(st)
    wait_until(lambda: serves(run, "v2"), 30, "the restarted nginx to route to green (v2)", run.output)
