"""Releasing the way careful operators do (issue 11), end to end through a real nginx, the CLI
and the example Node app under load: smoke checks on the standby before any traffic moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Load, bluegreen, http_get, make_build
from supervisor.processes import sockets
from conftest import render_config

pytestmark = pytest.mark.e2e


def checks(*blocks: str) -> str:
    return "\n".join(f"[[release.checks]]\n{b}" for b in blocks)


def test_passing_smoke_checks_let_the_swap_go_on_with_one_line_each(make_daemon, releases: Path) -> None:
    run = make_daemon(extra=checks('path = "/health"\nbody = "ok"',
                                   'method = "POST"\npath = "/api"\nheaders = { "X-Smoke" = "1" }\nbody = "hello from v2"'))
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GET /health: HTTP 200" in r.stdout and "POST /api: HTTP 200" in r.stdout, r.stdout
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
    assert not load.failures, (load.failures, load.examples)
    results = run.status()["last_swap"]["details"]["check"]["checks"]
    assert [c["check"] for c in results] == ["GET /health", "POST /api"] and all(c["ok"] for c in results)


def test_a_failing_smoke_check_stops_the_standby_and_names_what_it_got(make_daemon, releases: Path) -> None:
    run = make_daemon(extra=checks('path = "/health"',
                                   'path = "/"\nbody = "hello from v3"',  # the build says v2: a wrong artefact
                                   'path = "/slow?ms=20000"\ntimeout = 0.5'))
    green = run.ports[1]
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[checks_failed]" in r.stderr and "2 of 3 smoke check(s) failed" in r.stderr, r.stderr
    assert "GET /: expected HTTP 200 containing 'hello from v3', got HTTP 200 'hello from v2'" in r.stderr
    assert "GET /slow?ms=20000: expected HTTP 200, got no answer within 0.5s" in r.stderr
    assert "ok   GET /health" in r.stderr and "FAIL GET /" in r.stderr  # one line per check
    assert "traffic unchanged" in r.stderr or "traffic is unchanged" in r.stderr
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["standby"] is None
    assert st["last_swap"]["traffic"] == "unchanged" and st["last_swap"]["error"]["phase"] == "check"
    assert not sockets.listening(green)  # the standby was stopped
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    assert not load.failures, (load.failures, load.examples)


def test_a_bad_smoke_check_is_a_config_error_naming_its_key(short_tmp: Path) -> None:
    cfg = short_tmp / "bluegreen.toml"
    cfg.write_text(render_config(short_tmp, build=short_tmp, ports=(20001, 20002), listen=20003,
                                 extra=checks('method = "FETCH"\npath = "/health"', 'path = "health"\nstatus = 2000')))
    r = bluegreen("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "release.checks[0].method: one of GET, HEAD" in r.stderr and "got 'FETCH'" in r.stderr
    assert "release.checks[1].path" in r.stderr and "release.checks[1].status" in r.stderr


def serve_once(handler) -> int:  # type: ignore[no-untyped-def]
    """A one-connection-at-a-time HTTP server on a free loopback port, in a thread."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                try:
                    handler(conn)
                except OSError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1]


def test_a_check_reads_a_bounded_answer_and_a_trickle_times_out() -> None:
    """A huge page cannot fill the daemon, and a server that trickles bytes cannot hold the
    swap past the check's own timeout."""
    import asyncio
    import time

    from supervisor.config.schema import CheckConfig
    from supervisor.processes.probes import CHECK_BODY_LIMIT, run_checks

    big = b"x" * (4 * CHECK_BODY_LIMIT) + b"END"
    huge = serve_once(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big))

    def trickle(c) -> None:  # type: ignore[no-untyped-def]
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            c.sendall(b"x")
            time.sleep(0.1)

    slow = serve_once(trickle)
    [r] = asyncio.run(run_checks(huge, [CheckConfig("GET", "/", body="END")]))
    assert not r["ok"] and r["status"] == 200 and r["missing"] == "END"  # END lies past what is read
    [r] = asyncio.run(run_checks(slow, [CheckConfig("GET", "/", timeout=0.5)]))
    assert not r["ok"] and r["got"] == "no answer within 0.5s"
