"""Low-level process facts and signals, shared by the app slots and the managed nginx.

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
