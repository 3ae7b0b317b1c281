"""The runtime switch's nginx program on the nginx users really run (tests/shapes.py): workers that
are not root, an nginx restarted behind the daemon's back, error pages that redirect inside
nginx, many users behind one address, clients that hang up, and health checks through nginx."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from helpers import DaemonRun, http_get, wait_until
from shapes import app_build, os_user, worker_users

pytestmark = pytest.mark.e2e


def control(run: DaemonRun, path: str) -> str:
    """One GET on the app's runtime control socket (what the daemon asks nginx)."""
    from supervisor.proxy.table import Table

    st = run.status()
    assert st is not None
    sock = (run.dir / "run" / "nginx" / "control.sock") if st["nginx"]["mode"] == "managed" else \
        (run.dir / "run" / "switch" / "control.sock")
    status, body = asyncio.run(Table(sock).call("GET", path))
    assert status == 200, (status, body)
    return body


def inflight(run: DaemonRun, port: int) -> int:
    return sum(max(0, int(line.split()[1])) for line in control(run, f"inflight?port={port}").splitlines())


def test_workers_run_unprivileged_on_both_shapes(shape) -> None:
    run, user = shape()
    st = run.status()
    assert st["nginx"]["switch"] == "runtime", st["nginx"]
    assert worker_users(st["nginx"]["master_pid"]) == {"www-data"}
    assert os_user() == "root" or pytest.fail("these shapes need a root master, as Debian runs it")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")


def test_an_nginx_stopped_and_started_by_hand_routes_to_the_active_build_at_once(shape, releases: Path) -> None:
    """`systemctl restart nginx` (stop, then start) empties nginx's table: the first requests of
    the new nginx must already go to what serves, read from the route file by www-data workers."""
    run, user = shape()
    assert run.cli("swap", str(app_build(releases, "v2"))).returncode == 0
    if user is None:
        pytest.skip("the managed nginx is restarted by the daemon itself: test_supervision covers it")
    user.stop()
    user.start()
    # The very first answers of the new nginx, before the daemon could have noticed anything.
    answers = [http_get(run.listen_port, "/") for _ in range(20)]
    assert answers == [(200, "hello from v2\n")] * 20, answers[:3]
    log = (user.prefix / "error.log").read_text()
    assert "cannot read the route file" not in log


def test_error_pages_answered_by_nginx_never_hold_a_request_in_flight(shape, releases: Path) -> None:
    """error_page with proxy_intercept_errors (and nginx's own 50x page) redirect inside nginx,
    which clears ngx.ctx: every such request must still be counted out, or the next drain
    waits for requests that ended long ago."""
    run, user = shape(drain_timeout=20)
    port = run.ports[0]
    for _ in range(30):
        status, body = http_get(run.listen_port, "/missing")
        assert status == 404
    for _ in range(5):
        assert http_get(run.listen_port, "/boom")[0] == 500
    if user is not None:  # the Debian site answers its error pages itself
        assert http_get(run.listen_port, "/missing")[1] == "not found (nginx's page)\n"
    assert inflight(run, port) == 0
    r = run.cli("swap", str(app_build(releases, "v2")))
    assert r.returncode == 0, r.stderr
    drain = run.status()["last_swap"]["details"]["drain"]
    assert not drain["timed_out"], drain


def get_with_cookie(port: int, path: str = "/", cookie: str | None = None, timeout: float = 10) -> tuple[int, str, str]:
    """(status, body, the Set-Cookie nginx added) for one request on a fresh connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        r = conn.getresponse()
        return r.status, r.read().decode(), r.getheader("Set-Cookie") or ""
    finally:
        conn.close()


def bucket_user(share: int, inside: bool, prefix: str = "u") -> str:
    """A rollout cookie value whose bucket is inside (or outside) the first `share` % of users."""
    import zlib

    return next(f"{prefix}{i}" for i in range(100_000) if (zlib.crc32(f"{prefix}{i}".encode()) % 100 < share) == inside)


def rolling_out(run: DaemonRun, build: Path, share: int, *args: str) -> Any:
    """A rollout whose first step (`share` %) is on; the CLI left running."""
    swap = run.cli_background("swap", str(build), "--rollout", f"{share},100", *args)
    wait_until(lambda: (st := run.status()) and st["rollout"] and st["rollout"]["share"] == share, 60,
               f"the {share} % step", run.output)
    return swap


def test_many_users_behind_one_address_are_spread_over_the_split(shape, releases: Path) -> None:
    """curl without a cookie jar, NAT, a load balancer: one address, many users. Each new user gets
    a random id, so a 20 % step sends about 20 % of them to the new build, and each keeps its side."""
    run, user = shape("[rollout]\nmin_requests = 100000")
    swap = rolling_out(run, app_build(releases, "v2"), 20, "--step", "600")
    seen = [get_with_cookie(run.listen_port) for _ in range(300)]
    on_new = [cookie for status, body, cookie in seen if body == "hello from v2\n"]
    assert all(status == 200 for status, _, _ in seen)
    assert 20 <= len(on_new) <= 110, len(on_new)  # binomial(300, 0.2): 60 +- 7
    assert len({c.split(";")[0] for _, _, c in seen}) == 300  # 300 users, 300 ids
    for status, body, cookie in seen[:30]:  # each user keeps its side with its cookie
        assert get_with_cookie(run.listen_port, cookie=cookie.split(";")[0])[1] == body
    assert run.cli("abort").returncode == 0
    swap.communicate(timeout=120)


def test_clients_that_hang_up_never_fail_a_healthy_build(shape, releases: Path) -> None:
    """Requests abandoned by their clients (nginx's 499) say nothing about the build: 40 of them on a
    slow page must not revert a healthy rollout."""
    import socket
    import threading

    run, user = shape("[rollout]\nmin_requests = 20")
    inside, outside = bucket_user(50, True), bucket_user(50, False)
    swap = rolling_out(run, app_build(releases, "v2"), 50, "--step", "4")
    for _ in range(40):  # a slow page, given up after 0.3 s
        s = socket.create_connection(("127.0.0.1", run.listen_port))
        s.sendall(f"GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\nCookie: bluegreen_id={inside}\r\n\r\n".encode())
        s.settimeout(0.3)
        try:
            s.recv(100)
        except socket.timeout:
            pass
        s.close()
    stop = threading.Event()

    def users() -> None:  # ordinary users on both sides, so the step has its evidence
        while not stop.is_set():
            for who in (inside, outside):
                get_with_cookie(run.listen_port, cookie=f"bluegreen_id={who}")

    t = threading.Thread(target=users)
    t.start()
    try:
        out, err = swap.communicate(timeout=180)
    finally:
        stop.set()
        t.join(30)
    assert swap.returncode == 0, out + err
    assert get_with_cookie(run.listen_port)[1] == "hello from v2\n"


def test_a_health_check_flood_through_nginx_never_dilutes_a_failing_build(shape, releases: Path) -> None:
    """A load balancer's health checks (the readiness path, or rollout.ignore_paths) are not users:
    a build failing 30 % of its real requests is reverted however many /health requests pass."""
    import threading

    run, user = shape('[rollout]\nmin_requests = 20\nignore_paths = ["/status/"]')
    inside = bucket_user(50, True)
    stop = threading.Event()

    def flood(path: str) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", run.listen_port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", path, headers={"Cookie": f"bluegreen_id={inside}"})
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", run.listen_port, timeout=10)
        conn.close()

    floods = [threading.Thread(target=flood, args=(p,)) for p in ("/health", "/health", "/health", "/status/x")]
    for t in floods:
        t.start()
    try:
        swap = rolling_out(run, app_build(releases, "v2", fail=30), 50, "--step", "600")
        for i in range(200):  # the users' own requests, a few of them, slowly
            if swap.poll() is not None:
                break
            get_with_cookie(run.listen_port, cookie=f"bluegreen_id={bucket_user(50, True, f'r{i}-')}")
        out, err = swap.communicate(timeout=120)
    finally:
        stop.set()
        for t in floods:
            t.join(30)
    assert swap.returncode == 1 and "[rollout_aborted]" in err, out + err
    failed = re.search(r"new: (\d+) of (\d+) requests failed", err)
    # judged on users' requests only: about 30 % of them fail (counted with the floods, it was ~1 %)
    assert failed and int(failed.group(1)) / int(failed.group(2)) >= 0.2, err
