"""The runtime switch's nginx program on the nginx users really run (tests/shapes.py): workers that
are not root, an nginx restarted behind the daemon's back, error pages that redirect inside
nginx, many users behind one address, clients that hang up, and health checks through nginx."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from helpers import DaemonRun, http_get
from shapes import SHAPES, DebianNginx, app_build, os_user, start_on, worker_users

pytestmark = pytest.mark.e2e


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest, make_daemon: Callable[..., DaemonRun], short_tmp: Path,
          releases: Path) -> Iterator[Callable[..., tuple[DaemonRun, DebianNginx | None]]]:
    """Start a daemon (v1) on this test's nginx shape; the user's nginx is closed after the daemon."""
    started: list[tuple[DaemonRun, DebianNginx | None]] = []

    def start(extra: str = "", build: Path | None = None, **kw: Any) -> tuple[DaemonRun, DebianNginx | None]:
        started.append(start_on(request.param, make_daemon, short_tmp, build or app_build(releases, "v1"), extra, **kw))
        return started[-1]

    yield start
    for run, user in started:  # the daemon first, then the user's nginx it switched
        run.stop()
        if user is not None:
            user.close()


def control(run: DaemonRun, path: str) -> str:
    """One GET on the app's runtime control socket (what the daemon asks nginx)."""
    from supervisor.nginx_table import Table

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
