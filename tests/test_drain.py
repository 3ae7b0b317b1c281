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
