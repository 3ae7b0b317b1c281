"""The active app's listening sockets, copied and kept by the daemon, so that its death resets
nothing nginx sent it in the last moments.

A killed process keeps its listening socket for the milliseconds the kernel takes to tear it
down, and accepts connections meanwhile; the teardown then resets them unread, and nginx cannot
tell such a reset from an app that read the request and died (so it counts them lost). With a
copy of the listener held here, the socket outlives the app: what nginx connects before it hears
of the death waits in the listen queue, and once nginx holds new requests (the daemon's `down`),
each of those connections is accepted here and relayed, bytes as they are, to nginx's hold
server, which sends the request on to the build that serves next. A hung app's queue (what it
never accepted) is handed over the same way.

The copy is dropped whenever the app stops being the one that serves, before any deliberate
stop, and before its port is needed again; a copy that cannot be taken (another user's process)
leaves things as they were without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from . import copies, sockets
from .slots import AppProcess, holders

log = logging.getLogger("bluegreen")
QUIET = 0.2  # seconds with nothing new in the queue after nginx was told: the hand-over is over
CHUNK = 65536


class Catcher:
    def __init__(self) -> None:
        self.pid = 0  # the app whose listeners are copied (0: none)
        self.tried = 0  # the last app a copy was tried for (once per process: a scan of /proc)
        self.port = 0
        self.socks: list[socket.socket] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.handing: dict[int, list[socket.socket]] = {}  # port -> listeners being handed over now

    def keep(self, app: AppProcess | None) -> None:
        """Copy `app`'s listening sockets (once per process); a copy of another app's is dropped."""
        if app is None or app.pid in (self.pid, self.tried) or not app.alive():
            return
        self.drop()
        self.tried = app.pid  # (a copy that cannot be taken is not tried again at every look)
        try:
            inodes = {c.inode for c in sockets.listening(app.port)}
            owned = copies.owners(holders(app))  # (never the daemon itself)
            socks = [copies.take(*owned[inode], inode) for inode in inodes if inode in owned]
        except OSError as e:
            log.debug("no copy of %s's listener (pid %d): %s", app.slot, app.pid, e)
            return
        self.pid, self.port, self.socks = app.pid, app.port, socks

    def drop(self, pid: int | None = None) -> None:
        """Close our copies (of `pid`'s listeners only, if given): the app's own stay its own."""
        if pid is not None and pid != self.pid:
            return
        for s in self.socks:
            s.close()
        self.pid, self.port, self.socks, self.tried = 0, 0, [], 0

    def free(self, port: int) -> None:
        """`port` is needed for a new start: nothing of ours may listen there any more."""
        if self.port == port:
            self.drop()
        for s in self.handing.pop(port, []):
            s.close()

    def hand_over(self, pid: int, to: tuple[str, int]) -> None:
        """`pid` died (or hung) and nginx now holds new requests: every connection waiting in its
        listen queue, and any that still arrives, is relayed to `to` (the hold server)."""
        if pid != self.pid or not self.socks:
            return
        port, socks = self.port, self.socks
        self.pid, self.port, self.socks = 0, 0, []
        self.handing[port] = socks
        task = asyncio.ensure_future(self._hand_over(port, socks, to))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _hand_over(self, port: int, socks: list[socket.socket], to: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        caught = 0
        try:
            for s in socks:
                s.setblocking(False)
            while True:
                accepts = [asyncio.ensure_future(loop.sock_accept(s)) for s in socks]
                done, pending = await asyncio.wait(accepts, timeout=QUIET, return_when=asyncio.FIRST_COMPLETED)
                for a in pending:
                    a.cancel()
                got = [a.result()[0] for a in done if not a.cancelled() and a.exception() is None]
                for a in pending:  # one accepted as it was cancelled is not lost
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        got.append((await a)[0])
                if not got:
                    break
                for conn in got:
                    caught += 1
                    relay = asyncio.ensure_future(_relay(conn, to))
                    self.tasks.add(relay)
                    relay.add_done_callback(self.tasks.discard)
        except OSError:  # closed under us: its port is needed again (free)
            pass
        finally:
            for s in self.handing.pop(port, socks):
                s.close()
        if caught:
            log.info("%d connection(s) nginx had sent to the dead app's port, unread, handed to the hold server",
                     caught)

    async def close(self) -> None:
        """The daemon stops: no copy outlives it, no relay is left half way."""
        self.drop()
        for socks in self.handing.values():
            for s in socks:
                s.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _relay(conn: socket.socket, to: tuple[str, int]) -> None:
    """Bytes both ways between a connection nginx opened to the dead app and the hold server,
    each side's end passed on as an end."""
    conn.setblocking(False)
    writers: list[asyncio.StreamWriter] = []
    try:
        r1, w1 = await asyncio.open_connection(sock=conn)
        writers.append(w1)
        r2, w2 = await asyncio.open_connection(*to)
        writers.append(w2)
        await asyncio.gather(_pump(r1, w2), _pump(r2, w1))
    except OSError:
        pass
    finally:
        if not writers:
            conn.close()
        for w in writers:
            w.close()


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(CHUNK):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except OSError:
        pass
