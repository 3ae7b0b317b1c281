"""What the kernel knows of one TCP connection of an app (struct tcp_info), and whether it is
between two calls: the test the drain of a pooled connection rests on.

The same struct comes from a netlink sock_diag dump (sockets.py) and from getsockopt(TCP_INFO)
on a copy of the app's socket (calls.py). Its last-data times tick in jiffies (4 ms at HZ=250):
two events in the same jiffy read as a tie, which says nothing of their order. Its byte counters
and its count of unacknowledged segments are exact.

Between two calls means: the app answered after it last received, nothing is unread or unsent.
"Answered after" is proven by the times when they differ; in a tie, by the acknowledgements.
A client that waits for an answer before its next call (a pool's ordinary use) sends that call
only once the answer reached nginx, so the call's segment carries the acknowledgement of the
answer: an answer still unacknowledged means no call came after it, and a bare acknowledgement
that came after the last data means the same. A tie with neither (the client acknowledged at
once, in the same jiffy) is unknown: a call may have come right after the answer. Calls that
were pipelined (several sent before their answers) defeat the test: the first answer looks like
the last.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from dataclasses import dataclass

ESTABLISHED, CLOSE = 1, 7
SIZE = 208  # the fields below end with tcpi_bytes_sent (Linux 4.19)


@dataclass(frozen=True)
class TcpInfo:
    state: int
    unread: int  # bytes the peer sent that the app has not read yet
    not_sent: int  # bytes the app wrote that the kernel has not sent yet
    unacked: int  # segments sent and not acknowledged yet
    last_sent: int  # ms since the app last sent data (jiffy-grained)
    last_received: int  # ms since data last came in
    last_ack: int  # ms since an acknowledgement last came in (not updated by every data segment)
    bytes_received: int  # exact, over the connection's life (a FIN counts one)
    bytes_sent: int
    data_in: int  # segments that carried data in (a bare FIN or acknowledgement does not count)
    data_out: int  # segments that carried data out

    @property
    def answered(self) -> bool | None:
        """Whether the app's last word on this connection is an answer (see the module's
        docstring): True, False (a call is being answered), or None (not known)."""
        if self.bytes_received == 0:
            return True  # never asked anything
        if self.bytes_sent == 0 or self.last_sent > self.last_received:
            return False  # received since it last sent: a call is being answered
        if self.last_sent < self.last_received:
            return True  # sent at least a jiffy after it last received
        if self.unacked > 0 or self.last_ack < self.last_received:
            return True
        return None

    @property
    def open(self) -> bool:
        """Established, nothing unread, nothing unsent: whether it rests depends on `answered`."""
        return self.state == ESTABLISHED and not self.unread and not self.not_sent

    @property
    def at_rest(self) -> bool:
        """Between two calls: established, nothing unread, nothing unsent, the last call answered."""
        return self.open and self.answered is True

    @property
    def in_call(self) -> bool:
        """A call is proven to be in flight: unread, being answered, or received since the last answer."""
        return self.state == ESTABLISHED and (bool(self.unread) or bool(self.not_sent) or self.answered is False)

    def balanced_since(self, anchor: TcpInfo) -> bool:
        """As many data segments came in as went out since `anchor` (a reading at rest), and all
        that went out is acknowledged: with one segment a call and one an answer (small calls,
        which is what a tie in the times is made of), every call since was answered."""
        calls, answers = self.data_in - anchor.data_in, self.data_out - anchor.data_out
        return self.open and self.unacked == 0 and calls == answers

    def same_traffic(self, other: TcpInfo) -> bool:
        """No byte came in or went out between the two readings (exact counters)."""
        return self.bytes_received == other.bytes_received and self.bytes_sent == other.bytes_sent


def parse(raw: bytes, unread: int) -> TcpInfo | None:
    """A struct tcp_info (None if the kernel's is too old to carry the byte counters)."""
    if len(raw) < SIZE:
        return None
    (state,) = struct.unpack_from("=B", raw, 0)
    (unacked,) = struct.unpack_from("=I", raw, 24)
    last_sent, _, last_received, last_ack = struct.unpack_from("=IIII", raw, 44)
    (bytes_received,) = struct.unpack_from("=Q", raw, 128)
    (not_sent,) = struct.unpack_from("=I", raw, 144)
    data_in, data_out = struct.unpack_from("=II", raw, 152)
    (bytes_sent,) = struct.unpack_from("=Q", raw, 200)
    return TcpInfo(state, unread, not_sent, unacked, last_sent, last_received, last_ack, bytes_received, bytes_sent,
                   data_in, data_out)


def read(sock: socket.socket) -> TcpInfo | None:
    """The connection's tcp_info now, from a socket we hold (a copy of the app's). Raises OSError."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    unread = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    return parse(raw, unread)
