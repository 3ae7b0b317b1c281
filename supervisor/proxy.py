"""The front proxy: where public traffic goes, as one interface the swap drives.

Today a routing decision is "all traffic to port P". An implementation applies it and confirms
it took effect, can undo its last change without needing disk space, and says when the previous
routing has fully let go (no request can still reach the old port through the proxy). The first
implementation reloads nginx (nginx.ReloadSwitch); a runtime switch is another module with the
same interface, not a branch in this one.
"""

from __future__ import annotations

from typing import Any, Protocol


class FrontProxy(Protocol):
    mode: str  # how it switches, shown by status: "reload"

    async def route(self, port: int) -> dict[str, Any]:
        """Send all traffic to `port` and confirm it; on failure the previous routing stays, and raise."""
        ...

    async def route_back(self, port: int) -> dict[str, Any]:
        """Undo the last `route`, back to `port`, needing no new disk space; raise if it cannot."""
        ...

    def forget_undo(self) -> None:
        """The last `route` will not be undone."""
        ...

    async def let_go(self, deadline: float) -> list[int]:
        """Wait until the routing before the last `route` can send no more requests; return the
        proxy processes still holding on at the deadline."""
        ...

    def routed_port(self) -> int | None:
        """The port the proxy's own configuration names now (None: unknown, or not ours)."""
        ...

    def clean_stale_temp(self) -> None:
        """Remove what a killed daemon left half-written."""
        ...
