"""In-flight counting from outside the app, on real sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from supervisor.processes import sockets


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET6)  # dual stack, like Node's default: IPv4 clients appear as ::ffff:
    s.bind(("::", 0))
    s.listen()
    yield s
    s.close()


def test_counts_established_then_close_wait_until_the_app_closes(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert sockets.inflight(port) == 0
    client = socket.create_connection(("127.0.0.1", port))
    server_side, _ = listener.accept()
    assert sockets.inflight(port) == 1
    assert [c.state_name for c in sockets.connections(port)] == ["ESTABLISHED"]
    client.close()  # the peer hung up; the app still holds the socket (often still working)
    assert [c.state_name for c in sockets.connections(port)] == ["CLOSE_WAIT"]
    assert sockets.inflight(port) == 1
    server_side.close()
    assert sockets.inflight(port) == 0


def test_counts_only_the_app_side_of_its_port(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    c1 = socket.create_connection(("127.0.0.1", other.getsockname()[1]))
    a1, _ = other.accept()
    try:
        assert sockets.inflight(port) == 0  # neither the client side nor another port counts
        assert len(sockets.listening(port)) == 1
        assert sockets.listening(other.getsockname()[1])
    finally:
        for s in (c1, a1, other):
            s.close()


def test_proc_fallback_agrees_with_netlink(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        assert sockets.inflight(port) == 3
        assert len(sockets._proc_scan(port, sockets.INFLIGHT_STATES)) == 3
    finally:
        for s in clients + accepted:
            s.close()


def this_process() -> set[int]:
    """The test itself holds the app's side of these connections (the /proc scans skip it)."""
    import os

    return {os.getpid()}


def connect_from(address: str, port: int) -> socket.socket:
    """A client connection from `address` (what nginx's proxy_bind does for a long-lived request)."""
    c = socket.socket()
    c.bind((address, 0))
    c.connect(("127.0.0.1", port))
    return c


def test_long_lived_connections_are_told_apart_by_the_address_nginx_connects_from(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    clients = [connect_from(a, port) for a in ("127.0.0.1", "127.0.0.2", "127.0.0.4", "127.0.0.4", "127.0.0.5")]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        assert sockets.long_lived(port) == {"websocket": 1, "path": 2, "tcp": 1}
        ours = {c.getsockname()[1] for c in clients}  # (a port freed by another test may still have peers)
        by_proc = sorted(c.remote for c in sockets._proc_scan(port, sockets.INFLIGHT_STATES) if c.remote_port in ours)
        by_netlink = sorted(c.remote for c in sockets.connections(port) if c.remote_port in ours)
        assert by_proc == by_netlink and len(by_proc) == 5  # the fallback reads the addresses alike
    finally:
        for s in clients + accepted:
            s.close()


def test_the_drain_closes_long_lived_connections_at_their_grace_and_still_waits_for_short_ones(
        listener: socket.socket) -> None:
    """Grace 0.2 s, timeout 30 s: the listed path's stream is closed (its client reads the end,
    with no goodbye: none is proven safe for a listed path) while a short request goes on; the
    drain ends when the short one ends, not at its timeout."""
    import asyncio
    import threading

    from supervisor.processes.drain import wait_drained

    port = listener.getsockname()[1]
    short, stream = connect_from("127.0.0.1", port), connect_from("127.0.0.4", port)
    accepted = [listener.accept()[0] for _ in range(2)]
    reset = threading.Event()

    def client_reads() -> None:
        if stream.recv(1) == b"":
            reset.set()
            accepted[0].close()  # the short request's answer: it ends once the stream was closed
            short.close()

    async def no_proxy(port: int, deadline: float) -> int:
        return 0

    threading.Thread(target=client_reads, daemon=True).start()
    try:
        result = asyncio.run(wait_drained(port, no_proxy, timeout=30, interval=0.01, grace=0.2, holders=this_process))
        assert reset.is_set()
        assert result["long_lived_cut"] == {"path": 1} and result["long_lived_clean"] == 0
        assert not result["timed_out"] and result["still_open"] == 0 and result["long_lived_left"] == 0
    finally:
        for s in [short, stream, *accepted]:
            s.close()


def test_a_close_the_kernel_refuses_is_reported_with_its_reason(listener: socket.socket,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon without root can neither take a copy of another process's socket nor destroy its
    connection: the drain says how many it could not close and why, and ends at its deadline."""
    import asyncio
    import errno

    from supervisor.processes import copies
    from supervisor.processes.drain import wait_drained

    port = listener.getsockname()[1]
    ws = connect_from("127.0.0.4", port)
    accepted = listener.accept()[0]

    def refused(pid: int, fd: int, inode: int) -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(copies, "take", refused)
    monkeypatch.setattr(sockets, "destroy", lambda conns: (0, 0, "Operation not permitted (needs CAP_NET_ADMIN)"))

    async def no_proxy(port: int, deadline: float) -> int:
        return 0

    try:
        result = asyncio.run(wait_drained(port, no_proxy, timeout=0.1, interval=0.01))
        assert result["long_lived_cut"] == {} and result["long_lived_left"] == 1
        assert "CAP_NET_ADMIN" in result["cut_error"]
    finally:
        ws.close()
        accepted.close()


def test_a_short_request_past_drain_timeout_is_reported_even_when_the_grace_is_longer(listener: socket.socket) -> None:
    """drain.timeout 0.1 s, long-lived grace 0.6 s: the drain goes on for the stream's grace, and
    the short request still running at 0.1 s is reported as such, though it ended since."""
    import asyncio
    import threading

    from supervisor.processes.drain import wait_drained

    port = listener.getsockname()[1]
    short, stream = connect_from("127.0.0.1", port), connect_from("127.0.0.4", port)
    accepted = [listener.accept()[0] for _ in range(2)]
    done = threading.Timer(0.3, lambda: (accepted[0].close(), short.close()))  # the short one ends at 0.3 s

    async def no_proxy(port: int, deadline: float) -> int:
        return 0

    done.start()
    try:
        result = asyncio.run(wait_drained(port, no_proxy, timeout=0.1, interval=0.01, grace=0.6))
        assert result["timed_out"] and result["still_open"] == 1
        assert result["long_lived_cut"] == {"path": 1}
    finally:
        done.cancel()
        for s in [short, stream, *accepted]:
            s.close()


def test_a_netlink_error_falls_back_to_proc_for_a_while_never_for_good(listener: socket.socket,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One netlink error is tried again at once; two in a row read /proc instead, for
    NETLINK_RETRY seconds only: then netlink again (it once stayed off for the daemon's life)."""
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted = listener.accept()[0]
    real, calls = sockets._netlink_dump, {"n": 0, "fail": 1}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["fail"]:
            calls["fail"] -= 1
            raise OSError(105, "No buffer space available")
        return real(*args, **kw)

    monkeypatch.setattr(sockets, "_netlink_dump", flaky)
    monkeypatch.setattr(sockets, "_netlink_off_until", 0.0)
    try:
        conns = sockets.connections(port)
        assert len(conns) == 1 and conns[0].info is not None  # the second try answered: netlink's own view
        calls["fail"] = 2
        conns = sockets.connections(port)
        assert len(conns) == 1 and conns[0].info is None  # /proc's (no tcp_info)
        assert sockets.connections(port)[0].info is None  # still /proc, within NETLINK_RETRY
        monkeypatch.setattr(sockets, "_netlink_off_until", 0.0)  # (as if NETLINK_RETRY had passed)
        assert sockets.connections(port)[0].info is not None
    finally:
        client.close()
        accepted.close()
