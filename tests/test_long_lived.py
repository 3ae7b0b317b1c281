"""Long-lived connections through a release: WebSockets and server-sent events (the live example,
examples/live-app, unchanged: its event stream's path listed), on both nginx shapes.

The policy (docs/how-a-swap-works.md): short requests are waited for up to drain.timeout;
long-lived ones get drain.long_lived_grace, then the daemon closes them (a WebSocket that nginx
switched with its close frame, a listed path cut: no goodbye is proven safe for it), their
clients reconnect to the new build, and the swap says how many of which kind it closed, and how.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import ROOT, DaemonRun, EventStream, Load, WebSocketClient, http_get, wait_until

pytestmark = pytest.mark.e2e
LIVE = ROOT / "examples" / "live-app"
EVENTS = 'long_lived_paths = ["/events"]'  # as the example's config lists it


def swap(run: DaemonRun, build: Path) -> dict[str, dict[str, Any]]:
    """`bluegreen swap --json`: each phase's final event, by phase."""
    r = run.cli("swap", str(build), "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {e["event"]: e for e in lines if "event" in e}


def test_a_release_closes_websockets_and_event_streams_at_the_grace_and_they_reconnect_to_the_new_build(
        shape: Any) -> None:
    """drain.timeout 2 s, app.stop.timeout 120 s, and an app that never ends a stream on SIGTERM:
    the streams are closed at the grace (2 s), so the old build exits on its SIGTERM at once
    instead of holding the release until its SIGKILL; the clients reconnect to v2 and miss no
    event; short requests alongside never fail."""
    run, _ = shape(build=LIVE / "v1", drain_timeout=2, stop_timeout=120, drain=EVENTS)
    release_with_live_clients(run)


def test_the_reload_switch_closes_them_too_so_its_old_workers_let_go(make_daemon: Any) -> None:
    """With reloads, the old nginx workers hold the long-lived connections (until
    worker_shutdown_timeout): closed at the grace, the workers exit and the release ends."""
    from helpers import free_ports, managed_nginx

    listen = free_ports(1)[0]
    run = make_daemon(build=LIVE / "v1", drain_timeout=2, stop_timeout=120, listen=listen,
                      nginx=managed_nginx(listen, "reload"), drain=EVENTS)
    release_with_live_clients(run)


def release_with_live_clients(run: DaemonRun) -> None:
    """The first test's release, on `run`: see its docstring."""
    stream, sock = EventStream(run.listen_port), WebSocketClient(run.listen_port)
    stream.start()
    sock.start()
    try:
        wait_until(lambda: len(stream.events) >= 3 and len(sock.messages) >= 3, 60, "both clients to receive from v1")
        assert run.status()["active"]["long_lived"] == {"path": 1, "websocket": 1}
        old = psutil.Process(run.status()["active"]["pid"])
        with Load(run.listen_port, clients=4, slow_every=5, slow_ms=300) as load:
            wait_until(lambda: load.total >= 20, 60, "load to flow")
            phases = swap(run, LIVE / "v2")
            after = load.total
            wait_until(lambda: load.total >= after + 20, 60, "requests after the swap")
        drain, stop = phases["drain"], phases["stop"]
        assert drain["long_lived_cut"] == {"path": 1, "websocket": 1}, drain
        # the WebSocket with its close frame 1001 (nginx switched it); the listed path cut, said so
        assert drain["long_lived_clean"] == 1 and "no goodbye is proven safe" in drain["not_clean_why"], json.dumps(drain)
        assert not drain["timed_out"] and not drain["long_lived_left"], drain
        assert not stop.get("killed") and "SIGKILL" not in stop["how"], stop  # it exited on SIGTERM
        assert not old.is_running()
        wait_until(lambda: any(v == "v2" for v, _ in stream.events) and any(v == "v2" for _, v, _ in sock.messages),
                   60, "both clients to receive from v2")
        assert stream.connections >= 2 and sock.connections >= 2
        assert sock.closes[:1] == ["closed 1001"] and stream.ends[:1] == ["RemoteProtocolError"], (sock.closes,
                                                                                                   stream.ends)
        assert stream.lost() == [], "events lost across the release"
        assert sock.lost() == [], "messages lost within a connection"
        assert not load.failures, (load.failures, load.examples)
    finally:
        stream.close()
        sock.close()


def test_short_requests_are_waited_for_while_long_lived_ones_are_closed_at_their_own_grace(
        make_daemon: Any) -> None:
    """drain.long_lived_grace 0.5 s, drain.timeout 60 s: a 4 s request to the old build finishes
    (200, from v1) after its event stream was closed and had reconnected to v2."""
    run = make_daemon(build=LIVE / "v1", drain_timeout=60, drain=f"long_lived_grace = 0.5\n{EVENTS}")
    stream = EventStream(run.listen_port)
    stream.start()
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        slow["answer"] = http_get(run.listen_port, "/slow?ms=4000", timeout=60)
        slow["at"] = time.monotonic()
        slow["stream_versions"] = {v for v, _ in stream.events}

    try:
        wait_until(lambda: len(stream.events) >= 3, 60, "the stream to flow")
        t = threading.Thread(target=slow_request)
        t.start()
        wait_until(lambda: run.status()["active"]["long_lived"] == {"path": 1}, 30, "the stream, counted")
        phases = swap(run, LIVE / "v2")
        t.join(60)
        assert slow["answer"] == (200, "v1 slow 4000\n")
        assert "v2" in slow["stream_versions"], "the stream waited for the slow request"
        assert phases["drain"]["long_lived_cut"] == {"path": 1}
        assert not phases["drain"]["timed_out"]
        assert stream.lost() == []
    finally:
        stream.close()


def test_a_listed_path_is_long_lived_too_and_is_closed_at_the_grace(make_daemon: Any) -> None:
    """drain.long_lived_paths: a long poll on /slow is closed at the grace (its client sees the
    connection end, and would ask again), counted as `path`; the metrics and status show it
    while it is open."""
    from helpers import free_ports

    metrics = free_ports(1)[0]
    run = make_daemon(build=LIVE / "v1", drain_timeout=1, stop_timeout=120, drain='long_lived_paths = ["/slow"]',
                      daemon=f'metrics_listen = "127.0.0.1:{metrics}"')
    poll: dict[str, Any] = {}

    def long_poll() -> None:
        try:
            poll["answer"] = http_get(run.listen_port, "/slow?ms=100000", timeout=200)
        except OSError as e:
            poll["error"] = e

    t = threading.Thread(target=long_poll)
    t.start()
    wait_until(lambda: run.status()["active"]["long_lived"] == {"path": 1}, 30, "the long poll, counted")
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    blue = run.status()["active"]["slot"]
    assert f'bluegreen_long_lived_connections{{kind="path",port="{run.ports[0]}",slot="{blue}"}} 1.0' in text
    assert "holds 1 path" in run.cli("status").stdout
    phases = swap(run, LIVE / "v2")
    t.join(60)
    assert phases["drain"]["long_lived_cut"] == {"path": 1}
    assert "answer" not in poll or poll["answer"][0] >= 500, poll  # never a whole answer: it was cut


def test_a_websocket_whose_client_does_not_read_is_said_to_be_cut_not_closed_cleanly(make_daemon: Any) -> None:
    """A client that sends echo requests (1 MB each) and never reads: at the grace the app still has
    megabytes queued for it, so no close frame can be put after them. The connection is cut, and
    the drain says so (never "with their protocol's goodbye")."""
    import base64
    import os
    import socket

    run = make_daemon(build=LIVE / "v1", drain_timeout=1, stop_timeout=60)
    sock = socket.create_connection(("127.0.0.1", run.listen_port), timeout=30)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        payload = b"x" * 1_000_000
        mask = os.urandom(4)
        masked = payload  # a binary frame: what it says once unmasked is irrelevant
        frame = b"\x82\xff" + len(payload).to_bytes(8, "big") + mask + masked
        sock.settimeout(0.5)
        sent = 0
        for _ in range(20):  # until the app's echoes fill every buffer on the way back
            try:
                sock.sendall(frame)
                sent += 1
            except socket.timeout:
                break
        wait_until(lambda: run.status()["active"]["long_lived"] == {"websocket": 1}, 30, "the socket, counted")
        phases = swap(run, LIVE / "v2")
        drain = phases["drain"]
        assert drain["long_lived_cut"] == {"websocket": 1} and drain["long_lived_clean"] == 0, drain
        assert "still queued for a client that does not read" in drain["not_clean_why"], drain
    finally:
        sock.close()


def test_a_request_header_alone_never_makes_a_request_long_lived(make_daemon: Any) -> None:
    """`Accept: text/event-stream` on a normal path is a short request: the drain waits for it
    past the long-lived grace, it finishes on the old build, and nothing is written into its answer."""
    from supervisor.processes import sockets

    run = make_daemon(build=LIVE / "v1", drain_timeout=60, drain="long_lived_grace = 0.3")
    answer: dict[str, Any] = {}

    def ask() -> None:
        answer["got"] = http_get(run.listen_port, "/slow?ms=3000", headers={"Accept": "text/event-stream"}, timeout=60)

    t = threading.Thread(target=ask)
    t.start()
    wait_until(lambda: sockets.inflight(run.ports[0]) >= 1, 30, "the request, in flight on v1")
    assert run.status()["active"]["long_lived"] == {}
    phases = swap(run, LIVE / "v2")
    t.join(60)
    assert answer["got"] == (200, "v1 slow 3000\n"), answer
    assert phases["drain"]["long_lived_cut"] == {} and not phases["drain"]["timed_out"], phases["drain"]
