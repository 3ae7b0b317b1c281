"""The bench's long-lived case (scripts/bench --only-live, and part of a full run): WebSocket
clients that reconnect whenever their connection closes, through releases under HTTP load.

The app is examples/live-app as shipped (the `ws` package; it numbers each connection's
messages from 1 and sends one every 100 ms). Each client records every message; when its
connection closes it reconnects after 100 ms, and notes how long until its first message on
the new connection and from which build. Reported per switch: reconnections, how many landed on
the new build and within how long, messages missing within a connection, what the drain said
it closed, the HTTP requests alongside that failed, and how long a release took.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

RECONNECT_AFTER = 0.1  # seconds, as socket.io's and most reconnecting clients' first back-off


@dataclass
class Client:
    """One reconnecting WebSocket client's record."""

    connections: list[tuple[str, list[int]]] = field(default_factory=list)  # (build, message numbers) per connection
    # (seconds from the close to the first message, its build, when that message came: time.time())
    reconnects: list[tuple[float, str, float]] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)

    def lost(self) -> int:
        return sum(len(set(range(1, max(ns) + 1)) - set(ns)) for _, ns in self.connections if ns)


async def run_client(port: int, client: Client, stop: asyncio.Event) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    closed_at: float | None = None
    while not stop.is_set():
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=20, max_queue=None) as ws:
                numbers: list[int] = []
                first = True
                async for message in ws:
                    build, n = str(message).split()
                    if first:
                        client.connections.append((build, numbers))
                        if closed_at is not None:
                            client.reconnects.append((time.monotonic() - closed_at, build, time.time()))
                        first = False
                    numbers.append(int(n))
                    if stop.is_set():
                        return
            client.closes.append(f"close {ws.close_code}" + (f" {ws.close_reason}" if ws.close_reason else ""))
        except ConnectionClosed as e:
            client.closes.append(str(e.rcvd.code) if e.rcvd else "no close frame")
        except (OSError, WebSocketException, asyncio.TimeoutError) as e:
            client.closes.append(type(e).__name__)
        closed_at = time.monotonic()
        await asyncio.sleep(RECONNECT_AFTER)


async def live_release(port: int, clients: int, releases: int, gap: float,
                       release: Callable[[int], Awaitable[dict[str, Any]]],
                       http_load: Callable[[Callable[[int], Awaitable[dict[str, Any]]]], Awaitable[Any]]
                       ) -> dict[str, Any]:
    """`clients` reconnecting WebSocket clients, then `releases` releases under `http_load` (the
    bench's open-loop HTTP load, which calls `release` between its gaps)."""
    stop = asyncio.Event()
    records = [Client() for _ in range(clients)]
    tasks = [asyncio.ensure_future(run_client(port, c, stop)) for c in records]
    deadline = time.monotonic() + 60
    while sum(1 for c in records if c.connections) < clients and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    connected = sum(1 for c in records if c.connections)
    measured = await http_load(release)
    await asyncio.sleep(3)  # the last release's reconnections
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    return {"clients": clients, "connected_before": connected, "measured": measured, **summary(records, measured)}


def summary(records: list[Client], measured: Any) -> dict[str, Any]:
    reconnects = [r for c in records for r in c.reconnects]
    swaps = [info["swap"] for info in measured.releases]
    starts = [t0 for t0, _ in measured.windows]

    def new_build(at: float) -> str | None:
        """The build the latest release begun before `at` went to (None: before the first)."""
        begun = [i for i, t0 in enumerate(starts) if t0 <= at]
        return measured.versions[(begun[-1] + 1) % 2] if begun else None

    cut: dict[str, int] = {}
    for s in swaps:
        drain = s.get("details", {}).get("drain", {})
        for kind, n in (drain.get("long_lived_cut") or {}).items():
            cut[kind] = cut.get(kind, 0) + n
        if drain.get("not_websockets"):
            cut["drained as requests"] = cut.get("drained as requests", 0) + drain["not_websockets"]
    delays = sorted(d for d, _, _ in reconnects)
    return {
        "reconnections": len(reconnects),
        "to_the_new_build": sum(1 for _, build, at in reconnects if build == new_build(at)),
        "reconnect_s_p50": statistics.median(delays) if delays else None,
        "reconnect_s_p95": delays[int(0.95 * (len(delays) - 1))] if delays else None,
        "reconnect_s_max": delays[-1] if delays else None,
        "messages": sum(len(ns) for c in records for _, ns in c.connections),
        "messages_lost": sum(c.lost() for c in records),
        "closes": _counts(x for c in records for x in c.closes),
        "cut_by_the_drain": cut,
        "release_s_mean": statistics.mean(s["finished_at"] - s["started_at"] for s in swaps) if swaps else None,
    }


def _counts(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
