"""TCP services (app.protocol = "tcp"): examples/tcp-app, a framed RPC server whose clients keep
their connections open (a pool), behind the managed nginx's stream module, under load.

After the switch (a tested, confirmed reload of the stream upstream), each pooled connection
to the old build is closed as soon as it is between two calls; a call in flight finishes first."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from clients import Pooled, call
from helpers import ROOT, free_ports, nginx_rewriting, refused_before_start, wait_until

pytestmark = pytest.mark.e2e
TCP = ROOT / "examples" / "tcp-app"


def tcp_daemon(make_daemon: Any, **kw: Any) -> Any:
    listen = free_ports(1)[0]
    return make_daemon(build=TCP / "v1", listen=listen, command='["python3", "server.py"]', app='protocol = "tcp"',
                       ready='send = "\\u0000\\u0000\\u0000\\u0004PING"\nexpect = "PONG"\ntimeout = 30',
                       nginx=f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 2', **kw)


def test_pooled_connections_move_to_the_new_build_between_calls_and_no_call_fails(make_daemon: Any) -> None:
    run = tcp_daemon(make_daemon, drain_timeout=20, stop_timeout=60)
    assert run.status()["nginx"]["switch"] == "reload"
    pool = [Pooled(run.listen_port) for _ in range(8)]
    slow: dict[str, Any] = {}

    def slow_call() -> None:
        with socket.create_connection(("127.0.0.1", run.listen_port), timeout=60) as conn:
            slow["answer"] = call(conn, b"sleep 2000")

    for p in pool:
        p.start()
    try:
        wait_until(lambda: sum(sum(p.versions.values()) for p in pool) >= 100, 60, "calls to flow")
        t = threading.Thread(target=slow_call)
        t.start()
        drains = []
        for build in (TCP / "v2", TCP / "v1", TCP / "v2"):
            r = run.cli("swap", str(build), "--json", timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            drains.append(next(e for e in map(json.loads, r.stdout.splitlines())
                               if e.get("event") == "drain" and e.get("status") == "done"))
            want = build.name
            wait_until(lambda want=want: all(p.versions[want] for p in pool), 60, f"every pooled client on {want}")
        t.join(60)
    finally:
        for p in pool:
            p.close()
    assert slow["answer"] == b"v1 sleep 2000"  # the call in flight finished on the old build
    failures = sum((p.failures for p in pool), Counter())
    assert not failures, failures
    # every pooled connection to the old build was closed between two calls: none was cut at the grace
    assert all(d["closed_between_calls"] >= len(pool) and d["long_lived_cut"] == {} and not d["timed_out"]
               for d in drains), drains
    last = run.status()["last_swap"]
    assert not [w for w in last.get("warnings", []) if w.startswith("stop:")], last  # exited on SIGTERM


def test_a_tcp_service_has_no_preview_and_no_rollout(make_daemon: Any) -> None:
    run = tcp_daemon(make_daemon)
    for args in (["--pause"], ["--rollout", "50,100"]):
        r = run.cli("swap", str(TCP / "v2"), *args)
        assert r.returncode == 2 or r.returncode == 1, r.stdout + r.stderr
        assert "no preview and no rollout" in r.stderr, r.stderr
    assert run.status()["active"]["build"].endswith("/v1")


def test_check_config_names_a_missing_stream_module_before_anything_starts(short_tmp: Path) -> None:
    """An nginx that cannot load Debian's stream module (here the real nginx, given a copy of the
    config whose module path is a file that is no shared object): check-config and the daemon
    name it and what to install."""
    from supervisor.config.host import STREAM_MODULE

    broken = short_tmp / "broken.so"
    broken.write_text("not a shared object\n")
    wrapper = nginx_rewriting(short_tmp, f"s#{STREAM_MODULE}#{broken}#")
    cfg = short_tmp / "tcp.toml"
    cfg.write_text(f'[app]\nprotocol = "tcp"\ncommand = ["python3", "server.py"]\nports = {free_ports(2)}\n'
                   f'build = "{TCP / "v1"}"\n[nginx]\nlisten = "127.0.0.1:{free_ports(1)[0]}"\nbinary = "{wrapper}"\n')
    for err in refused_before_start(cfg):
        assert 'app.protocol: "tcp":' in err and "libnginx-mod-stream" in err, err


def test_a_tcp_service_behind_your_own_nginx_s_stream_block(make_daemon: Any, short_tmp: Path) -> None:
    """External mode, as docs/nginx.md shows it: your nginx's stream {} block includes the
    upstream file bluegreen rewrites, and connects from the TCP kind's address. Pooled clients
    move between two calls; no call fails."""
    import os

    from shapes import UserNginx
    from helpers import stop_all
    from supervisor.config.host import STREAM_MODULE
    from supervisor.proxy.render import render_stream_upstream

    prefix = short_tmp / "nginx"
    (prefix / "conf.d").mkdir(parents=True)
    listen, blue, green = free_ports(3)
    (prefix / "conf.d" / "myapp.conf").write_text(render_stream_upstream("myapp", blue))
    (prefix / "nginx.conf").write_text(f"""load_module {STREAM_MODULE};
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 256; }}
stream {{
    include {prefix}/conf.d/*.conf;
    server {{ listen 127.0.0.1:{listen}; proxy_pass myapp; proxy_bind 127.0.0.5; }}
}}
""")
    user = UserNginx(prefix, listen)
    user.start()
    try:
        run = make_daemon(build=TCP / "v1", ports=(blue, green), listen=listen, command='["python3", "server.py"]',
                          app='protocol = "tcp"', ready='timeout = 30',
                          nginx="\n".join(user.external(prefix / "conf.d" / "myapp.conf", "myapp")))
        pool = [Pooled(listen) for _ in range(4)]
        for p in pool:
            p.start()
        try:
            wait_until(lambda: all(p.versions["v1"] for p in pool), 60, "calls to flow")
            for build in (TCP / "v2", TCP / "v1"):
                r = run.cli("swap", str(build), timeout=300)
                assert r.returncode == 0 and "between two calls" in r.stdout, r.stdout + r.stderr
                wait_until(lambda b=build.name: all(p.versions[b] for p in pool), 60, f"every client on {build.name}")
        finally:
            for p in pool:
                p.close()
        failures = sum((p.failures for p in pool), Counter())
        assert not failures, failures
        stop_all([run])
    finally:
        user.close()


def test_a_call_still_running_at_drain_timeout_is_said_to_be_cut(make_daemon: Any) -> None:
    """A client that sends big calls and reads no answer is never between two calls: at
    drain.timeout its connection is cut, and the drain says it was cut (TCP has no goodbye)."""
    import struct

    run = tcp_daemon(make_daemon, drain_timeout=1, stop_timeout=60)
    conn = socket.create_connection(("127.0.0.1", run.listen_port), timeout=30)
    try:
        payload = b"x" * 1_000_000
        conn.settimeout(0.5)
        for _ in range(20):  # until the answers nobody reads fill every buffer on the way back
            try:
                conn.sendall(struct.pack("!I", len(payload)) + payload)
            except socket.timeout:
                break
        wait_until(lambda: run.status()["active"]["long_lived"] == {"tcp": 1}, 30, "the connection, counted")
        r = run.cli("swap", str(TCP / "v2"), "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        drain = next(e for e in map(json.loads, r.stdout.splitlines()) if e.get("event") == "drain"
                     and e.get("status") == "done")
        assert drain["long_lived_cut"] == {"tcp": 1} and drain["long_lived_clean"] == 0, drain
        assert drain["closed_between_calls"] == 0 and drain["not_clean_why"], drain
    finally:
        conn.close()
