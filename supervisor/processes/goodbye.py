"""Closing an app's connections from outside it, cleanly where the protocol allows.

The daemon takes a copy of the app's own socket (pidfd_getfd: root, or the app's user where the
kernel lets it trace its own processes), writes the protocol's goodbye on it, and shuts it down:
the peer (nginx) reads the goodbye, then an orderly end of stream, and passes both on.

- a WebSocket: a close frame, code 1001 "going away" (what a server sends when it goes down);
- an event stream: the last chunk of the chunked answer, so nginx ends the client's answer
  properly (an EventSource then reconnects after its retry delay);
- a gRPC call on a listed path (a stream): its trailers, grpc-status 14 UNAVAILABLE "going
  away", which clients retry (nginx opens one HTTP/2 connection per call to the app: stream 1);
- a TCP service's connection between two calls: the orderly end, which its pool expects.

The goodbye is written only when everything the app wrote has been sent (so it cannot land
inside a message still queued), in one write, which the kernel never interleaves with the app's
own writes. Otherwise the connection is cut, and counted so: a client that does not read (data
still queued for it), an HTTP long poll or a TCP call in flight (no goodbye exists for them).
Where no copy can be taken (no permission, the app gone), it is destroyed (sockets.destroy: a
reset). The write side is shut only: a client's own close frame in answer is still read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

from . import procs, sockets
from .grpc_health import END_HEADERS, END_STREAM, HEADERS, frame, literal

SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux added it to after 5.6
WEBSOCKET_GOING_AWAY = b"\x88\x0c\x03\xe9going away"  # FIN + close, 12 bytes: code 1001, its reason
GRPC_GOING_AWAY = frame(HEADERS, END_STREAM | END_HEADERS, 1,
                        literal("grpc-status", "14") + literal("grpc-message", "going away: a new build serves"))
GOODBYE = {"websocket": WEBSOCKET_GOING_AWAY, "event-stream": b"0\r\n\r\n"}


def goodbye_of(kind: str, protocol: str) -> bytes:
    """What a connection of `kind` to an app speaking `protocol` is told before it is closed."""
    return GRPC_GOING_AWAY if protocol == "grpc" and kind == "path" else GOODBYE.get(kind, b"")


_libc = ctypes.CDLL(None, use_errno=True)


def _copy(pid: int, fd: int) -> socket.socket:
    """A copy of `pid`'s file descriptor `fd`, as a socket of ours. Raises OSError."""
    pidfd = os.pidfd_open(pid)
    try:
        ours = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ours < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=ours)


def owners(pids: set[int]) -> dict[int, tuple[int, int]]:
    """Socket inode -> (pid, fd) for the processes serving a port (sockets.listening_pids)."""
    found: dict[int, tuple[int, int]] = {}
    for pid in pids:
        for inode, fd in procs.socket_fds(pid).items():
            found.setdefault(inode, (pid, fd))
    return found


def close(conns: list[sockets.Conn], kind: str, pids: set[int], protocol: str = "http",
          between_calls: bool = False) -> tuple[int, int, str, str]:
    """Close `conns` (of one kind), held by the processes `pids` serving their port. Returns
    (closed cleanly: with their protocol's goodbye, or between two calls; closed otherwise: cut
    or reset; why some were not closed cleanly; why some could not be closed at all: "" if none)."""
    where = owners(pids) if conns else {}
    clean, cut, rest, unclean = 0, 0, [], ""
    goodbye = goodbye_of(kind, protocol)
    for conn in conns:
        queued = bool(conn.not_sent)
        if conn.inode not in where:
            problem: str | None = "no process serving the port holds it"
        else:
            said, problem = _say_goodbye(*where[conn.inode], b"" if queued else goodbye)
        if problem:
            rest.append(conn)
            unclean = unclean or f"reset: {problem}"
        elif (said and goodbye) or (between_calls and not queued):
            clean += 1
        else:
            cut += 1
            unclean = unclean or (f"cut with {conn.not_sent} bytes still queued for a client that does not read"
                                  if queued else f"a {kind} connection has no goodbye: cut")
    reset, why = sockets.destroy(rest) if rest else (0, "")
    return clean, cut + reset, unclean, why


def _say_goodbye(pid: int, fd: int, goodbye: bytes) -> tuple[bool, str | None]:
    """Write `goodbye` (b"": none) and shut the connection's write side: (whether the goodbye went
    out whole, what went wrong: None if nothing)."""
    try:
        sock = _copy(pid, fd)
    except OSError as e:
        return False, f"no copy of pid {pid}'s socket ({e.strerror})"
    said = False
    try:
        if goodbye:  # a few bytes into an empty send queue: all of them, or none
            said = sock.send(goodbye, socket.MSG_DONTWAIT) == len(goodbye)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        # nginx may have read the goodbye and closed its side before our shutdown: that is the end we meant
        if not (said and e.errno in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)):
            return False, f"pid {pid}'s socket: {e.strerror}"
    finally:
        sock.close()  # our copy only: the app's descriptor stays its own
    return said, None
