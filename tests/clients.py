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


class RedisCallers:
    """Three kinds of callers through real redis-py pools with no retries (a pool checks a pooled
    connection before each use, and that is all): calls `spaced_ms` apart (a web app's cache
    pool), calls back to back, and a slow call (DEBUG SLEEP `slow_s`) now and then. `layout`:
    "shared" (one ConnectionPool for every caller, as one web app has), "by-kind" (a pool per
    kind of caller), "per-caller" (a pool each: a connection that rests between its caller's
    calls). Counts calls and failures by kind, answers by build."""

    KINDS = ("spaced", "back-to-back", "slow")

    def __init__(self, port: int, spaced: int = 4, back_to_back: int = 2, slow: int = 1, spaced_ms: float = 5.0,
                 slow_s: float = 1.5, slow_every_s: float = 2.0, layout: str = "shared") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        def client() -> redis.Redis:
            return redis.Redis(connection_pool=redis.ConnectionPool(
                host="127.0.0.1", port=port, socket_timeout=30, protocol=2, retry=Retry(NoBackoff(), 0)))

        shared = client()
        by_kind = {kind: client() for kind in self.KINDS}
        plan = [("spaced", spaced_ms / 1000)] * spaced + [("back-to-back", 0.0)] * back_to_back
        plan += [("slow", slow_every_s)] * slow
        self.clients = [shared if layout == "shared" else by_kind[kind] if layout == "by-kind" else client()
                        for kind, _ in plan]
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # by kind
        self.versions: Counter[str] = Counter()  # answers to GET, by build
        self.last: dict[int, str] = {}  # each caller's last answer's build
        self.failures: Counter[tuple[str, str]] = Counter()  # (kind, error)
        self.examples: list[str] = []
        self.slowest = 0.0
        self.slow_s = slow_s
        self.threads = [threading.Thread(target=self.run, args=(i, kind, pause), daemon=True, name=f"{kind}-{i}")
                        for i, (kind, pause) in enumerate(plan)]

    def __enter__(self) -> "RedisCallers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, i: int, kind: str, pause: float) -> None:
        import redis

        client = self.clients[i]
        while not self.stopped.is_set():
            began = time.monotonic()
            try:
                if kind == "slow":
                    client.execute_command("DEBUG", "SLEEP", str(self.slow_s))
                version = client.get("release").decode()
                with self.lock:
                    self.calls[kind] += 1 + (kind == "slow")
                    self.versions[version] += 1
                    self.last[i] = version
                    self.slowest = max(self.slowest, time.monotonic() - began)
            except redis.RedisError as e:
                with self.lock:
                    self.calls[kind] += 1
                    self.failures[(kind, type(e).__name__)] += 1
                    if len(self.examples) < 20:
                        self.examples.append(f"{kind}: {e!r} after {time.monotonic() - began:.3f}s")
            if pause:
                self.stopped.wait(pause)

    def failed(self, *kinds: str) -> int:
        return sum(n for (kind, _), n in self.failures.items() if not kinds or kind in kinds)

    def all_on(self, build: str) -> bool:
        """Every caller's last answer came from `build`."""
        with self.lock:
            return len(self.last) == len(self.threads) and set(self.last.values()) == {build}

    def close(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(60)
        for c in {id(c): c for c in self.clients}.values():
            c.connection_pool.disconnect()
