"""Clients that keep their connections across releases, as real ones do, shared by the tests and
scripts/bench: a pooled TCP RPC client (examples/tcp-app's framing) and a gRPC caller."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter


class Stale(ConnectionError):
    """The connection was closed before any byte of the answer came (a pool's stale connection)."""


def call(conn: socket.socket, payload: bytes) -> bytes:
    try:
        conn.sendall(struct.pack("!I", len(payload)) + payload)
        head = conn.recv(4)
    except (BrokenPipeError, ConnectionResetError) as e:
        raise Stale(str(e)) from e
    if not head:
        raise Stale("closed before the answer")
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed mid-answer")
        head += chunk
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("closed mid-answer")
        body += chunk
    return body


class Pooled(threading.Thread):
    """One pooled connection, reused for every call, as an RPC client's pool does: when the server
    closed it between two calls (no byte of the answer came: Stale), open a new one and make the
    call again, once; anything else (a connection cut mid-answer, a second close) is a failed call."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.versions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.reconnects = 0
        self.slowest = 0.0  # seconds: the longest a call took, retries and reconnections included

    def run(self) -> None:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        n = 0
        while not self.stopped.is_set():
            n += 1
            payload = f"call {n}".encode()
            began = time.monotonic()
            try:
                try:
                    answer = call(conn, payload)
                except Stale:  # closed while idle: the pool's next connection
                    conn.close()
                    conn = self.reconnect()
                    self.reconnects += 1
                    answer = call(conn, payload)
                version, echoed = answer.split(b" ", 1)
                if echoed != payload:
                    self.failures["wrong answer"] += 1
                self.versions[version.decode()] += 1
                self.slowest = max(self.slowest, time.monotonic() - began)
            except (ConnectionError, OSError) as e:
                self.failures[type(e).__name__] += 1
                conn.close()
                conn = self.reconnect()
        conn.close()

    def reconnect(self) -> socket.socket:
        """A new connection, tried every 10 ms until one opens (a service being restarted refuses)."""
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except OSError:
                if self.stopped.wait(0.01):
                    return socket.socket()

    def close(self) -> None:
        self.stopped.set()
        self.join(60)


class Calls(threading.Thread):
    """Unary calls in a loop, on one channel to nginx (HTTP/2, kept open across releases, as a
    real client's), counting answers by version and failures by status code."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.versions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.slowest = 0.0  # seconds: the longest a call that succeeded took

    def run(self) -> None:
        import grpc  # a test dependency

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            say = channel.unary_unary("/example.Echo/Say")
            n = 0
            while not self.stopped.is_set():
                n += 1
                began = time.monotonic()
                try:
                    self.versions[say(f"call {n}".encode(), timeout=30).decode().split()[0]] += 1
                    self.slowest = max(self.slowest, time.monotonic() - began)
                except grpc.RpcError as e:
                    self.failures[str(e.code())] += 1
                    self.stopped.wait(0.01)  # a client backs off a little before its next call

    def close(self) -> None:
        self.stopped.set()
        self.join(60)
