"""Closing an app's long-lived connections from outside it, with their protocol's goodbye only
where it is proven safe.

The daemon takes a copy of the app's own socket (copies.py: checked to still be the connection
chosen), and shuts its write side: nginx reads an orderly end of stream and passes it on. Before
that it may write a goodbye, in one write (the kernel never interleaves it with the app's own):

- a WebSocket: a close frame, code 1001 "going away" (what a server sends when it goes down),
  only on a connection nginx switched to a WebSocket: nginx sets TCP_NODELAY on its own side of
  an upstream connection when the app answered 101 Switching Protocols, and only then
  (upgraded()). A request that merely asked for an upgrade is no WebSocket;
- and only at a proven frame boundary: the app sent nothing for FRAME_QUIET and nothing it
  wrote is still queued, so its last frame is whole (an app that sends now and then is watched
  for such a pause for up to FRAME_WAIT).

Everything else is cut, and counted so: a connection with no proven boundary (an app that
writes all the time, or a client that does not read), a listed path (an HTTP long poll or event
stream, whose framing nothing outside the app knows), a gRPC call on a listed path (its goodbye
would have to know whether the call's response headers were sent: nothing outside the app
proves it, and a wrong guess is a 502 from nginx). Where no copy can be taken (no permission,
the app gone), the connection is destroyed (sockets.destroy: a reset). The write side is shut
only: a client's own close frame in answer is still read.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from dataclasses import dataclass

from . import copies, sockets, tcpinfo

WEBSOCKET_GOING_AWAY = b"\x88\x0c\x03\xe9going away"  # FIN + close, 12 bytes: code 1001, its reason
FRAME_QUIET = 0.02  # seconds the app must have sent nothing for its last frame to count as whole
FRAME_WAIT = 0.5  # how long a connection is watched for such a pause (an app that writes all the time)
LOOK = 0.005  # seconds between two readings while waiting for it


@dataclass
class Closed:
    """What closing a batch of connections did."""

    clean: int = 0  # closed with their protocol's goodbye
    cut: int = 0  # closed without one (cut, or reset)
    unclean: str = ""  # why some were cut or reset
    failed: str = ""  # why some could not be closed at all ("" if none)
    gone: int = 0  # closed by their peer before the daemon came to them


def upgraded(conns: list[sockets.Conn], port: int, nginx: set[int]) -> set[int]:
    """The app-side inodes of those of `conns` (on the app's `port`) that nginx (its processes
    `nginx`) switched to a WebSocket: its own side of each carries TCP_NODELAY."""
    # (by address and port: nginx binds no port, so one port number serves several source addresses)
    wanted = {(c.remote.removeprefix("::ffff:"), c.remote_port): c.inode for c in conns}
    theirs = {(c.local, c.local_port): c.inode for c in sockets.peers(port) if (c.local, c.local_port) in wanted}
    where = copies.owners(nginx) if theirs else {}
    proven = set()
    for end, inode in theirs.items():
        if inode not in where:
            continue
        try:
            sock = copies.take(*where[inode], inode)
        except OSError:
            continue
        try:
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                proven.add(wanted[end])
        except OSError:
            pass
        finally:
            sock.close()
    return proven


async def close(conns: list[sockets.Conn], goodbye: bytes, pids: set[int]) -> Closed:
    """Close `conns`, held by the processes `pids` serving their port, each with `goodbye` (b"":
    none) where its app's last frame is proven whole."""
    out = Closed()
    where = copies.owners(pids) if conns else {}
    held: list[tuple[sockets.Conn, socket.socket, tcpinfo.TcpInfo | None]] = []
    rest: list[sockets.Conn] = []
    try:
        for conn in conns:
            if conn.inode not in where:  # not accepted yet, or closed since it was listed (destroy tells)
                rest.append(conn)
                continue
            try:
                sock = copies.take(*where[conn.inode], conn.inode)
            except copies.Replaced:
                out.gone += 1  # its fd names another file now: this connection is closed already
                continue
            except OSError as e:
                rest.append(conn)
                out.unclean = out.unclean or f"reset: no copy of its socket ({e.strerror})"
                continue
            held.append((conn, sock, _reading(sock)))
        await _at_boundaries(held, goodbye, out)
    finally:
        for _, sock, _ in held:
            sock.close()  # our copies only: the app's descriptors stay its own
    if rest:
        reset, gone, out.failed = sockets.destroy(rest)
        out.cut += reset
        out.gone += gone
        if reset and not out.unclean:
            out.unclean = "reset: no process serving the port holds it (not accepted yet)"
    return out


async def _at_boundaries(held: list[tuple[sockets.Conn, socket.socket, tcpinfo.TcpInfo | None]], goodbye: bytes,
                         out: Closed) -> None:
    """End each connection: with `goodbye` as soon as its app has been quiet for FRAME_QUIET with
    nothing queued (readings every LOOK, for up to FRAME_WAIT), else without it, then."""
    pending = {id(sock): (conn, sock, first, time.monotonic()) for conn, sock, first in held}
    deadline = time.monotonic() + (FRAME_WAIT if goodbye else 0.0)
    while pending:
        now = time.monotonic()
        for key, (conn, sock, last, since) in list(pending.items()):
            reading = _reading(sock)
            if reading is None or last is None or reading.bytes_sent != last.bytes_sent or reading.not_sent:
                pending[key] = (conn, sock, reading, now)  # it moved (or is writing): its pause starts again
                if now < deadline:
                    continue
            elif now - since < FRAME_QUIET and now < deadline:
                continue
            del pending[key]
            whole = reading is not None and last is not None and reading.bytes_sent == last.bytes_sent \
                and not reading.not_sent and now - since >= FRAME_QUIET
            _end(conn, sock, goodbye if whole else b"", bool(goodbye), out, reading.not_sent if reading else 0)
        if pending:
            await asyncio.sleep(LOOK)


def _reading(sock: socket.socket) -> tcpinfo.TcpInfo | None:
    try:
        return tcpinfo.read(sock)
    except OSError:
        return None


def _end(conn: sockets.Conn, sock: socket.socket, goodbye: bytes, wanted: bool, out: Closed, queued: int) -> None:
    """Write `goodbye` (b"": none), shut the write side, and count what it was."""
    said = False
    try:
        if goodbye:  # a few bytes into an empty send queue: all of them, or none
            said = sock.send(goodbye, socket.MSG_DONTWAIT) == len(goodbye)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        # nginx may have read the goodbye and closed its side before our shutdown: the end we meant
        if not (said and e.errno in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)):
            out.cut += 1
            out.unclean = out.unclean or f"cut: {e.strerror}"
            return
    if said:
        out.clean += 1
        return
    out.cut += 1
    if not out.unclean:
        out.unclean = (f"cut with {queued} bytes still queued for a client that does not read" if wanted and queued
                       else "cut: the app was still writing (no whole frame to write its goodbye after)" if wanted
                       else "cut: no goodbye is proven safe for it")
