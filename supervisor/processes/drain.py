"""Draining: waiting until the proxy and the app have both let go of the old port, the app's
connections counted from outside it (sockets.py).

Short requests are waited for, up to drain.timeout. Long-lived ones (WebSockets, event streams,
listed paths: nginx connects them from their own loopback address, sockets.LONG_LIVED) would
hold a release for as long as a client stays: they get drain.long_lived_grace to end by
themselves, then the daemon closes them (goodbye.py: with their protocol's goodbye where it
can) and their clients reconnect, to the new build. Neither waits for the other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Protocol

from . import calls, goodbye, sockets

CUT_SETTLE = 1.0  # seconds the proxy gets to let go once the long-lived connections it held are closed
QUEUED = 0.5  # seconds past the grace a connection with data still queued gets to send it (then its goodbye)
GOODBYE = {"websocket": goodbye.WEBSOCKET_GOING_AWAY}  # the only kind whose goodbye can be proven safe


class Watched(Protocol):
    def alive(self) -> bool: ...


class Drain:
    """One drain of `port`: the proxy's release (a task), the kernel's view of the port's
    connections, the two deadlines, and what was closed."""

    def __init__(self, port: int, timeout: float, grace: float, interval: float,
                 holders: Callable[[], set[int]] | None = None, nginx: Callable[[], set[int]] = set) -> None:
        self.port, self.interval = port, interval
        self.holders = holders or (lambda: sockets.listening_pids(port))
        self.nginx = nginx  # nginx's processes (its side of each connection proves a WebSocket)
        self.unproven: set[int] = set()  # asked for a WebSocket, never switched to one: short requests
        self.began = time.monotonic()
        self.deadline = self.began + timeout  # short requests
        self.long_deadline = self.began + grace  # long-lived ones
        self.cut: dict[str, int] = {}
        self.cut_why = ""
        self.ended = 0  # long-lived connections that closed by themselves within the grace
        self.seen: set[int] = set()  # the long-lived connections open at the last look (inodes)
        self.tried: set[int] = set()  # the ones the daemon tried to close
        self.late: int | None = None  # short connections still open at drain.timeout (None: not reached)
        self.held_late = False  # the proxy still held on to the port at drain.timeout
        self.calls: calls.CallDrain | None = None  # a TCP service's connections, closed between two calls
        self.clean = 0  # long-lived connections closed with their protocol's goodbye (not a reset)
        self.unclean = ""  # why some were cut or reset instead
        self.pids: set[int] | None = None  # the processes serving the port (a /proc scan: once)

    def open(self) -> tuple[int, dict[str, list[sockets.Conn]]]:
        """(short connections in flight, long-lived ones by kind) on the port now."""
        short, long = 0, {}
        for conn in sockets.connections(self.port):
            kind = sockets.long_lived_kind(conn)
            if kind is None or conn.inode in self.unproven:
                short += 1
            else:
                long.setdefault(kind, []).append(conn)
        return short, long

    def serving(self) -> set[int]:
        """The processes of the old build (its listener's, and those its slot's markers name: a
        cluster's workers may not hold the listener): theirs are the sockets to close."""
        if self.pids is None:
            self.pids = self.holders()
        return self.pids

    async def close_long_lived(self, long: dict[str, list[sockets.Conn]], now: float) -> bool:
        """The grace is over: close what is left (once each); count by kind what was closed. A
        connection whose app still has data queued (a peer slow for a moment) gets up to QUEUED
        more, so that its goodbye can follow; True while some wait so. A request that asked for a
        WebSocket and was not switched to one (goodbye.upgraded) is a short request after all: it
        is waited for up to drain.timeout, like any."""
        waiting = False
        for kind, all_conns in long.items():
            conns = [c for c in all_conns if c.inode not in self.tried]
            if kind == "websocket" and conns:
                proven = goodbye.upgraded(conns, self.port, self.nginx())
                self.unproven.update(c.inode for c in conns if c.inode not in proven)
                conns = [c for c in conns if c.inode in proven]
            if now < self.long_deadline + QUEUED and any(c.not_sent for c in conns):
                waiting = True
                conns = [c for c in conns if not c.not_sent]
            self.tried.update(c.inode for c in conns)
            if not conns:
                continue
            closed = await goodbye.close(conns, GOODBYE.get(kind, b""), self.serving())
            self.unclean = self.unclean or closed.unclean
            if closed.clean + closed.cut:
                self.cut[kind] = self.cut.get(kind, 0) + closed.clean + closed.cut
            self.clean += closed.clean
            self.ended += closed.gone
            self.cut_why = self.cut_why or closed.failed
        self.seen = set()
        return waiting

    def report(self, proxy_s: float | None, held: int, died: bool) -> dict[str, Any]:
        """What the drain did, for the swap's drain line: what drain.timeout left running, what
        was closed and how."""
        short, long = (0, {}) if died else self.open()
        tally = calls.Tally()
        if self.calls is not None:
            long.pop("tcp", None)  # the call drain's: counted by it
            tally = self.calls.snapshot()
        if self.late is not None:  # the short requests still running at drain.timeout, even if they ended since
            short, held_late = max(short, self.late), self.held_late
        else:
            held_late = bool(held)
        return {
            "workers_wait": round(proxy_s if proxy_s is not None else time.monotonic() - self.began, 4),
            "old_workers_left": held,
            "still_open": short,  # short connections the old build still had at drain.timeout (its stop decides)
            # (old nginx workers still holding the connections the drain closed at the grace hold no request)
            "timed_out": bool(short or (held_late and not self.cut and not tally.closed)) and not died,
            "long_lived_cut": self.cut,  # by kind: closed by the daemon at the grace
            "long_lived_clean": self.clean,  # of those, closed with their protocol's goodbye
            "not_clean_why": self.unclean,  # why the others were cut or reset
            "long_lived_ended": self.ended + tally.ended,  # closed by the client or the app within the grace
            "not_websockets": len(self.unproven),  # asked for a WebSocket, never switched to one: drained as requests
            "closed_between_calls": tally.between_calls,  # a TCP service's: proven to cut no call
            "closed_unconfirmed": tally.unconfirmed,  # closed between two calls, their clients not back yet
            "calls_cut": tally.cut,  # a TCP service's calls lost to a close (each counted, never assumed)
            "calls_cut_in_flight": tally.cut_in_flight,  # of those: in flight at the grace
            "calls_cut_arrived": tally.cut_arrived,  # of those: reached the app as its connection closed
            "calls_unknown": tally.unknown,  # closed at the grace, a call in flight neither proven nor ruled out
            "long_lived_left": sum(len(c) for c in long.values()) + sum(tally.unreachable.values()),
            "cut_error": "; ".join(filter(None, [self.cut_why, *(f"{n} {why}" for why, n in tally.unreachable.items())])),
            "died": died,
            "after": time.monotonic() - self.began,
        }

    def count_ended(self, long: dict[str, list[sockets.Conn]]) -> None:
        """Count the long-lived connections seen before and gone now, before any was closed by us."""
        now = {c.inode for conns in long.values() for c in conns}
        if not self.cut:
            self.ended += len(self.seen - now)
        self.seen = now


async def wait_drained(port: int, wait_released: Callable[[int, float], Awaitable[int]], timeout: float,
                       interval: float, watch: Watched | None = None, grace: float | None = None,
                       protocol: str = "http", holders: Callable[[], set[int]] | None = None,
                       nginx: Callable[[], set[int]] = set, pipelined: bool = False) -> dict[str, Any]:
    """Wait until the proxy sends `port` no more short requests (`wait_released`: old nginx
    workers exited, or nginx counts none in flight to it) and the port has no short connection
    in flight, both within `timeout`; close the long-lived connections that outlive `grace`
    (default: `timeout`). Report what was left and what was closed. Stops early if `watch` (the
    new build) dies: waiting would only prolong an outage. A TCP service's connections are
    closed between two calls by a calls.CallDrain, which counts what each close cost."""
    d = Drain(port, timeout, timeout if grace is None else grace, interval, holders, nginx)
    end = max(d.deadline, d.long_deadline)
    if protocol == "tcp":
        d.calls = calls.CallDrain(port, d.serving, d.long_deadline, pipelined)
        d.calls.start()
        end = max(d.deadline, d.long_deadline + calls.QUEUED + calls.SETTLE)
    proxy = asyncio.ensure_future(wait_released(port, end + CUT_SETTLE))
    died, proxy_s = False, None
    try:
        while True:
            if watch is not None and not watch.alive():
                died = True
                break
            now = time.monotonic()
            if proxy.done() and proxy_s is None:
                proxy_s = now - d.began
            short, long = d.open()
            closing = d.calls is not None and not d.calls.settled()
            long.pop("tcp", None)  # the call drain's
            d.count_ended(long)
            queued = False
            if long and now >= d.long_deadline:
                queued = await d.close_long_lived(long, now)
                long = {}
            if now >= d.deadline and d.late is None:  # what drain.timeout leaves to the stop signal
                d.late, d.held_late = short, not proxy.done()
            if proxy.done() and not short and not long and not queued and not closing:
                break
            # Past both deadlines: done, unless old nginx workers (no short request left) are letting
            # go of the long-lived connections just closed.
            settling = (d.cut or d.calls) and not proxy.done() and not short and now < end + CUT_SETTLE
            if now >= end and not settling and not queued:
                break
            if proxy.done():
                await asyncio.sleep(interval)
            else:
                await asyncio.wait({proxy}, timeout=interval)
    finally:
        proxy.cancel()
        if d.calls is not None:
            await asyncio.get_running_loop().run_in_executor(None, d.calls.stop)
    held = proxy.result() if proxy.done() and not proxy.cancelled() else 0
    return d.report(proxy_s, held, died)
