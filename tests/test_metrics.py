"""Prometheus metrics (issue 13) from a real daemon, nginx and app, parsed with prometheus_client's
own text parser: swaps by outcome, phase durations, crash restarts, the active build, the daemon's
status, and nginx's per-slot counters in each switch mode."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_ports, http_get, make_build, misbehaving_build, wait_until

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[str, Any]:
    """{family name: {(sample name, labels as sorted tuple): value}} from GET /metrics."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=0.0.4" in head, head
    families: dict[str, Any] = {}
    for fam in text_string_to_metric_families(body.decode()):
        families[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return families


def value(families: dict[str, Any], family: str, sample: str | None = None, **labels: Any) -> float:
    want = tuple(sorted((k, str(v)) for k, v in labels.items()))
    return families[family][(sample or family, want)]  # type: ignore[no-any-return]


def metrics_daemon(make_daemon, **kw: Any):
    port = free_ports(1)[0]
    return make_daemon(daemon=f'metrics_listen = "127.0.0.1:{port}"', **kw), port


def test_swaps_phases_the_active_build_and_nginx_counters(make_daemon, releases: Path) -> None:
    run, port = metrics_daemon(make_daemon)
    st = run.status()
    m = scrape(port)
    assert value(m, "bluegreen_up") == 1 and value(m, "bluegreen_daemon_status", status="serving") == 1
    assert value(m, "bluegreen_daemon_status", status="failed") == 0
    v1 = st["active"]
    assert value(m, "bluegreen_active_build_info", slot=v1["slot"], port=v1["port"], build=v1["build"],
                 build_name="v1", pid=v1["pid"]) == 1
    for _ in range(37):
        assert http_get(run.listen_port, "/")[0] == 200
    m = scrape(port)
    blue, green = run.ports
    assert value(m, "bluegreen_nginx_requests", "bluegreen_nginx_requests_total", slot="blue", port=blue) == 37
    assert value(m, "bluegreen_nginx_requests", "bluegreen_nginx_requests_total", slot="green", port=green) == 0

    assert run.cli("swap", str(misbehaving_build(releases, "v2", fail=100))).returncode == 0
    for _ in range(10):
        http_get(run.listen_port, "/")
    r = run.cli("swap", str(make_build(releases, "v3", healthy=False)))  # never ready
    assert r.returncode == 1
    m = scrape(port)
    assert value(m, "bluegreen_swaps", "bluegreen_swaps_total", reason="swap", outcome="done") == 1
    assert value(m, "bluegreen_swaps", "bluegreen_swaps_total", reason="swap", outcome="failed") == 1
    assert value(m, "bluegreen_nginx_responses_5xx", "bluegreen_nginx_responses_5xx_total", slot="green",
                 port=green) == 10
    assert value(m, "bluegreen_nginx_requests", "bluegreen_nginx_requests_total", slot="blue", port=blue) == 37
    # One switch (the failed swap never reached it); every phase of both swaps has a duration.
    h = "bluegreen_swap_phase_duration_seconds"
    assert value(m, h, f"{h}_count", phase="switch") == 1 and value(m, h, f"{h}_count", phase="ready") == 2
    assert value(m, h, f"{h}_bucket", phase="switch", le="+Inf") == 1
    a = run.status()["active"]
    assert value(m, "bluegreen_active_build_info", slot="green", port=green, build=a["build"], build_name="v2",
                 pid=a["pid"]) == 1
    assert not any(labels and dict(labels).get("build_name") == "v1"
                   for (_, labels) in m["bluegreen_active_build_info"])


def test_crash_restarts_and_in_flight_requests(make_daemon) -> None:
    run, port = metrics_daemon(make_daemon)
    slow = threading.Thread(target=http_get, args=(run.listen_port, "/slow?ms=3000"), daemon=True)
    slow.start()
    wait_until(lambda: value(scrape(port), "bluegreen_nginx_inflight", slot="blue", port=run.ports[0]) == 1, 10,
               "one request in flight to blue")
    slow.join(10)
    wait_until(lambda: value(scrape(port), "bluegreen_nginx_inflight", slot="blue", port=run.ports[0]) == 0, 10,
               "no request in flight")
    inside = threading.Thread(target=http_get, args=(run.listen_port, "/slow?ms=3000"), daemon=True)
    inside.start()  # the app dies with it: lost, as nginx counts it
    wait_until(lambda: value(scrape(port), "bluegreen_nginx_inflight", slot="blue", port=run.ports[0]) == 1, 10,
               "one request in flight to blue")
    os.kill(run.status()["active"]["pid"], signal.SIGKILL)
    wait_until(lambda: value(scrape(port), "bluegreen_crash_restarts", "bluegreen_crash_restarts_total") == 1
               and value(scrape(port), "bluegreen_daemon_status", status="serving") == 1, 30, "a crash restart")
    inside.join(10)
    m = scrape(port)
    assert value(m, "bluegreen_swaps", "bluegreen_swaps_total", reason="recover", outcome="done") == 1
    assert value(m, "bluegreen_nginx_lost_requests", "bluegreen_nginx_lost_requests_total") == 1
    assert value(m, "bluegreen_nginx_holding") == 0 and value(m, "bluegreen_nginx_paused") == 0
    assert value(m, "bluegreen_nginx_hold_timeouts", "bluegreen_nginx_hold_timeouts_total") == 0


def test_the_reload_switch_has_in_flight_counts_but_no_request_counters(make_daemon) -> None:
    listen = free_ports(1)[0]
    run, port = metrics_daemon(make_daemon, listen=listen,
                               nginx=f'mode = "managed"\nswitch = "reload"\nlisten = "127.0.0.1:{listen}"')
    http_get(run.listen_port, "/")
    m = scrape(port)
    assert "bluegreen_nginx_requests" not in m and "bluegreen_nginx_held_requests" not in m  # no lua: nothing held
    assert value(m, "bluegreen_nginx_inflight", slot="green", port=run.ports[1]) == 0
    assert value(m, "bluegreen_nginx_up") == 1


def test_a_metrics_address_in_use_is_named_and_the_daemon_does_not_start(make_daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = make_daemon(start=False, daemon=f'metrics_listen = "127.0.0.1:{port}"')
        run.start(wait=False)
        assert run.proc is not None and run.proc.wait(60) == 1
    out = run.output()
    assert f"daemon.metrics_listen: 127.0.0.1:{port} is already in use by" in out and "python" in out, out


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """docs/operations.md's metrics table: {family name: (type, label names)} (a counter's family
    is its name without `_total`, as prometheus_client's parser names it)."""
    from helpers import ROOT

    rows = re.findall(r"^\| `(bluegreen_\w+)(?:\{([\w,]+)\})?` \| (\w+) \|", (ROOT / "docs" / "operations.md").read_text(),
                      re.M)
    assert len(rows) >= 20, rows
    return {(name.removesuffix("_total") if kind == "counter" else name): (kind, frozenset(filter(None, labels.split(","))))
            for name, labels, kind in rows}


def served(port: int) -> dict[str, tuple[str, set[frozenset[str]], set[Any]]]:
    """{family: (type, its samples' label names, its series)} from a real scrape."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for fam in text_string_to_metric_families(data.partition(b"\r\n\r\n")[2].decode()):
        names = {frozenset(k for k in s.labels if k != "le") for s in fam.samples}
        series = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("pid",)))) for s in fam.samples}
        out[fam.name] = (fam.type, names, series)
    return out


def test_the_metrics_table_in_the_docs_is_what_a_daemon_serves_with_series_that_never_change(make_daemon,
                                                                                           releases: Path) -> None:
    """Every documented metric is served with its documented type and labels and nothing else is
    (runtime switch, HTTP app, a spare: every family shows); and the series a swap's gauges have
    while it runs are the ones they have at rest (a label that changes value starts a new series)."""
    from shapes import app_build

    run, port = metrics_daemon(make_daemon, app="spare = true")
    wait_until(lambda: (run.status()["spare"] or {}).get("state") == "ready", 60, "the spare")
    idle, docs = served(port), documented()
    assert set(idle) == set(docs), (sorted(set(idle) - set(docs)), sorted(set(docs) - set(idle)))
    for name, (kind, labels) in docs.items():
        assert idle[name][0] == kind, (name, idle[name][0], kind)
        assert idle[name][1] <= {labels}, (name, idle[name][1], labels)
    kinds = {dict(labels)["kind"] for _, labels in idle["bluegreen_long_lived_connections"][2]}
    assert kinds == {"websocket", "path"}, kinds  # an HTTP app's kinds: no `tcp` series that can never move
    swap = run.cli_background("swap", str(app_build(releases, "v2", boot_ms=3000)))
    try:
        wait_until(lambda: run.phase() == "ready", 30, "the swap to be getting ready")
        during = served(port)
        m = scrape(port)
        assert value(m, "bluegreen_swap_phase", phase="ready") == 1 and value(m, "bluegreen_swap_phase", phase="drain") == 0
        assert value(m, "bluegreen_swap_in_progress", reason="swap") == 1
    finally:
        swap.communicate(timeout=60)
    for name in ("bluegreen_swap_in_progress", "bluegreen_swap_phase", "bluegreen_long_lived_connections"):
        assert during[name][2] == idle[name][2], (name, during[name][2] ^ idle[name][2])
