"""The runtime switch's split and counters (issue 12's foundation), against the real nginx a
daemon runs: a share of users goes to a candidate port, each user stays on one side, a user
met for the first time gets the rollout cookie, and nginx counts requests, 5xx answers,
upstream errors and latency per port. The rollout that drives this comes next."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from helpers import http_get, kill_tree, make_build, unchunk, wait_until
from supervisor.config import schema as config
from supervisor.processes import sockets
from supervisor.proxy.managed import ManagedNginx
from supervisor.proxy.runtime import RuntimeSwitch
from supervisor.proxy.counters import bucket_of, bucket_upper_ms

pytestmark = pytest.mark.e2e


def get(port: int, cookie: str | None = None) -> tuple[str, str]:
    """One GET; the body and the Set-Cookie header (empty if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        extra = f"Cookie: {cookie}\r\n" if cookie else ""
        s.sendall(f"GET / HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    set_cookie = next((ln.split(b":", 1)[1].strip().decode() for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"set-cookie:")), "")
    if b"transfer-encoding: chunked" in head.lower():
        body = unchunk(body)
    return body.decode(errors="replace"), set_cookie


@pytest.fixture
def split_nginx(make_daemon, releases: Path):
    """A daemon serving v1 on blue, its nginx's runtime switch, and v2 started by hand on green."""
    run = make_daemon()
    blue, green = run.ports
    v2 = subprocess.Popen(["node", "server.js"], cwd=make_build(releases, "v2"), env={"PORT": str(green),
                          "PATH": "/usr/bin:/bin:/usr/local/bin"}, start_new_session=True)
    try:
        wait_until(lambda: sockets.listening(green), 30, "v2 to listen")
        cfg = config.load(run.config)
        # The test drives nginx's table itself: the daemon, which would put back its own routing
        # within a second (reconcile), is held still meanwhile (nginx and v1 serve on).
        assert run.proc is not None
        run.proc.send_signal(signal.SIGSTOP)
        try:
            yield run, RuntimeSwitch.managed(cfg, ManagedNginx(cfg)), blue, green
        finally:
            run.proc.send_signal(signal.SIGCONT)
    finally:
        kill_tree([v2.pid])


def test_a_split_sends_a_stable_share_of_users_to_the_candidate(split_nginx) -> None:
    run, switch, blue, green = split_nginx
    asyncio.run(switch.split(green, 30, gen=1))
    seen = {f"bluegreen_id=user{i}": get(run.listen_port, f"bluegreen_id=user{i}")[0] for i in range(200)}
    on_new = [c for c, b in seen.items() if b == "hello from v2\n"]
    # exactly the users whose bucket (nginx's crc32 of the id, modulo 100) is below the share
    assert on_new == [f"bluegreen_id=user{i}" for i in range(200) if zlib.crc32(f"user{i}".encode()) % 100 < 30]
    for cookie in list(seen)[:40]:  # each user stays where it was
        assert get(run.listen_port, cookie)[0] == seen[cookie]
    asyncio.run(switch.split(green, 60, gen=2))  # a raised share only moves more users over
    assert all(get(run.listen_port, c)[0] == "hello from v2\n" for c in on_new)
    asyncio.run(switch.split(green, 0, gen=3))
    assert {get(run.listen_port, c)[0] for c in list(seen)[:50]} == {"hello from v1\n"}


def test_a_user_met_for_the_first_time_gets_the_cookie_that_keeps_it_on_its_side(split_nginx) -> None:
    run, switch, blue, green = split_nginx
    asyncio.run(switch.split(green, 50, gen=1))
    body, set_cookie = get(run.listen_port)
    assert set_cookie.startswith("bluegreen_id=") and "Path=/" in set_cookie and "HttpOnly" in set_cookie
    cookie = set_cookie.split(";")[0]
    for _ in range(10):
        again, more = get(run.listen_port, cookie)
        assert again == body and more == ""  # same side, and no new cookie once it has one
    # Without the cookie, each request is a new user (one address may be many users: NAT, a load
    # balancer): a fresh random id each time, never one derived from the address.
    ids = {get(run.listen_port)[1].split(";")[0] for _ in range(20)}
    assert len(ids) == 20 and cookie not in ids


def test_a_route_ends_the_split(split_nginx) -> None:
    run, switch, blue, green = split_nginx
    asyncio.run(switch.split(green, 100, gen=1))
    assert get(run.listen_port, "bluegreen_id=a")[0] == "hello from v2\n"
    asyncio.run(switch.route(blue))  # what a revert, or a restarted daemon, does
    assert {get(run.listen_port, f"bluegreen_id={i}")[0] for i in range(20)} == {"hello from v1\n"}
    assert get(run.listen_port)[1] == ""  # no split: no cookie


def test_nginx_counts_requests_errors_and_latency_per_port_for_a_watch_generation(split_nginx) -> None:
    run, switch, blue, green = split_nginx
    asyncio.run(switch.split(green, 100, gen=7))
    for i in range(30):
        http_get(run.listen_port, "/")
    took: list[float] = []

    def timed() -> None:
        t0 = time.monotonic()
        http_get(run.listen_port, "/slow?ms=300")
        took.append((time.monotonic() - t0) * 1000)

    slow = [threading.Thread(target=timed) for _ in range(3)]
    for t in slow:
        t.start()
    for t in slow:
        t.join()
    stats = asyncio.run(switch.stats(7))
    new = stats[green]
    assert new.requests == 33 and new.failed == 0 and blue not in stats
    # the slow requests' bucket: between 300 ms and the upper edge of the bucket of the slowest
    # answer the clients measured (nginx's own time is never longer)
    assert 300 <= new.percentile_ms(99) <= bucket_upper_ms(bucket_of(max(took) / 1000))  # type: ignore[operator]
    assert new.percentile_ms(50) < 100  # type: ignore[operator]
    assert asyncio.run(switch.stats(6)) == {}  # another generation counted nothing
    kill_tree([p for p in sockets.listening_pids(green)])  # the candidate dies: nginx gets no answer
    for _ in range(5):
        http_get(run.listen_port, "/")
    dead = asyncio.run(switch.stats(7))[green]
    assert dead.upstream_errors == 5 and dead.http_5xx == 0 and dead.requests == 38
    asyncio.run(switch.end_split())
    assert asyncio.run(switch.stats(7)) == {}
    assert get(run.listen_port, "bluegreen_id=x")[0] == "hello from v1\n"
