"""External mode: the user runs nginx; bluegreen only rewrites the included upstream file."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (LUA_MODULES, DaemonRun, KeepAlive, free_ports, http_get, make_build, settled_workers,
                     user_nginx_conf, wait_until)
from shapes import UserNginx
from supervisor.proxy.render import render_upstream

pytestmark = pytest.mark.e2e

@pytest.fixture
def system_nginx(short_tmp: Path, request: pytest.FixtureRequest):
    """An nginx started by 'the user' (this test), with its own prefix, before any daemon; with
    the lua module loaded when the test is marked `lua`."""
    modules = LUA_MODULES if request.node.get_closest_marker("lua") else ""
    listen, blue, green = free_ports(3)
    user = UserNginx(short_tmp / "nginx", listen)
    (user.prefix / "conf.d").mkdir(parents=True)
    conf = user.prefix / "nginx.conf"
    conf.write_text(user_nginx_conf(user.prefix, {listen: "myapp"}, modules))
    # What a user has before adopting bluegreen: an upstream pointing at the blue port.
    (user.prefix / "conf.d" / "upstream.conf").write_text(render_upstream("myapp", blue))
    user.start()
    yield {"base": user.base, "prefix": user.prefix, "conf": conf, "listen": listen, "ports": (blue, green),
           "master": user.master, "user": user}
    user.close()


def external_daemon(make_daemon, system_nginx, releases: Path, reload: list[str] | None = None,
                    extra: str = "", wait: bool = True) -> DaemonRun:
    n = system_nginx
    user: UserNginx = n["user"]
    run = make_daemon(start=False, ports=n["ports"], listen=n["listen"], build=make_build(releases, "v1"),
                      nginx="\n".join(user.external(user.prefix / "conf.d" / "upstream.conf", "myapp", reload=reload)
                                      + [extra]))
    return run.start(wait)


def test_external_mode_swaps_through_the_users_nginx(make_daemon, system_nginx, releases: Path) -> None:
    run = external_daemon(make_daemon, system_nginx, releases)
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    # after the first start too: no staged copy of your previous file left beside it
    assert sorted(os.listdir(system_nginx["prefix"] / "conf.d")) == [".upstream.conf.owner", "upstream.conf"]
    v2 = make_build(releases, "v2")
    r = run.cli("swap", str(v2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
    upstream = (system_nginx["prefix"] / "conf.d" / "upstream.conf").read_text()
    assert upstream == render_upstream("myapp", run.ports[1])
    st = run.status()
    assert st["nginx"]["mode"] == "external" and st["nginx"]["master_pid"] == system_nginx["master"].pid
    # Only our file changed: no stray temp file next to it for `include *.conf` to pick up (the
    # owner lock is a dot-file nginx never reads).
    assert sorted(os.listdir(system_nginx["prefix"] / "conf.d")) == [".upstream.conf.owner", "upstream.conf"]


def test_failed_nginx_test_restores_the_upstream_byte_for_byte(make_daemon, system_nginx, releases: Path) -> None:
    run = external_daemon(make_daemon, system_nginx, releases)
    upstream = system_nginx["prefix"] / "conf.d" / "upstream.conf"
    before = upstream.read_bytes()
    # The user's main config is broken by someone else meanwhile: nginx -t must catch it.
    conf: Path = system_nginx["conf"]
    good = conf.read_text()
    conf.write_text(good.replace("worker_connections 256;", "worker_connections 256; bogus_directive on;"))
    v2 = make_build(releases, "v2")
    r = run.cli("swap", str(v2))
    assert r.returncode == 1
    assert "[nginx_test_failed]" in r.stderr
    assert 'unknown directive "bogus_directive"' in r.stderr  # nginx's own words
    assert upstream.read_bytes() == before
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["standby"] is None
    # Fixed config: the same swap now goes through.
    conf.write_text(good)
    assert run.cli("swap", str(v2)).returncode == 0
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")


def test_stale_pid_file_fails_the_swap_with_a_clear_error(make_daemon, system_nginx, releases: Path) -> None:
    run = external_daemon(make_daemon, system_nginx, releases)
    pid_file: Path = system_nginx["prefix"] / "nginx.pid"
    real = pid_file.read_text()
    pid_file.write_text("")  # what `nginx -t` leaves behind when no master runs
    gone = subprocess.Popen(["true"])
    gone.wait()
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a pid reused by someone else
    try:
        r = run.cli("swap", str(make_build(releases, "v2")))
        assert r.returncode == 1
        assert "[nginx_down]" in r.stderr and "empty or invalid" in r.stderr
        assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
        for pid in (gone.pid, other.pid):  # the master gone; its pid now another program's
            pid_file.write_text(f"{pid}\n")
            r = run.cli("swap", str(make_build(releases, f"v2-{pid}")))
            assert r.returncode == 1, r.stdout + r.stderr
            assert "[nginx_down]" in r.stderr and f"names pid {pid}, which is not a running nginx" in r.stderr
            assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
        assert other.poll() is None, "the process that took the pid was signalled"
    finally:
        pid_file.write_text(real)
        other.kill()
        other.wait()


def test_reload_refused_by_the_master_is_detected_and_undone(make_daemon, system_nginx, releases: Path) -> None:
    """`nginx -t` passes and `nginx -s reload` exits 0, but the master cannot bind a port and keeps
    its old config: exactly the failure a hand-run reload never notices."""
    import socket as sk

    run = external_daemon(make_daemon, system_nginx, releases)
    upstream = system_nginx["prefix"] / "conf.d" / "upstream.conf"
    before = upstream.read_bytes()
    squatter = sk.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    conf: Path = system_nginx["conf"]
    good = conf.read_text()
    conf.write_text(good.replace("    server {", f"    server {{ listen 127.0.0.1:{taken}; }}\n    server {{", 1))
    try:
        r = run.cli("swap", str(make_build(releases, "v2")))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "[nginx_reload_failed]" in r.stderr
        assert "Address already in use" in r.stderr  # the master's own [emerg] line
        assert upstream.read_bytes() == before
        assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
        assert run.status()["standby"] is None
    finally:
        squatter.close()
        conf.write_text(good)


@pytest.mark.parametrize("then, said", [
    ("exit 0", "not confirmed within 1s (0 new worker(s)"),  # exits 0 without reloading
    ("sleep 3600", "did not finish within 1s"),  # waits for ever (a sudo asking for a password)
], ids=["exits-0", "hangs"])
def test_reload_that_never_takes_effect_times_out_and_is_undone(make_daemon, system_nginx, releases: Path,
                                                               short_tmp: Path, then: str, said: str) -> None:
    """A reload command that exits 0 without reloading (a wrapper that lost its signal, a wrong
    pid file): no new workers ever appear, so the switch is refused after nginx.reload_timeout.
    One that never returns is killed with its children at that timeout: nothing waits for ever."""
    flag = short_tmp / "reload-works"
    flag.touch()  # the first reload (daemon start) works; later ones do not
    real = " ".join(system_nginx["base"] + ["-s", "reload"])
    wrapper = ["sh", "-c", f"if [ -e {flag} ]; then exec {real}; fi; {then}"]
    run = external_daemon(make_daemon, system_nginx, releases, reload=wrapper, extra="reload_timeout = 1")
    upstream = system_nginx["prefix"] / "conf.d" / "upstream.conf"
    before = upstream.read_bytes()
    flag.unlink()
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1
    assert "[nginx_reload_failed]" in r.stderr and said in r.stderr, r.stderr
    assert upstream.read_bytes() == before
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(flag) in " ".join(p.info["cmdline"] or [])], \
        "the reload command was left running"


def workers_of(master: int) -> set[int]:
    return {c.pid for c in psutil.Process(master).children()}


@pytest.mark.lua
def test_runtime_switch_in_the_users_nginx_through_its_upstream_file(make_daemon, system_nginx,
                                                                     releases: Path) -> None:
    """The README's snippet: the user's nginx loads the lua module and includes the upstream file
    in http {}; with nginx.switch = "runtime" the daemon writes its part there and loads it with
    one reload at start, then swaps with no reload: keep-alive clients see no failure."""
    run = external_daemon(make_daemon, system_nginx, releases, extra='switch = "runtime"')
    upstream = system_nginx["prefix"] / "conf.d" / "upstream.conf"
    assert "balancer_by_lua_block" in upstream.read_text()
    # beside your file: only the route file and the owner lock, no staged copy of your previous upstream
    assert sorted(os.listdir(upstream.parent)) == [".upstream.conf.owner", ".upstream.conf.route", "upstream.conf"]
    st = run.status()
    assert st["nginx"]["switch"] == "runtime" and "your nginx" in st["nginx"]["switch_why"], st["nginx"]
    control_dir = run.dir / "run" / "switch"
    assert stat.S_IMODE(control_dir.stat().st_mode) == 0o700
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    master = system_nginx["master"].pid
    before = settled_workers(master)  # the start's reload is over: no old worker closes a connection
    with KeepAlive(run.listen_port) as clients:
        wait_until(lambda: len(clients.answers) >= 20, 30, "keep-alive answers")
        for old, new in (("v1", "v2"), ("v2", "v3"), ("v3", "v4")):
            r = run.cli("swap", str(make_build(releases, new)))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "no reload" in r.stdout
            count = len(clients.answers)
            wait_until(lambda n=count: len(clients.answers) >= n + 20, 30, "answers from the new build")
            assert clients.torn(old, new) == 0
    assert not clients.failures, clients.failures[:5]
    assert workers_of(master) == before  # not one reload for three swaps
    assert http_get(run.listen_port, "/") == (200, "hello from v4\n")
    bye = run.cli("quit")
    assert bye.returncode == 0 and "your nginx is yours" in bye.stdout and "managed" not in bye.stdout, bye.stdout


def test_runtime_switch_in_a_users_nginx_without_the_module_fails_at_start_and_changes_nothing(
        make_daemon, system_nginx, releases: Path) -> None:
    upstream = system_nginx["prefix"] / "conf.d" / "upstream.conf"
    before = upstream.read_bytes()
    run = external_daemon(make_daemon, system_nginx, releases, extra='switch = "runtime"', wait=False)
    assert run.proc is not None
    wait_until(lambda: run.proc.poll() is not None, 60, "the daemon to give up", run.output)
    assert run.proc.returncode != 0
    out = run.output()
    assert "[nginx_test_failed]" in out and 'unknown directive "lua_shared_dict"' in out, out  # nginx's words
    assert "apt-get install libnginx-mod-http-lua" in out and 'nginx.switch = "reload"' in out, out  # the fix
    assert upstream.read_bytes() == before  # the user's nginx still routes as before
    assert http_get(system_nginx["listen"], "/")[0] == 502  # ... to the blue port, which nothing serves now
    run.proc.wait(30)
    assert os.listdir(upstream.parent) == ["upstream.conf"]  # no lock, no route file: the directory as it was


@pytest.mark.lua
def test_runtime_part_included_inside_a_server_block_is_refused_with_where_to_put_it(
        make_daemon, system_nginx, releases: Path) -> None:
    conf: Path = system_nginx["conf"]
    prefix = system_nginx["prefix"]
    text = conf.read_text().replace(f"    include {prefix}/conf.d/*.conf;\n", "")
    conf.write_text(text.replace("        location / {", f"        include {prefix}/conf.d/*.conf;\n        location / {{", 1))
    upstream = prefix / "conf.d" / "upstream.conf"
    before = upstream.read_bytes()
    run = external_daemon(make_daemon, system_nginx, releases, extra='switch = "runtime"', wait=False)
    assert run.proc is not None
    wait_until(lambda: run.proc.poll() is not None, 60, "the daemon to give up", run.output)
    out = run.output()
    assert "is not allowed here" in out and "directly in the http block" in out, out
    assert upstream.read_bytes() == before


PREVIEW = {"X-Bluegreen-Preview": "1"}


def proxy_pass_the_route_variable(system_nginx: dict[str, Any]) -> None:
    """The user's location as the docs say for the reload switch's preview
    (`proxy_pass http://$myapp_route;`), loaded by a reload of their nginx."""
    from supervisor.proxy.master import workers

    conf = system_nginx["conf"]
    conf.write_text(conf.read_text().replace("proxy_pass http://myapp;", "proxy_pass http://$myapp_route;"))
    master = system_nginx["master"].pid
    before = set(workers(master))
    subprocess.run(system_nginx["base"] + ["-s", "reload"], check=True)
    wait_until(lambda: workers(master) and not set(workers(master)) & before, 30, "the user's nginx to reload")


def test_preview_in_the_users_nginx_with_the_reload_switch_needs_the_route_variable(
        make_daemon, system_nginx, releases: Path) -> None:
    """The README's line: with your own nginx and reloads, `proxy_pass http://$<upstream_name>_route;`
    (defined by the upstream file's maps) lets the preview through; the pause output says so."""
    proxy_pass_the_route_variable(system_nginx)
    run = external_daemon(make_daemon, system_nginx, releases)
    r = run.cli("swap", str(make_build(releases, "v2")), "--pause")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "proxy_pass http://$myapp_route;" in r.stdout  # the reminder
    assert http_get(run.listen_port, "/", headers=PREVIEW) == (200, "hello from v2\n")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    p = run.cli("promote")
    assert p.returncode == 0, p.stdout + p.stderr
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")


@pytest.mark.lua
def test_preview_in_the_users_nginx_with_the_runtime_switch_needs_nothing_more(
        make_daemon, system_nginx, releases: Path) -> None:
    run = external_daemon(make_daemon, system_nginx, releases, extra='switch = "runtime"')
    r = run.cli("swap", str(make_build(releases, "v2")), "--pause")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "proxy_pass" not in r.stdout
    assert http_get(run.listen_port, "/", headers=PREVIEW) == (200, "hello from v2\n")
    assert http_get(run.listen_port, "/", headers={"Cookie": "bluegreen_preview=1"}) == (200, "hello from v2\n")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    a = run.cli("abort")
    assert a.returncode == 0, a.stdout + a.stderr
    assert http_get(run.listen_port, "/", headers=PREVIEW) == (200, "hello from v1\n")


@pytest.mark.lua
def test_a_location_written_for_the_reload_switch_works_unchanged_with_the_runtime_switch(
        make_daemon, system_nginx, releases: Path) -> None:
    """Moving from `switch = "reload"` to `"runtime"` keeps the preview line the docs asked for
    (`proxy_pass http://$myapp_route;`): the runtime part defines the variable too (the balancer
    does the preview), so the daemon starts and the preview still works."""
    proxy_pass_the_route_variable(system_nginx)
    run = external_daemon(make_daemon, system_nginx, releases, extra='switch = "runtime"')
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    r = run.cli("swap", str(make_build(releases, "v2")), "--pause")
    assert r.returncode == 0, r.stdout + r.stderr
    assert http_get(run.listen_port, "/", headers=PREVIEW) == (200, "hello from v2\n")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    assert run.cli("promote").returncode == 0
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
