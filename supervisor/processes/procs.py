"""Low-level process facts and signals, shared by the app slots and the managed nginx; every
read of /proc is here.

One liveness rule for every process bluegreen tracks: the pid exists, is not a zombie, and,
when a start time is known, started then (pids get reused). Signals to a process group never
raise for a group that is already gone.
"""

from __future__ import annotations

import os
import signal

import psutil


def alive(pid: int, create_time: float | None = None) -> bool:
    """Is `pid` a running process (not a zombie), and the one that started at `create_time`?"""
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) >= 0.01:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


PF_EXITING = 0x4  # the kernel's task flag: its exit has begun (a SIGKILL is being carried out)


def exiting(pid: int) -> bool:
    """Whether `pid`'s exit has begun, or is over (a process tearing down is not reaped yet, and
    psutil still calls it running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return bool(int(fields[6]) & PF_EXITING)  # (flags: the 9th field, the 7th after the name)


def running(p: psutil.Process) -> bool:
    """The same rule for a psutil handle (its start time is checked by psutil itself)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal a whole process group; a group that is gone (or not ours) is left alone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def send(p: psutil.Process, sig: signal.Signals) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


# --- /proc: what bluegreen reads of other processes (gone or forbidden reads as nothing)

def pids() -> list[int]:
    """Every process on the host, but this one."""
    me = os.getpid()
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != me]


def environ(pid: int) -> bytes | None:
    """The environment `pid` started with, NUL-separated, between NULs (so that "\\0KEY=" matches
    whole entries); None if it is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"\0" + f.read() + b"\0"
    except OSError:
        return None


def title(pid: int) -> str | None:
    """A process's title (nginx's workers rename themselves), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """`pid`'s child processes."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []


def socket_fds(pid: int) -> dict[int, int]:
    """The sockets `pid` holds open: inode -> its fd number there."""
    found = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:  # one fd at a time: the app closes connections while it is read (a busy app, every scan)
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(fd)
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets `pid` holds open."""
    return set(socket_fds(pid))


def groups(pid: int) -> set[int]:
    """`pid`'s supplementary groups."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {int(g) for ln in f if ln.startswith("Groups:") for g in ln.split()[1:]}
    except (OSError, ValueError):
        return set()


# --- this daemon as a child subreaper: orphans of what it started come back to it

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Have the orphans of every process this daemon started (nginx's workers when their master
    is killed, a helper a hook or an app started with `env -i setsid`) reparented to it instead
    of pid 1, which in a container may never reap them. False where the kernel refuses."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def my_children() -> list[int]:
    """This process's children, every thread's (an orphan is reparented to one of its threads)."""
    found: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        pass
    return found


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def reap(seen: set[int]) -> set[int]:
    """Reap the zombie children that were already zombies at the last call (`seen`): no one
    waits for them (asyncio reaps the children it started at once). Returns the zombies seen now."""
    now = {pid for pid in my_children() if zombie(pid)}
    for pid in now & seen:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return now - seen


def note_descendants(pid: int, seen: dict[int, float]) -> None:
    """Add `pid`'s descendants now to `seen` (pid -> start time): what a process starts may be
    orphaned later, its parentage lost (an `env -i setsid` helper carries no marker either)."""
    try:
        for p in psutil.Process(pid).children(recursive=True):
            seen.setdefault(p.pid, p.create_time())
    except psutil.Error:
        pass


def still_running(seen: dict[int, float]) -> list[psutil.Process]:
    """Those of `seen` (pid -> start time) that still run: the same processes, not reused pids."""
    found = []
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found
