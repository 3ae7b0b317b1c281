"""Draining: waiting until the proxy and the app have both let go of the old port, the app's
connections counted from outside it (sockets.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Protocol

from .sockets import inflight


class Watched(Protocol):
    def alive(self) -> bool: ...


async def wait_drained(port: int, wait_released: Callable[[int, float], Awaitable[int]], timeout: float,
                       interval: float, watch: Watched | None = None) -> dict[str, Any]:
    """Wait until the proxy can send `port` no more requests (`wait_released`: old nginx workers
    exited, or nginx counts none in flight to it), then until `port` has no connection in
    flight, both within `timeout`; report what was left. Stops early if `watch` (the new build)
    dies: waiting would only prolong an outage."""
    began = time.monotonic()
    deadline = began + timeout
    died = False
    proxy = asyncio.ensure_future(wait_released(port, deadline))
    try:
        while not proxy.done():
            if watch is not None and not watch.alive():
                died = True
                break
            await asyncio.wait({proxy}, timeout=interval)
    finally:
        proxy.cancel()
    held = proxy.result() if proxy.done() and not proxy.cancelled() else 0
    proxy_s = time.monotonic() - began
    left = 0 if died else inflight(port)
    while left and time.monotonic() < deadline:
        if watch is not None and not watch.alive():
            died = True
            break
        await asyncio.sleep(interval)
        left = inflight(port)
    return {
        "workers_wait": round(proxy_s, 4),
        "old_workers_left": held,
        "still_open": left,  # connections the old build still had at the deadline (its stop decides their fate)
        "timed_out": bool(left or held) and not died,
        "died": died,
        "after": time.monotonic() - began,
    }
