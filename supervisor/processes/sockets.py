"""Connections on a port, seen from outside the app, by TCP state; who listens on a port.

The kernel filters for us through NETLINK_SOCK_DIAG (what `ss` uses): a state mask and a
bytecode "local port == P" filter, so one count costs the same with 10 or 10,000 other
sockets on the host. If netlink is unavailable we fall back to parsing /proc/net/tcp{,6}.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from . import procs

# Linux TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING = range(1, 12)
STATE_NAMES = {
    ESTABLISHED: "ESTABLISHED", SYN_RECV: "SYN_RECV", CLOSE_WAIT: "CLOSE_WAIT", LISTEN: "LISTEN",
    SYN_SENT: "SYN_SENT", FIN_WAIT1: "FIN_WAIT1", FIN_WAIT2: "FIN_WAIT2", TIME_WAIT: "TIME_WAIT",
    CLOSE: "CLOSE", LAST_ACK: "LAST_ACK", CLOSING: "CLOSING",
}
# In-flight on the app's side: the app still owes a response (CLOSE_WAIT: the peer hung up,
# the app has not, and is often still working). TIME_WAIT/FIN_WAIT*/LAST_ACK: the app closed.
INFLIGHT_STATES = frozenset({ESTABLISHED, SYN_RECV, CLOSE_WAIT})

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3


@dataclass(frozen=True)
class Conn:
    state: int
    local_port: int
    remote: str
    remote_port: int
    inode: int
    family: int = socket.AF_INET
    sockid: bytes = b""  # the kernel's inet_diag_sockid (netlink only): what SOCK_DESTROY names
    # Between two calls (netlink only, None otherwise): nothing unread, nothing unsent, and the app
    # answered since it last received (or never received anything), as tcp_info's last-data times
    # and data segment counts tell. A request/response connection (a pooled RPC client's) can be
    # closed then without cutting a call; in doubt (a request in several segments), it is not.
    idle: bool | None = None
    not_sent: int | None = None  # bytes the app wrote that the kernel has not sent yet (netlink only)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


INET_DIAG_INFO = 2  # the tcp_info extension: its last-data times and data segment counts


def _request(family: int, port: int, states: frozenset[int], seq: int) -> bytes:
    # Bytecode: accept iff port <= sport <= port. A "no" jump past the end rejects.
    bc = struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, 20) + struct.pack("=BBH", 0, 0, port)
    bc += struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 12) + struct.pack("=BBH", 0, 0, port)
    attr = struct.pack("=HH", 4 + len(bc), INET_DIAG_REQ_BYTECODE) + bc
    mask = 0
    for s in states:
        mask |= 1 << s
    # inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48 bytes, zero)
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), mask) + b"\0" * 48
    body = req + attr
    header = struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def _netlink_dump(family: int, port: int, states: frozenset[int]) -> list[Conn]:
    out: list[Conn] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.sendto(_request(family, port, states, 1), (0, 0))
        while True:
            data = s.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + 16)
                    raise OSError(-errno, os.strerror(-errno))
                if kind == SOCK_DIAG_BY_FAMILY:
                    # inet_diag_msg: family, state, timer, retrans, then sockid: sport, dport (big endian)
                    _fam, state = struct.unpack_from("=BB", data, offset + 16)
                    sport, dport = struct.unpack_from("!HH", data, offset + 20)
                    raw_dst = data[offset + 40 : offset + 56]
                    (inode,) = struct.unpack_from("=I", data, offset + 16 + 68)
                    if family == socket.AF_INET:
                        remote = socket.inet_ntop(socket.AF_INET, raw_dst[:4])
                    else:
                        remote = socket.inet_ntop(socket.AF_INET6, raw_dst)
                    idle, not_sent = _idle(data, offset, length)
                    out.append(Conn(state, sport, remote, dport, inode, family, data[offset + 20 : offset + 68], idle,
                                    not_sent))
                offset += (length + 3) & ~3


def _proc_scan(port: int, states: frozenset[int]) -> list[Conn]:
    """The /proc/net/tcp{,6} fallback. The kernel lists those files in pieces while sockets come
    and go, so one socket may be listed twice: each is counted once, by inode and peer."""
    out: list[Conn] = []
    seen: set[tuple[int, str]] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, st = fields[1], fields[2], int(fields[3], 16)
                    if st not in states or int(local.rsplit(":", 1)[1], 16) != port:
                        continue
                    addr, rport = remote.rsplit(":", 1)
                    key = (int(fields[9]), remote)  # (a request socket, SYN_RECV, has inode 0)
                    if key not in seen:
                        seen.add(key)
                        out.append(Conn(st, port, _proc_address(addr), int(rport, 16), key[0]))
        except FileNotFoundError:
            continue
    return out


def _idle(data: bytes, offset: int, length: int) -> tuple[bool | None, int | None]:
    """Whether a dumped socket is between two calls (Conn.idle), and how many bytes the app wrote
    that are not sent yet: its queues (inet_diag_msg) and its tcp_info attribute's last-data
    times, data segments and unsent bytes."""
    (rqueue,) = struct.unpack_from("=I", data, offset + 16 + 56)
    at = offset + 16 + 72
    while at + 4 <= offset + length:
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            break
        if kind == INET_DIAG_INFO and size >= 4 + 160:
            last_sent, _, last_received = struct.unpack_from("=III", data, at + 4 + 44)  # ms ago
            segments_in, segments_out = struct.unpack_from("=II", data, at + 4 + 152)  # carrying data
            # Answered: sent after it last received, or in the same millisecond with as many data
            # segments out as in (a call's request and answer, one each, or an answer in several).
            answered = last_sent < last_received or (last_sent == last_received and segments_out >= segments_in)
            # Not wqueue: on loopback, sent data is in the peer's queue already, its ACK may be delayed.
            (not_sent,) = struct.unpack_from("=I", data, at + 4 + 144)
            return rqueue == 0 and not_sent == 0 and (segments_in == 0 or answered), not_sent
        at += (size + 3) & ~3
    return None, None


def _proc_address(hexaddr: str) -> str:
    """/proc/net/tcp's address (host byte order, per 32-bit word) as inet_ntop writes it."""
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16)) for i in range(0, len(hexaddr), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


_netlink_ok = True


def connections(port: int, states: frozenset[int] = INFLIGHT_STATES) -> list[Conn]:
    """Sockets on this host whose local port is `port`, in one of `states` (IPv4 and IPv6)."""
    global _netlink_ok
    if _netlink_ok:
        try:
            return _netlink_dump(socket.AF_INET, port, states) + _netlink_dump(socket.AF_INET6, port, states)
        except OSError:
            _netlink_ok = False
    return _proc_scan(port, states)


def inflight(port: int) -> int:
    """How many connections an app on `port` still serves (ESTABLISHED, SYN_RECV, CLOSE_WAIT)."""
    return len(connections(port, INFLIGHT_STATES))


def listening(port: int) -> list[Conn]:
    """Listening sockets on `port` (any address)."""
    return connections(port, frozenset({LISTEN}))


def port_holder(port: int) -> str:
    """Name the process listening on `port` (only on error paths: it scans every socket)."""
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    cmd = " ".join(" ".join(psutil.Process(c.pid).cmdline()).split()) or psutil.Process(c.pid).name()
                except psutil.Error:
                    cmd = "?"
                return f"pid {c.pid} ({cmd})"
    except psutil.Error:
        pass
    return "a process this user cannot see (try as root: ss -ltnp)"


def listening_pids(port: int) -> set[int]:
    """Pids of the processes that hold a listening socket on `port` (by socket inode, via /proc)."""
    inodes = {c.inode for c in listening(port)}
    if not inodes:
        return set()
    return {pid for pid in procs.pids() if procs.socket_inodes(pid) & inodes}


def destroy(conns: list[Conn]) -> tuple[int, str]:
    """Close these connections from outside their process (netlink SOCK_DESTROY, what `ss -K`
    does): the process sees the connection aborted, its peer a reset. Needs CAP_NET_ADMIN and a
    kernel built with CONFIG_INET_DIAG_DESTROY. Returns how many were closed, and why the others
    were not ("" if none failed); a connection already gone counts as closed."""
    closed, why = 0, ""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        for seq, conn in enumerate(conns, 1):
            if not conn.sockid:
                why = why or "netlink sock_diag is unavailable"
                continue
            body = struct.pack("=BBBxI", conn.family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + conn.sockid
            s.sendto(struct.pack("=IHHII", 16 + len(body), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body,
                     (0, 0))
            data = s.recv(65536)
            kind = struct.unpack_from("=H", data, 4)[0] if len(data) >= 16 else 0
            error = -struct.unpack_from("=i", data, 16)[0] if kind == NLMSG_ERROR and len(data) >= 20 else 0
            if error in (0, errno.ENOENT):
                closed += 1
            else:
                why = why or os.strerror(error) + (" (closing another process's connection needs CAP_NET_ADMIN)"
                                                   if error == errno.EPERM else "")
    return closed, why


# nginx connects long-lived requests to an app from their own loopback address (proxy_bind, the
# maps in proxy/templates/long-lived.conf), so that the kernel tells them apart from short ones.
LONG_LIVED = {"websocket": "127.0.0.2", "event-stream": "127.0.0.3", "path": "127.0.0.4",
              "tcp": "127.0.0.5"}  # every connection of an app.protocol = "tcp" service
_KIND_OF = {address: kind for kind, address in LONG_LIVED.items()}


def long_lived_kind(conn: Conn) -> str | None:
    """The kind of long-lived request a connection to an app carries (None: a short one)."""
    return _KIND_OF.get(conn.remote.removeprefix("::ffff:"))


def long_lived(port: int) -> dict[str, int]:
    """Long-lived connections open on `port` now, by kind (kinds with none left out)."""
    counts: dict[str, int] = {}
    for conn in connections(port):
        kind = long_lived_kind(conn)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts
