"""A copy of one of an app's sockets, taken from outside it (pidfd_getfd: root, or the app's user
where the kernel lets it trace its own processes), and proven to be the connection chosen.

An fd number is only a name in the app's table: between the /proc scan that found it and the
copy, the app may have closed that connection and opened another (its database's, its queue's)
under the same number. So a copy is kept only if its inode is the one the scan saw; otherwise
it is closed at once and nothing is written to it. Closing a copy closes only ours: the app's
descriptor stays its own.
"""

from __future__ import annotations

import ctypes
import os
import socket

from . import procs

SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux added it to after 5.6

_libc = ctypes.CDLL(None, use_errno=True)


class Replaced(OSError):
    """The fd no longer names the connection chosen (the app closed it and reused the number)."""


def take(pid: int, fd: int, inode: int) -> socket.socket:
    """A copy of `pid`'s descriptor `fd`, which must still be the socket `inode`. Raises OSError
    (Replaced if it is another file now)."""
    pidfd = os.pidfd_open(pid)
    try:
        ours = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ours < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(pidfd)
    try:
        if os.fstat(ours).st_ino != inode:
            raise Replaced(0, f"pid {pid}'s fd {fd} is another file now (the connection closed)")
        return socket.socket(fileno=ours)
    except BaseException:
        os.close(ours)
        raise


def owners(pids: set[int]) -> dict[int, tuple[int, int]]:
    """Socket inode -> (pid, fd) for the processes serving a port."""
    found: dict[int, tuple[int, int]] = {}
    for pid in pids:
        for inode, fd in procs.socket_fds(pid).items():
            found.setdefault(inode, (pid, fd))
    return found
