"""The bench's RPC cases (scripts/bench --only-rpc, and part of a full run): calls that never stop,
on connections clients keep, through releases, beside a plain restart of the same service.

- tcp: examples/tcp-app (framed calls over plain TCP) and pooled clients (tests/clients.py
  Pooled: one connection each, reused; a connection closed before any byte of an answer is
  opened again and the call made again, once, as pools do).
- grpc: examples/grpc-app (grpcio) and grpcio clients, one HTTP/2 channel each, unary calls.
- redis: examples/redis-app (RESP) and the real redis-py, no retries (tests/clients.py
  RedisCallers): calls 5 ms apart, back to back, and a slow call (1.5 s) now and then, on one
  pool, or on a connection each. Reported beside the failed calls: the calls the drain said it
  cut (they must be the same number).

Reported: calls, failed calls, the longest call (a pool that waits out a restart fails no
call, but its callers wait), how often a pooled client had to reconnect, and how long a release
took. Both services start as slowly as the HTTP app (--boot-ms). The plain restart stops the
service (its stop signal, then SIGKILL after 2 s if its clients keep it busy) and starts the new
build on the same port, clients connected to it directly: what "stop the service for a moment"
costs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def clients_through(make: Callable[[], Any], n: int, releases: int, gap: float,
                    release: Callable[[int], float]) -> dict[str, Any]:
    """`n` client threads made by `make`, running while `releases` releases happen (each returns
    how long it took), `gap` seconds apart."""
    threads = [make() for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(gap)
    took = []
    for i in range(releases):
        took.append(release(i))
        time.sleep(gap)
    for t in threads:
        t.close()
    versions = sum((t.versions for t in threads), Counter())
    failures = sum((t.failures for t in threads), Counter())
    return {"calls": sum(versions.values()) + sum(failures.values()), "failed": sum(failures.values()),
            "failed_by_kind": dict(failures), "reconnects": sum(getattr(t, "reconnects", 0) for t in threads),
            "slowest_call_s": max(t.slowest for t in threads),
            "versions": dict(versions), "release_s_mean": sum(took) / len(took) if took else None}


class Direct:
    """The service run by hand on one port, restarted in place (the plain restart)."""

    def __init__(self, argv: list[str], build: Path, port: int, ready: Callable[[int], bool]) -> None:
        self.argv, self.port, self.ready = argv, port, ready
        self.proc = self.start(build)

    def start(self, build: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv, cwd=build, env={**os.environ, "PORT": str(self.port)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.ready(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        return proc

    def restart(self, build: Path) -> float:
        t0 = time.monotonic()
        self.stop()
        self.proc = self.start(build)
        return time.monotonic() - t0

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def grpc_serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1
    except grpc.RpcError:
        return False


SERVICES = {
    "tcp": {"builds": EXAMPLES / "tcp-app", "argv": ["python3", "server.py"], "ready": listening,
            "config": {"app": 'protocol = "tcp"', "ready": 'send = "\\u0000\\u0000\\u0000\\u0004PING"\n'
                                                           'expect = "PONG"\ntimeout = 30'}},
    "grpc": {"builds": EXAMPLES / "grpc-app", "argv": [sys.executable, "server.py"], "ready": grpc_serving,
             "config": {"app": 'protocol = "grpc"', "ready": 'grpc_service = ""\ntimeout = 30'}},
    "redis": {"builds": EXAMPLES / "redis-app", "argv": ["python3", "../server.py"], "ready": listening,
              "config": {"app": 'protocol = "tcp"', "ready": 'send = "PING\\r\\n"\nexpect = "+PONG"\ntimeout = 30'}},
}


def redis_through(port: int, releases: int, gap: float, layout: str,
                  release: Callable[[int], tuple[float, dict[str, Any] | None]]) -> dict[str, Any]:
    """redis-py callers (`layout`: "shared" or "per-caller") while `releases` releases happen;
    each release returns how long it took and its drain's report (None: a plain restart)."""
    from clients import RedisCallers

    took, drains = [], []
    with RedisCallers(port, layout=layout) as callers:
        time.sleep(gap)
        for i in range(releases):
            seconds, drain = release(i)
            took.append(seconds)
            if drain is not None:
                drains.append(drain)
            time.sleep(gap)
    failed = {kind: callers.failed(kind) for kind in callers.KINDS}
    return {"calls": dict(callers.calls), "failed": failed, "failed_total": sum(failed.values()),
            "reported_cut": sum(d.get("calls_cut", 0) for d in drains) if drains else None,
            "reported_unknown": sum(d.get("calls_unknown", 0) + d.get("closed_unconfirmed", 0) for d in drains)
            if drains else None,
            "slowest_call_s": callers.slowest, "release_s_mean": sum(took) / len(took) if took else None}


def client_maker(service: str, port: int) -> Callable[[], Any]:
    from clients import Calls, Pooled

    return (lambda: Pooled(port)) if service == "tcp" else (lambda: Calls(port))
