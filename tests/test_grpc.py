"""gRPC apps (app.protocol = "grpc"): examples/grpc-app, a real grpcio server, behind the managed
nginx (http2, grpc_pass), with each switch, under a load of unary calls from real grpcio clients.
Readiness is the standard health service; a streaming call is long-lived by its listed path."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from clients import Calls
from helpers import ROOT, free_ports, managed_nginx, nginx_rewriting, refused_before_start, wait_until

pytestmark = pytest.mark.e2e
GRPC = ROOT / "examples" / "grpc-app"
grpc = pytest.importorskip("grpc")  # a test dependency (pyproject's [test]); scripts/test installs it


def grpc_daemon(make_daemon: Any, switch: str, **kw: Any) -> Any:
    listen = free_ports(1)[0]
    kw.setdefault("ready", 'grpc_service = ""\ntimeout = 30')
    return make_daemon(build=GRPC / "v1", listen=listen, nginx=managed_nginx(listen, switch),
                       command='["python", "server.py"]', app='protocol = "grpc"', **kw)


@pytest.mark.parametrize("switch", ["runtime", "reload"])
def test_grpc_unary_calls_lose_nothing_across_releases_and_a_slow_call_finishes_on_the_old_build(
        make_daemon: Any, switch: str) -> None:
    run = grpc_daemon(make_daemon, switch, drain_timeout=20)
    slow: dict[str, Any] = {}

    def slow_call() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{run.listen_port}") as channel:
            slow["answer"] = channel.unary_unary("/example.Echo/Say")(b"sleep 2000", timeout=60).decode()

    loads = [Calls(run.listen_port) for _ in range(4)]
    for c in loads:
        c.start()
    try:
        wait_until(lambda: sum(sum(c.versions.values()) for c in loads) >= 50, 60, "calls to flow")
        t = threading.Thread(target=slow_call)
        t.start()
        for build in (GRPC / "v2", GRPC / "v1", GRPC / "v2"):
            r = run.cli("swap", str(build), timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            before = sum(sum(c.versions.values()) for c in loads)
            wait_until(lambda before=before: sum(sum(c.versions.values()) for c in loads) >= before + 50, 60,
                       "calls after the swap")
        t.join(60)
    finally:
        for c in loads:
            c.close()
    assert slow["answer"] == "v1 sleep 2000"
    failures = sum((c.failures for c in loads), Counter())
    versions = sum((c.versions for c in loads), Counter())
    assert not failures, failures
    assert set(versions) == {"v1", "v2"}, versions


def test_a_build_whose_health_service_is_not_serving_never_gets_traffic(make_daemon: Any, short_tmp: Path) -> None:
    run = grpc_daemon(make_daemon, "runtime", ready='grpc_service = ""\ntimeout = 2\ninterval = 0.1')
    bad = short_tmp / "bad"
    bad.mkdir()
    source = (GRPC / "v2" / "server.py").read_text()
    assert 'os.environ.get("HEALTH", "SERVING")' in source
    (bad / "server.py").write_text(source.replace('os.environ.get("HEALTH", "SERVING")', '"NOT_SERVING"'))
    (bad / "VERSION").write_text("bad\n")
    r = run.cli("swap", str(bad), timeout=300)
    assert r.returncode == 1 and "not_ready" in r.stderr and "NOT_SERVING" in r.stderr, r.stdout + r.stderr
    assert run.status()["active"]["build"].endswith("/v1")


def test_a_server_streaming_call_on_a_listed_path_is_cut_at_the_grace_said_so_and_called_again_on_the_new_build(
        make_daemon: Any) -> None:
    """No goodbye is proven safe for a gRPC stream (trailers before its response headers would be a
    502 from nginx): it is cut, the drain counts it cut (never clean), and its client, which got
    an error status, calls again, on v2."""
    run = grpc_daemon(make_daemon, "runtime", drain_timeout=1, stop_timeout=120,
                      drain='long_lived_paths = ["/example.Echo/Ticks"]')
    got: list[str] = []
    ends: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{run.listen_port}") as channel:
            ticks = channel.unary_stream("/example.Echo/Ticks")
            while not stop.is_set():
                try:
                    for m in ticks(b"", timeout=120):
                        got.append(m.decode().split()[0])
                        if stop.is_set():
                            return
                except grpc.RpcError as e:
                    ends.append(str(e.code()))

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        wait_until(lambda: len(got) >= 3, 60, "ticks from v1")
        r = run.cli("swap", str(GRPC / "v2"), "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        drain = next(e for e in map(json.loads, r.stdout.splitlines()) if e.get("event") == "drain"
                     and e.get("status") == "done")
        assert drain["long_lived_cut"] == {"path": 1}, drain
        wait_until(lambda: got[-1] == "v2", 60, "ticks from v2")
        assert ends and ends[0] in ("StatusCode.INTERNAL", "StatusCode.UNAVAILABLE"), ends
        assert drain["long_lived_clean"] == 0 and "no goodbye is proven safe" in drain["not_clean_why"], drain
    finally:
        stop.set()
        t.join(30)


def test_check_config_names_a_grpc_app_this_nginx_cannot_serve_before_anything_starts(short_tmp: Path) -> None:
    """An nginx without HTTP/2 refuses `listen ... http2` (here the real nginx, given a copy of the
    config whose listen parameter it does not know): check-config and the daemon say so."""
    wrapper = nginx_rewriting(short_tmp, "s/ http2;/ http2x;/")
    cfg = short_tmp / "grpc.toml"
    cfg.write_text(f'[app]\nprotocol = "grpc"\ncommand = ["python", "server.py"]\nports = {free_ports(2)}\n'
                   f'build = "{GRPC / "v1"}"\n[nginx]\nlisten = "127.0.0.1:{free_ports(1)[0]}"\nbinary = "{wrapper}"\n')
    for err in refused_before_start(cfg):
        assert 'app.protocol: "grpc":' in err and "cannot proxy gRPC" in err and "http2x" in err, err
