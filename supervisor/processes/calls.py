"""Moving a TCP service's pooled connections off the old build between two calls, and counting
exactly what that cost (the drain of an app.protocol = "tcp" service).

A thread holds a copy of each of the old build's connections (copies.py) and reads its tcp_info
every POLL (getsockopt on the copy: exact counters, no scan of the host). A connection is closed
(the app's write side shut: nginx passes the end on, the client's pool sees it before its next
call and opens a connection to the new build) when it is between two calls (tcpinfo.at_rest), no
byte moved for QUIET, and its own rhythm says the rest will last longer than the close takes to
reach the client (its last rests were all MARGIN longer than this one so far; or it has rested
RESTED already: a pool's spare). No close is safe on a connection whose rests are shorter than
that (a pool that calls back to back): it waits for the deadline.

What a close cost is checked, never assumed. The close is decided on a reading; a call that
reaches the app after that reading (in the microseconds before the close, or sent by a client
that took the connection from its pool just before the close reached it) cannot be answered any
more. Each closed connection is watched until its client lets go (or SETTLE): a byte that came
in after the decision is a cut call, and counted so. nginx must pass a client's bytes on after
the app's side closed (`proxy_half_close on`: the managed nginx has it) for every such call to
reach the app and be counted. A close is proven clean only once its client let go of the
connection having sent nothing (a pool that checks a connection before it lends it); one whose
client had not come back within SETTLE is counted apart, as unconfirmed.

After the deadline (the drain's grace), a connection that never rests (calls back to back) is
closed at its next answer, or, QUEUED later, wherever it is: the call it was in is cut, and
counted. Clients that pipeline calls (several on a connection before their answers) make a rest
unprovable: with `pipelined`, every connection waits for the deadline and its close is counted
as possibly cutting calls.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from . import copies, sockets, tcpinfo

log = logging.getLogger("bluegreen")

POLL = 0.0005  # seconds between two readings of every connection held
QUIET = 0.001  # no byte in or out for this long before a close (an answer written in several parts)
MARGIN = 0.003  # a rest must be expected to last this much longer: the close's way to the client, and its check
RESTED = 0.05  # a connection at rest this long is a pool's spare: closed whatever its rhythm
RHYTHM = 3  # how many of its last rests a connection's rhythm is read from
SETTLE = 1.0  # how long a closed connection is watched for a call that reached it after the close
QUEUED = 0.5  # past the deadline, how long a busy connection gets to reach its next answer
DISCOVER = 0.05  # seconds between two looks for connections not held yet
UNOWNED = 1.0  # how long a connection no process of the old build holds is looked for again


@dataclass
class Held:
    conn: sockets.Conn
    sock: socket.socket
    last: tcpinfo.TcpInfo
    moved: float  # when its traffic last changed (as far as the readings tell)
    resting: float | None = None  # when its current rest began (None: in a call)
    rests: deque[float] = field(default_factory=lambda: deque(maxlen=RHYTHM))  # its last rests' lengths
    closed: float | None = None
    decided: tcpinfo.TcpInfo | None = None  # the reading the close was decided on
    anchor: tcpinfo.TcpInfo | None = None  # its last reading proven at rest
    in_flight: bool = False  # closed with a call proven in flight (past the deadline)
    unknown: bool = False  # closed past the deadline, whether a call was in flight not known



@dataclass
class Tally:
    """What became of the old build's connections, for the drain line."""

    between_calls: int = 0  # closed between two calls, no call came after, its client let go: proven clean
    unconfirmed: int = 0  # closed between two calls, its client not back within SETTLE: its next call may fail
    cut_in_flight: int = 0  # closed past the deadline with a call in flight: that call is lost
    cut_arrived: int = 0  # a call reached the app after its connection's close was decided: lost
    unknown: int = 0  # closed past the deadline not knowing whether a call was in flight: one may be lost
    ended: int = 0  # closed by their client (or the app) before the daemon closed them
    unreachable: dict[str, int] = field(default_factory=dict)  # no copy could be taken: why -> how many

    @property
    def cut(self) -> int:
        return self.cut_in_flight + self.cut_arrived

    @property
    def closed(self) -> int:
        """Connections the drain closed, however it went."""
        return self.between_calls + self.unconfirmed + self.cut + self.unknown


class CallDrain(threading.Thread):
    """The connections on `port` (from nginx's TCP address), held by the processes `holders()`
    names, closed between two calls; `deadline` (monotonic) ends the wait for rest."""

    def __init__(self, port: int, holders: Callable[[], set[int]], deadline: float, pipelined: bool = False) -> None:
        super().__init__(name=f"bluegreen-calls-{port}", daemon=True)
        self.port, self.holders, self.deadline = port, holders, deadline
        self.pipelined = pipelined  # its clients queue calls behind an answer: no rest proves anything
        self.lock = threading.Lock()
        self.tally = Tally()
        self.held: dict[int, Held] = {}  # by inode
        self.given_up: set[int] = set()  # inodes no copy could be taken of
        self.done: set[int] = set()  # inodes already counted (a socket lingers in the dumps a while)
        self.unowned: dict[int, float] = {}  # inode -> when it was first found held by no process
        self.open_count = 0  # connections not closed yet (held or not)
        self.looked = False  # the first look for connections is done
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    # --- read by the drain's loop

    def settled(self) -> bool:
        """It has looked, and there is nothing left to close or to watch."""
        with self.lock:
            return self.looked and not self.held and not self.open_count

    def snapshot(self) -> Tally:
        with self.lock:
            t = self.tally
            return Tally(t.between_calls, t.unconfirmed, t.cut_in_flight, t.cut_arrived, t.unknown, t.ended,
                         dict(t.unreachable))

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)

    # --- the thread

    def run(self) -> None:
        next_look = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_look:
                    self.discover()
                    next_look = now + DISCOVER
                for held in list(self.held.values()):
                    self.step(held, now)
                time.sleep(POLL)
        except BaseException as e:  # never let a bug leave copies open
            self.error = e
            log.exception("the TCP drain of port %d failed", self.port)
        finally:
            for held in list(self.held.values()):
                self.release(held)

    def discover(self) -> None:
        """Take a copy of every connection from nginx to the old build not held yet. One no process
        holds yet (in the old build's accept queue, or passed from a cluster's primary to a worker)
        is looked for again, for UNOWNED at most."""
        conns = [c for c in sockets.connections(self.port) if sockets.long_lived_kind(c) == "tcp"]
        skip = self.given_up | self.done
        fresh = [c for c in conns if c.inode not in self.held and c.inode not in skip]
        where = copies.owners(self.holders()) if fresh else {}
        now = time.monotonic()
        for conn in fresh:
            why = None
            try:
                if conn.inode not in where:
                    raise copies.Replaced(0, "no process of the old build holds it")
                sock = copies.take(*where[conn.inode], conn.inode)
                info = tcpinfo.read(sock)
                if info is None:
                    sock.close()
                    why = "this kernel's tcp_info has no byte counters (Linux 4.19 or later needed)"
                else:
                    self.held[conn.inode] = Held(conn, sock, info, now)
            except copies.Replaced as e:  # not where the scan saw it (yet): again at the next look
                if now - self.unowned.setdefault(conn.inode, now) >= UNOWNED:
                    why = e.strerror if e.errno == 0 else "no process of the old build holds it"
            except OSError as e:
                why = f"no copy of its socket ({e.strerror or e})"
            if why:
                self.given_up.add(conn.inode)
                with self.lock:
                    self.tally.unreachable[why] = self.tally.unreachable.get(why, 0) + 1
        with self.lock:
            self.open_count = sum(1 for c in conns if c.inode not in skip and
                                  (c.inode not in self.held or self.held[c.inode].closed is None))
            self.looked = True

    def step(self, held: Held, now: float) -> None:
        """One reading of one connection: close it, count what its close cost, or let it go."""
        try:
            info = tcpinfo.read(held.sock)
        except OSError:
            info = None
        if info is None:
            self.release(held)
            return
        rest = self.at_rest(held, info)
        if not info.same_traffic(held.last):
            held.moved = now
            if held.resting is not None:
                held.rests.append(now - held.resting)
        held.resting = (held.resting or now) if rest and info.same_traffic(held.last) else None
        held.last = info
        if held.closed is None:
            if info.state != tcpinfo.ESTABLISHED:  # its client or the app closed it first
                with self.lock:
                    self.tally.ended += 1
                self.release(held)
            elif rest and (now >= self.deadline or (not self.pipelined and self.will_rest(held, now))):
                held.unknown = self.pipelined  # calls may wait behind the answer this rest follows
                self.close(held, info, now)
            elif now >= self.deadline + QUEUED:
                held.in_flight, held.unknown = info.in_call, not info.in_call
                self.close(held, info, now)
            return
        assert held.decided is not None
        if info.state == tcpinfo.CLOSE or now - held.closed >= SETTLE:
            self.settle(held, info)

    @staticmethod
    def at_rest(held: Held, info: tcpinfo.TcpInfo) -> bool:
        """Between two calls: proven by this reading (tcpinfo.at_rest), or, when its times tie,
        by as many segments in as out since its last proven rest."""
        if info.at_rest:
            held.anchor = info
            return True
        return info.answered is None and held.anchor is not None and info.balanced_since(held.anchor)

    @staticmethod
    def will_rest(held: Held, now: float) -> bool:
        """Its rest so far is long enough to be one (QUIET), and will last long enough for a close."""
        rested = now - held.moved
        if rested < QUIET:
            return False
        return rested >= RESTED or (len(held.rests) == RHYTHM and min(held.rests) >= rested + MARGIN)

    def close(self, held: Held, info: tcpinfo.TcpInfo, now: float) -> None:
        held.decided, held.closed = info, now
        try:
            held.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed by its peer: the next reading says so

    def settle(self, held: Held, info: tcpinfo.TcpInfo) -> None:
        """The closed connection's client let go (or SETTLE passed): count it; end what is left."""
        if info.state != tcpinfo.CLOSE:  # its client never came back to it: nothing more can reach it
            sockets.destroy([held.conn])
        with self.lock:
            if held.in_flight:
                self.tally.cut_in_flight += 1
            elif info.data_in - held.decided.data_in > info.data_out - held.decided.data_out:
                # more calls came in after the decision than answers went out (before the close)
                self.tally.cut_arrived += 1
            elif held.unknown:
                self.tally.unknown += 1
            elif info.state == tcpinfo.CLOSE:  # its client saw the close and let go, having sent nothing
                self.tally.between_calls += 1
            else:  # its client has not come back to it: a call it sends without checking first will fail
                self.tally.unconfirmed += 1
        self.release(held)

    def release(self, held: Held) -> None:
        held.sock.close()  # our copy only
        self.done.add(held.conn.inode)
        with self.lock:
            self.held.pop(held.conn.inode, None)
