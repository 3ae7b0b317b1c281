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
import time
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from ..errors import NginxError
from ..fsutil import UndoableFile, atomic_write
from .counters import Counters, Hold


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
    """The way both switches move traffic, as one sequence: the file that routes (the upstream
    file, the route file) is replaced with its previous version staged beside it; nginx is made
    to take it (`apply`: a tested, confirmed reload, or a table change read back); any failure
    puts the previous file back and brings nginx in line with it (`recover`). Going back is a
    rename of the staged copy, which needs no disk space, until the swap is over (`forget_undo`).
    A switch says what its file holds for a port (`text_for`, `port_in`) and how nginx takes it."""

    staged: UndoableFile
    undo_port: int | None = None  # where the staged previous version sends traffic
    port: int | None = None  # where the last confirmed route sends traffic
    lock: RoutingLock
    durable = True  # the routing file is fsynced (the runtime switch's is written again at every start)

    def text_for(self, port: int) -> bytes:
        """What the routing file holds to send all traffic to `port`."""
        raise NotImplementedError

    def port_in(self, data: bytes | None) -> int | None:
        """The port a version of the routing file sends traffic to (None: absent, or not ours)."""
        raise NotImplementedError

    async def apply(self, port: int) -> dict[str, Any]:
        """Make nginx take what the routing file says (it routes to `port`), and confirm it; raise if not."""
        raise NotImplementedError

    async def recover(self, port: int | None) -> None:
        """After a failed `apply` (the file already put back, routing to `port`): bring nginx in
        line with the file, best effort."""
        raise NotImplementedError

    def write_failed(self, e: OSError) -> NginxError:
        return NginxError(f"cannot write {self.staged.path}: {e.strerror}; traffic is unchanged "
                          "(check free disk space and permissions)", code="upstream_write_failed")

    async def switch_to(self, port: int) -> dict[str, Any]:
        """Stage, write, apply; on any failure the previous file is back and nginx follows it."""
        t0 = time.monotonic()
        try:
            previous = self.staged.replace(self.text_for(port), durable=self.durable)
        except OSError as e:
            raise self.write_failed(e) from e
        t1 = time.monotonic()
        try:
            result = await self.apply(port)
        except BaseException:
            self.put_back()
            await self.recover(self.port_in(previous))
            raise
        self.undo_port = self.port_in(previous)
        self.port = port
        return {**result, "write": round(t1 - t0, 4)}

    @routing
    async def route(self, port: int) -> dict[str, Any]:
        """All traffic to `port`, confirmed; on failure the previous routing stays, and raise."""
        return await self.switch_to(port)

    @routing
    async def route_back(self, port: int) -> dict[str, Any]:
        """Undo the last route, back to `port`, by a rename of the staged copy (no disk space
        needed). Raises if nginx cannot be switched back; then the file (best effort) and nginx
        still route where the last switch pointed them."""
        if not self.can_go_back_to(port):
            self.forget_undo()
            return await self.route(port)
        current = self.staged.read()
        self.put_back()
        self.undo_port = None
        try:
            result = await self.apply(port)
        except BaseException:
            try:  # keep the file telling what nginx runs (needs space: best effort)
                if current is None:
                    self.staged.path.unlink(missing_ok=True)
                else:
                    atomic_write(self.staged.path, current)
            except OSError:
                pass
            await self.recover(self.port_in(current))
            raise
        self.port = port
        return result

    def put_back(self) -> None:
        """The staged previous version back in place (a rename)."""
        try:
            self.staged.restore()
        except OSError as e:
            raise self.write_failed(e) from e

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
    hold_port: Callable[[], int]  # the hold server's port (0: nothing is held)

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

    async def hold(self, change: str = "") -> Hold | None:
        """nginx's hold counters, after `change` ("pause S", "resume", "down PORT", "up"); None:
        this switch holds nothing (reloads, a TCP or gRPC service)."""
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

