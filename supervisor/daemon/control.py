"""The control socket server: read one request line, stream events, write one final reply.

The wire format is in protocol.py. A client that disconnects mid-swap does not stop the
swap; a client that sends nothing is dropped after daemon.client_timeout; a line over the size
limit gets an error and a closed connection. Nothing a client sends can crash the daemon.
Peers are checked with SO_PEERCRED: root, the daemon's user, daemon.allow_users, and members
of daemon.allow_groups / daemon.socket_group; anyone else gets `forbidden`.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

from .. import protocol
from ..client import answering_pid
from ..commands import specs
from ..config.schema import DaemonConfig
from ..errors import BluegreenError, RequestError
from ..processes import procs
from ..release.history import PEER
from ..aio import within

log = logging.getLogger("bluegreen.control")
OUTBOX = 1 << 20  # bytes of progress events a client may leave unread; then they are left out, counted

Reply = Callable[[dict[str, Any]], None]
Handler = Callable[[protocol.Request, Reply], Awaitable[Any]]


class ControlServer:
    def __init__(self, path: Path, handler: Handler, config: DaemonConfig | None = None) -> None:
        self.path = path
        self.handler = handler
        self.config = config or DaemonConfig(socket=path, state_dir=path.parent)
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[Any]] = set()
        self.allowed_uids, self.allowed_gids = self._allowed()

    def _allowed(self) -> tuple[set[int], set[int]]:
        """Root, the daemon's own user, `allow_users`; members of `allow_groups` and `socket_group`."""
        uids = {0, os.geteuid()} | {pwd.getpwnam(u).pw_uid for u in self.config.allow_users}
        groups = list(self.config.allow_groups) + ([self.config.socket_group] if self.config.socket_group else [])
        return uids, {grp.getgrnam(g).gr_gid for g in groups}

    def _peer_allowed(self, peer: dict[str, Any] | None) -> tuple[bool, str]:
        if peer is None:
            return False, "unknown peer"
        pid, uid, gid = peer["pid"], peer["uid"], peer["gid"]
        if uid in self.allowed_uids or gid in self.allowed_gids:
            return True, ""
        if self.allowed_gids & procs.groups(pid):  # the peer process's supplementary groups
            return True, ""
        return False, f"user {peer['user']} (uid {uid})"

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        old = os.umask(0o177)  # the socket is born 0600: only its owner may drive swaps
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=protocol.MAX_LINE + 1,
                                                          backlog=_somaxconn())
        finally:
            os.umask(old)
        if self.config.socket_group:
            os.chown(self.path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
            os.chmod(self.path, 0o660)
        if self.config.allow_users or self.config.allow_groups:
            # Users and groups named one by one: anyone may connect, SO_PEERCRED decides (_peer_allowed)
            # and everyone else is refused with `forbidden`.
            os.chmod(self.path, 0o666)

    def _remove_stale(self) -> None:
        """Remove a socket file no daemon answers on. The state-dir lock does not cover it: two
        configs may name the same daemon.socket, and taking over a live one would send one
        app's releases to the other."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise BluegreenError(f"daemon.socket {self.path} exists and is not a socket; remove it or choose "
                                 "another daemon.socket", code="socket_in_use")
        peer = answering_pid(self.path)
        if peer is not None:
            raise BluegreenError(
                f"another bluegreen daemon answers on {self.path} (pid {peer or '?'}); give this config its own "
                "daemon.socket, or stop that daemon first", code="socket_in_use")
        self.path.unlink()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.connections:  # let replies already written (quit, a cancelled swap's error) reach their clients
            await asyncio.wait(list(self.connections), timeout=1.0)
        for task in list(self.connections):
            task.cancel()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)

        out = Outbox(writer)
        write, reply = out.write, out.progress
        try:
            peer = _peer(writer.get_extra_info("socket"))
            PEER.set(peer)  # who asked, for the history (a swap task started from here inherits it)
            allowed, who = self._peer_allowed(peer)
            if not allowed:
                log.warning("refused a control connection from %s", who)
                raise BluegreenError(f"{who} may not use this socket; allow it with daemon.allow_users or "
                                     "daemon.allow_groups", code="forbidden")
            timeout = self.config.client_timeout
            try:
                line = await within(reader.readuntil(b"\n"), timeout)
            except asyncio.IncompleteReadError as e:
                line = e.partial  # `printf status | socat` sends no newline
                if not line:
                    return
            except asyncio.LimitOverrunError:
                raise RequestError(f"request line is longer than {protocol.MAX_LINE} bytes") from None
            except asyncio.TimeoutError:
                raise RequestError(f"no request line within {timeout:g}s") from None
            request = protocol.parse_request(line, specs())
            result = await self.handler(request, reply)
            write(protocol.success(result))  # the final reply is never left out
        except BluegreenError as e:
            write(protocol.failure(**e.to_dict()))
        except asyncio.CancelledError:
            # The daemon is stopping (its connections are cancelled, or the swap this client waited
            # for was): the client is told; nothing is re-raised into asyncio's connection callback.
            write(protocol.failure("shutting_down", "the daemon is shutting down"))
        except ConnectionError:
            pass  # the client went away
        except Exception as e:  # never let one connection take the daemon down
            log.exception("internal error serving a control request")
            # The exception's text may quote a file's contents: the client gets its kind, the log the rest.
            write(protocol.failure("internal", f"internal error ({type(e).__name__}) serving this request; its "
                                               "details are in the daemon log (bluegreen logs daemon)"))
        finally:
            self.connections.discard(task)
            await _finish(reader, writer)


class Outbox:
    """What one connection sends: progress events are left out (and counted) while the client has
    OUTBOX bytes unread, so that a hook printing fast to a client that does not read cannot grow the
    daemon; the final reply always goes out, after the count of what was left out."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.dropped = 0

    def write(self, message: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return  # the client left; the work it started goes on
        try:
            if self.dropped:
                self.writer.write(protocol.encode({"event": "control", "status": "output", "line": (
                    f"({self.dropped} progress line(s) left out: this client read too slowly)")}))
                self.dropped = 0
            self.writer.write(protocol.encode(message))
        except (ConnectionError, RuntimeError):
            pass

    def progress(self, message: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > OUTBOX:
            self.dropped += 1
            return
        self.write(message)


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Deliver what was written, say EOF, and read what the client still sends before closing:
    closing a Unix socket with unread input resets the peer, which could lose the reply."""
    try:
        await within(writer.drain(), 5)
        if writer.can_write_eof():
            writer.write_eof()
        await within(_discard(reader), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError, asyncio.LimitOverrunError):
        pass
    writer.close()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _peer(sock: socket.socket | None) -> dict[str, Any] | None:
    """The connecting process, from SO_PEERCRED: pid, uid, gid and the user's name."""
    if sock is None:
        return None
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"user": user, "uid": uid, "gid": gid, "pid": pid}


def _somaxconn() -> int:
    """The longest listen backlog the kernel allows: a monitoring loop's burst of status commands
    waits in it instead of being refused (asyncio's default is 100)."""
    try:
        return max(100, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    except (OSError, ValueError):
        return 4096
