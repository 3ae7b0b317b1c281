"""Faults the tests inject, off unless their environment variable is set: a real daemon, held or
hung at a chosen point, so that the end-to-end suite can put a fault exactly there.

- BLUEGREEN_FAULT_BLOCK_LOOP=FILE: once FILE exists, the event loop hangs for the seconds it
  names (a deadlock), so that systemd's watchdog pings are seen to stop.
- BLUEGREEN_FAULT_HOLD=PHASE:FILE: a swap that reaches PHASE waits there (its begin already
  recorded and emitted, its action not yet run) until FILE exists: a momentary phase (switch,
  commit) held long enough to kill something in it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Awaitable, Callable

POLL = 0.05


def block_loop() -> None:
    """Hang the event loop if the test asked for it (BLUEGREEN_FAULT_BLOCK_LOOP)."""
    order = os.environ.get("BLUEGREEN_FAULT_BLOCK_LOOP")
    if not order:
        return
    try:
        seconds = float(Path(order).read_text())
        Path(order).unlink()
    except (OSError, ValueError):
        return
    time.sleep(seconds)


def phase_hold() -> Callable[[str], Awaitable[None]] | None:
    """The hold BLUEGREEN_FAULT_HOLD asks for, or None (always, outside the tests)."""
    order = os.environ.get("BLUEGREEN_FAULT_HOLD")
    if not order or ":" not in order:
        return None
    held, gate = order.split(":", 1)

    async def hold(phase: str) -> None:
        while phase == held and not os.path.exists(gate):
            await asyncio.sleep(POLL)

    return hold
