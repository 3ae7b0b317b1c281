"""The front proxy: where public traffic goes, as one interface the swap drives.

A routing decision is "all traffic to port P", plus, while a swap is paused, "requests that
ask for the preview to port Q". An implementation applies it and confirms
it took effect, can undo its last change without needing disk space, and says when the previous
routing has fully let go (no request can still reach the old port through the proxy). The first
implementation reloads nginx (nginx.ReloadSwitch); a runtime switch is another module with the
same interface, not a branch in this one.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from ..fsutil import UndoableFile
from .counters import Counters


class RoutingLock:
    """One change of nginx's routing at a time: a swap's, or the monitor's restart of nginx and
    its re-applying of what was routed. Re-entrant for the task that holds it (a route back may
    route; the runtime switch's config load reloads)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        me = asyncio.current_task()
        if self._owner is not me or me is None:
            await self._lock.acquire()
            self._owner = me
        self._depth += 1

    async def __aexit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


R = TypeVar("R")


def routing(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """A proxy method that changes (or restores) the routing: it holds the proxy's RoutingLock."""
    @functools.wraps(method)
    async def locked(self: Any, *args: Any, **kw: Any) -> R:
        async with self.lock:
            return await method(self, *args, **kw)
    return locked


class TrafficSplit(Protocol):
    """What a rollout and a watch need of the front proxy, besides routing: give a share of users
    to a candidate port, and count what each port answered (the runtime switch can; reloads cannot)."""

    async def split(self, candidate: int | None, share: int, gen: int) -> dict[str, Any]:
        """Send `share` % of users to `candidate` (None: nobody, only count), counting in generation `gen`."""
        ...

    async def end_split(self) -> None:
        """No split, no counting; the counters of every watch generation dropped."""
        ...

    async def stats(self, gen: int) -> dict[int, Counters]:
        """What nginx counted per upstream port in generation `gen` (0: since it started)."""
        ...

    async def inflight(self, port: int) -> int:
        """Requests nginx has in flight to `port`."""
        ...


class StagedRoute:
    """What both switches share: the file that routes (the upstream file, the route file) is
    replaced with its previous version staged beside it, so the way back to the port it named is
    a rename that needs no disk space, until the swap is over (`forget_undo`)."""

    staged: UndoableFile
    undo_port: int | None = None  # where the staged previous version sends traffic

    def forget_undo(self) -> None:
        """The last route will not be undone: drop its staged copy."""
        self.staged.forget()
        self.undo_port = None

    def can_go_back_to(self, port: int) -> bool:
        """The staged previous version is there, and routes to `port`."""
        return self.undo_port == port and self.staged.undoable


class FrontProxy(Protocol):
    mode: str  # how it switches, shown by status: "reload" or "runtime"
    preview_port: int | None  # where requests with the preview header or cookie go (None: no preview)
    port: int | None  # where all traffic was last routed, confirmed (None: not yet known)
    lock: RoutingLock

    def traffic_split(self) -> TrafficSplit | None:
        """The same proxy as a TrafficSplit, if it can split traffic (None: reloads only route)."""
        ...

    async def reconcile(self) -> str | None:
        """Make nginx route as it was last told (port, preview, split), if it forgot (restarted
        behind the daemon's back); say what was set again, None if nothing was missing."""
        ...

    async def route(self, port: int) -> dict[str, Any]:
        """Send all traffic to `port` and confirm it; on failure the previous routing stays, and raise."""
        ...

    async def route_back(self, port: int) -> dict[str, Any]:
        """Undo the last `route`, back to `port`, needing no new disk space; raise if it cannot."""
        ...

    async def preview(self, port: int | None, token: str = "") -> dict[str, Any]:
        """Send requests that carry the preview header or cookie (set to `token`, or to 1 without
        one) to `port` (None: end the preview), and confirm it; every other request stays where it
        is. A `route` ends any preview."""
        ...

    def forget_undo(self) -> None:
        """The last `route` will not be undone."""
        ...

    async def wait_released(self, port: int, deadline: float) -> int:
        """Wait until the proxy can send no more requests to `port` (no longer routed there);
        return how many requests (or proxy processes) still held on to it at the deadline."""
        ...

    async def routed_port(self) -> int | None:
        """The port the proxy routes to now (None: unknown, or not ours)."""
        ...

    async def apply_config(self, port: int) -> dict[str, Any]:
        """The proxy's own configuration changed (a daemon upgrade): load it, routing to `port`."""
        ...

    def config_stale(self) -> bool:
        """The file this switch owns in nginx's config is not what it would write now (a first
        start of the runtime switch in the user's nginx, or a daemon upgrade): apply_config is due."""
        ...

    def clean_stale_temp(self) -> None:
        """Remove what a killed daemon left half-written."""
        ...

