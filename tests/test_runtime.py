"""The runtime switch (nginx.switch = "runtime"; the drain of a request in flight is in
test_e2e, in both modes): traffic moves through a routing table inside
nginx, with no reload: keep-alive clients see no failure and no answer from the old build once
the new one has answered. Real nginx with Debian's lua module, real apps, real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import render_config
from helpers import (bluegreen, DaemonRun, free_ports, http_get, KeepAlive, Load, make_build, managed_nginx,
                     serves, wait_until)
from supervisor.processes import sockets
from supervisor.config.host import resolve_binary
from supervisor.proxy.master import workers
pytestmark = pytest.mark.e2e


def runtime(make_daemon: Any, **kw: Any) -> DaemonRun:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, "runtime"), **kw)
    assert run.status()["nginx"]["switch"] == "runtime"
    return run


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
    # 20 concurrent writes of 20 different ports (nginx's two workers take them in parallel): every
    # answer is one whole port that was written, never a torn value; and the daemon, which did not
    # ask for any of them, puts its own route back within a second (it compares every second)
    ports = [str(40000 + i).encode() for i in range(20)]
    results: dict[bytes, bytes] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, control(run, put(p)))) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(ports)
    assert all(r.split(b"\r\n\r\n", 1)[1].strip() in ports for r in results.values()), results
    wait_until(lambda: serves(run, "v1"), 30, "the daemon to put its route back", run.output)
    assert any(e["event"] == "routing_restored" for e in run.status()["events"])


def test_a_restarted_nginx_routes_to_the_active_slot(make_daemon, releases: Path) -> None:
    run = runtime(make_daemon)
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    master = run.status()["nginx"]["master_pid"]
    os.kill(master, signal.SIGKILL)
    st = wait_until(lambda: (lambda s: s if s and s["nginx"].get("running") and s["nginx"]["master_pid"] != master
                             else None)(run.status()), 30, "nginx to be restarted", run.output)
    run.remember(st)
    wait_until(lambda: serves(run, "v2"), 30, "the restarted nginx to route to green (v2)", run.output)


def nginx_without_lua(where: Path) -> Path:
    """An nginx that cannot load Debian's lua module (like nginx.org's build), and says so in its
    own words: the real nginx, given a copy of its config whose modules are files that are no
    shared objects, so its dlopen() really fails. Any other config runs as it is."""
    real = resolve_binary("nginx")
    broken = where / "broken-modules"
    broken.mkdir()
    for m in ("ndk_http_module.so", "ngx_http_lua_module.so"):
        (broken / m).write_text("not a shared object\n")
    wrapper = where / "nginx-org"
    wrapper.write_text(f"""#!/bin/sh
conf=; prev=
for a; do [ "$prev" = -c ] && conf=$a; prev=$a; done
if [ -n "$conf" ] && grep -q ngx_http_lua_module "$conf"; then
    copy="$conf.nolua"
    sed 's#/usr/lib/nginx/modules/#{broken}/#g' "$conf" > "$copy"
    for a; do shift; [ "$a" = "$conf" ] && a=$copy; set -- "$@" "$a"; done
fi
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def test_the_default_switch_is_runtime_when_the_lua_module_loads(make_daemon, releases: Path) -> None:
    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, switch=None))
    n = run.status()["nginx"]
    assert n["switch"] == "runtime" and "without a reload" in n["switch_why"], n
    assert "switch: runtime" in run.output()  # the start-up log says it too
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0 and "no reload" in r.stdout, r.stdout + r.stderr
    assert serves(run, "v2")


def test_the_default_switch_falls_back_to_reloads_and_says_why(make_daemon, releases: Path,
                                                                 short_tmp: Path) -> None:
    listen = free_ports(1)[0]
    binary = nginx_without_lua(short_tmp)
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, switch=None, binary=str(binary)))
    n = run.status()["nginx"]
    assert n["switch"] == "reload", n
    assert 'dlopen() "' in n["switch_why"] and "failed" in n["switch_why"], n  # nginx's own words
    assert "apt-get install" in n["switch_why"], n
    assert "switch: reload: reloads, because" in run.output()
    r = run.cli("status")
    assert "dlopen()" in r.stdout  # the human status too
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert serves(run, "v2")


def test_asking_for_the_runtime_switch_where_it_cannot_load_is_a_config_error(short_tmp: Path) -> None:
    binary = nginx_without_lua(short_tmp)
    listen = free_ports(1)[0]
    cfg = short_tmp / "bluegreen.toml"
    cfg.write_text(render_config(short_tmp, build=short_tmp, ports=tuple(free_ports(2)), listen=listen,
                                 nginx=managed_nginx(listen, "runtime", str(binary))))
    r = bluegreen("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'nginx.switch: "runtime" needs' in r.stderr and 'dlopen() "' in r.stderr, r.stderr


def test_an_nginx_worker_killed_mid_request_does_not_hold_the_drain_up(make_daemon, releases: Path) -> None:
    """Its request never reaches the log phase that counts it out, so its count would stay up
    for good: the daemon counts only workers that still run."""
    run = runtime(make_daemon, drain_timeout=20)
    st = run.status()
    blue = st["active"]["port"]

    def slow() -> None:
        try:
            http_get(run.listen_port, "/slow?ms=60000", timeout=90)
        except OSError:
            pass  # its worker is killed: this one request is lost

    threading.Thread(target=slow, daemon=True).start()
    wait_until(lambda: sockets.inflight(blue) >= 1, 30, "the slow request to reach the app")
    before = workers(st["nginx"]["master_pid"])
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: sockets.inflight(blue) == 0, 30, "the app to see its connection closed")
    wait_until(lambda: serves(run, "v1"), 30, "the respawned workers to serve")
    r = run.cli("swap", "--json", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    swap = json.loads(r.stdout.splitlines()[-1])["result"]["swap"]
    assert swap["details"]["drain"]["timed_out"] is False, swap["details"]["drain"]
    assert not swap["warnings"], swap["warnings"]
    assert serves(run, "v2")


def test_a_commit_that_cannot_be_saved_goes_back_without_waiting_on_the_live_port(make_daemon,
                                                                                  releases: Path) -> None:
    """state.json cannot be written at the commit (here: its directory made immutable while the
    standby boots): traffic goes back to the old build, and the standby's drain waits for
    nginx to let go of the *standby's* port, not of the port that serves again under load."""
    if os.geteuid() != 0:
        pytest.skip("an immutable directory (chattr +i) needs root (CI runs as root)")
    run = runtime(make_daemon, drain_timeout=20)
    v2 = make_build(releases, "v2", boot_delay_ms=2000)
    state_dir = run.dir / "run"
    with Load(run.listen_port, clients=4, slow_every=2, slow_ms=1000) as load:  # always some in flight
        wait_until(lambda: load.slow_ok >= 2, 30, "slow requests in flight")
        swap = run.cli_background("swap", str(v2))
        try:
            wait_until(lambda: ((run.status() or {}).get("swap") or {}).get("phase") == "ready", 30,
                       "the standby to boot")
            subprocess.run(["chattr", "+i", str(state_dir)], check=True)
            out, err = swap.communicate(timeout=120)
        finally:
            subprocess.run(["chattr", "-i", str(state_dir)], check=False)
        after = load.total
        wait_until(lambda: load.total >= after + 10, 30, "requests after the failed swap")
    assert swap.returncode == 1, out + err
    assert "[state_write_failed]" in err and "traffic is back on the old build" in err, err
    assert serves(run, "v1")
    assert "drain of standby" not in run.log.read_text()  # it was not cut at drain.timeout
    assert not load.failures, (load.failures, load.examples)
