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
import time
from dataclasses import dataclass
from pathlib import Path

from . import procs, tcpinfo

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
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE, INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE = 2, 3, 4, 5


@dataclass(frozen=True)
class Conn:
    state: int
    local_port: int
    remote: str
    remote_port: int
    inode: int
    family: int = socket.AF_INET
    sockid: bytes = b""  # the kernel's inet_diag_sockid (netlink only): what SOCK_DESTROY names
    info: tcpinfo.TcpInfo | None = None  # what the kernel knows of it (netlink only)
    local: str = ""  # the address it is bound to (netlink only)

    @property
    def not_sent(self) -> int | None:
        """Bytes the app wrote that the kernel has not sent yet (netlink only)."""
        return self.info.not_sent if self.info is not None else None

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


INET_DIAG_INFO = 2  # the tcp_info extension (tcpinfo.py)


def _request(family: int, port: int, states: frozenset[int], seq: int, remote: bool = False) -> bytes:
    # Bytecode: accept iff port <= sport <= port (dport: `remote`). A "no" jump past the end rejects.
    ge, le = (INET_DIAG_BC_D_GE, INET_DIAG_BC_D_LE) if remote else (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE)
    bc = struct.pack("=BBH", ge, 8, 20) + struct.pack("=BBH", 0, 0, port)
    bc += struct.pack("=BBH", le, 8, 12) + struct.pack("=BBH", 0, 0, port)
    attr = struct.pack("=HH", 4 + len(bc), INET_DIAG_REQ_BYTECODE) + bc
    mask = 0
    for s in states:
        mask |= 1 << s
    # inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48 bytes, zero)
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), mask) + b"\0" * 48
    body = req + attr
    header = struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def _netlink_dump(family: int, port: int, states: frozenset[int], remote: bool = False) -> list[Conn]:
    out: list[Conn] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.sendto(_request(family, port, states, 1, remote), (0, 0))
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
                    raw_src, raw_dst = data[offset + 24 : offset + 40], data[offset + 40 : offset + 56]
                    (inode,) = struct.unpack_from("=I", data, offset + 16 + 68)
                    size = 4 if family == socket.AF_INET else 16
                    remote = socket.inet_ntop(family, raw_dst[:size])
                    local = socket.inet_ntop(family, raw_src[:size])
                    out.append(Conn(state, sport, remote, dport, inode, family, data[offset + 20 : offset + 68],
                                    _info(data, offset, length), local))
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


def _info(data: bytes, offset: int, length: int) -> tcpinfo.TcpInfo | None:
    """A dumped socket's tcp_info attribute (INET_DIAG_INFO), with its unread bytes (idiag_rqueue)."""
    (rqueue,) = struct.unpack_from("=I", data, offset + 16 + 56)
    at = offset + 16 + 72
    while at + 4 <= offset + length:
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            break
        if kind == INET_DIAG_INFO:
            return tcpinfo.parse(data[at + 4 : at + size], rqueue)
        at += (size + 3) & ~3
    return None


def _proc_address(hexaddr: str) -> str:
    """/proc/net/tcp's address (host byte order, per 32-bit word) as inet_ntop writes it."""
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16)) for i in range(0, len(hexaddr), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


NETLINK_RETRY = 5.0  # seconds /proc is read instead after netlink failed twice in a row
_netlink_off_until = 0.0


def connections(port: int, states: frozenset[int] = INFLIGHT_STATES) -> list[Conn]:
    """Sockets on this host whose local port is `port`, in one of `states` (IPv4 and IPv6). A
    netlink error (a full receive buffer, a signal) is tried again at once; twice in a row, /proc
    is read instead for NETLINK_RETRY seconds, then netlink again: no error turns it off for good."""
    global _netlink_off_until
    if time.monotonic() >= _netlink_off_until:
        for _ in range(2):
            try:
                return _netlink_dump(socket.AF_INET, port, states) + _netlink_dump(socket.AF_INET6, port, states)
            except OSError:
                continue
        _netlink_off_until = time.monotonic() + NETLINK_RETRY
    return _proc_scan(port, states)


def peers(port: int) -> list[Conn]:
    """The other ends of the connections to `port` on this host (nginx's sides, for an app's
    port): established sockets whose remote port is `port`. Netlink only ([] without it)."""
    try:
        return _netlink_dump(socket.AF_INET, port, frozenset({ESTABLISHED}), remote=True)
    except OSError:
        return []


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


def destroy(conns: list[Conn]) -> tuple[int, int, str]:
    """Close these connections from outside their process (netlink SOCK_DESTROY, what `ss -K`
    does): the process sees the connection aborted, its peer a reset. Needs CAP_NET_ADMIN and a
    kernel built with CONFIG_INET_DIAG_DESTROY. Returns how many were reset, how many were gone
    already (closed by their peer or their app meanwhile: nothing was cut), and why the others
    were not ("" if none failed)."""
    closed, gone, why = 0, 0, ""
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
            if error == 0:
                closed += 1
            elif error == errno.ENOENT:
                gone += 1
            else:
                why = why or os.strerror(error) + (" (closing another process's connection needs CAP_NET_ADMIN)"
                                                   if error == errno.EPERM else "")
    return closed, gone, why


# nginx connects long-lived requests to an app from their own loopback address (proxy_bind, the
# maps in proxy/templates/long-lived.conf), so that the kernel tells them apart from short ones.
LONG_LIVED = {"websocket": "127.0.0.2",  # asked for an upgrade (a WebSocket once nginx switches it: goodbye.upgraded)
              "path": "127.0.0.4",  # a path in drain.long_lived_paths
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


def remove_stale_sockets(paths: "list[Path]") -> None:
    """Unlink those Unix socket files nothing listens on: a killed nginx master leaves its own
    (nginx removes them only on a clean exit), and the next master cannot bind over them."""
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # absent, or not ours to judge (permissions): left alone
