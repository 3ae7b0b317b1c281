"""The reload switch (a FrontProxy): nginx routes by its upstream file, rewritten and reloaded.

A switch is: stage the previous upstream beside it (so the way back needs no disk space) ->
write the new one atomically -> `nginx -t` with the master's own -p/-c/-e -> reload ->
confirm from the master's workers: new ones titled "nginx: worker process" (forked only once
the master accepted the config). A reload command exiting 0 only means a signal was sent; the
master may still refuse the config (a taken `listen` port) and keep the old workers. Any
failure puts the previous upstream file back, byte for byte. The old generation of workers is
remembered: the routing has let go once every one of them has exited.
Which master is switched is a `Master`: the user's (external.ExternalMaster) or the one the
daemon runs (managed.ManagedNginx). See shared NGINX-NOTES.md for the measurements behind each step.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ..config.schema import Config
from ..errors import NginxError
from ..fsutil import UndoableFile
from ..processes import procs
from .front import RoutingLock, StagedRoute, routing
from .master import Master, PLAIN_WORKER, run_command, workers
from .render import parse_upstream_port, upstream_text

POLL = 0.005
STEADY = 0.1  # seconds a new generation's worker count must hold when it is short of the expected one


class ReloadSwitch(StagedRoute):
    """The FrontProxy that switches by rewriting the upstream file and reloading nginx."""

    mode = "reload"
    hold_port = staticmethod(lambda: 0)  # reloads hold nothing

    def traffic_split(self) -> None:
        """Reloads route all traffic, or a preview; they split no share of users and count nothing."""
        return None

    def __init__(self, config: Config, master: Master, render: Callable[[int], str] | None = None) -> None:
        self.config = config
        self.n = config.nginx
        self.master = master
        # What the upstream file holds for a port: the upstream block, or the runtime switch's part.
        self.render = render or (lambda port: upstream_text(config, port, self.preview_port, self.preview_token))
        self.preview_port: int | None = None  # where preview requests go (a paused swap's standby)
        self.preview_token = ""  # what their header or cookie must say ("": 1)
        self.upstream = self.staged = UndoableFile(master.upstream_path)
        self.log = master.log
        self.old_generation: set[int] = set()
        self.signalled = False
        self.port: int | None = None  # where the last confirmed route sends traffic
        self.lock = RoutingLock()

    async def routed_port(self) -> int | None:
        """The port the upstream file on disk sends traffic to (None if absent or not ours)."""
        return self.port_in(self.upstream.read())

    async def hold(self, change: str = "") -> None:
        """Nothing is held with reloads: nginx answers 502 while no build can (docs/failure-modes.md)."""
        return None

    def text_for(self, port: int) -> bytes:
        return self.render(port).encode()

    def port_in(self, data: bytes | None) -> int | None:
        return parse_upstream_port((data or b"").decode(errors="replace"))

    def clean_stale_temp(self) -> None:
        self.upstream.clean_stale()

    async def apply_config(self, port: int) -> dict[str, Any]:
        """nginx's own config changed: load it (a reload), sending traffic to `port`."""
        return await self.route(port)

    @routing
    async def reconcile(self) -> str | None:
        """The upstream file on disk is what nginx loads at any (re)start, so it only needs
        rewriting when someone else wrote it: a managed nginx started afresh gets no preview."""
        if self.port is None or self.upstream.read() == self.render(self.port).encode():
            return None
        await self.switch_to(self.port)
        self.forget_undo()
        return f"port {self.port}" + (f", preview to {self.preview_port}" if self.preview_port else "")

    def config_stale(self) -> bool:
        return False  # the upstream file is rewritten at every switch

    @routing
    async def preview(self, port: int | None, token: str = "") -> dict[str, Any]:
        """Send preview requests to `port` (None: nobody), by rewriting the upstream file with its
        maps and reloading: one reload to turn the preview on, one to turn it off."""
        if (port, token) == (self.preview_port, self.preview_token if port else ""):
            return {"preview": port, "mode": self.mode}
        current = await self.routed_port()
        if current is None:
            raise NginxError(f"{self.upstream.path} names no port; cannot set the preview", code="nginx_reload_failed")
        before = self.preview_port, self.preview_token
        self.preview_port, self.preview_token = port, token if port else ""
        try:
            result = await self.switch_to(current)
        except BaseException:
            self.preview_port, self.preview_token = before
            raise
        finally:
            self.forget_undo()  # the preview is no switch: nothing to undo
        # Old workers keep accepting for nginx's 100 ms, with the old maps: the preview is on for
        # every new connection once they stop (titled "shutting down", or gone).
        deadline = time.monotonic() + self.n.reload_timeout
        while any(procs.title(p) == PLAIN_WORKER for p in self.old_generation) and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        return {**result, "preview": port}

    @routing
    async def route(self, port: int) -> dict[str, Any]:
        """All traffic to `port`, and no preview (its port may be about to stop)."""
        before, self.preview_port = self.preview_port, None
        try:
            return await self.switch_to(port)
        except BaseException:
            self.preview_port = before
            raise

    @routing
    async def undo(self) -> None:
        """Put the file from before the last route back and load it (test, reload, confirm):
        for when something found after a confirmed reload says the new file must not stay."""
        self.put_back()
        self.undo_port = None
        await self.apply(0)

    async def apply(self, port: int) -> dict[str, Any]:
        """Test the file on disk, reload, confirm; remember the old worker generation for the drain."""
        self.signalled = False  # whether nginx may have loaded the file: only then does recover reload
        t0 = time.monotonic()
        await run_command(self.master.test_argv(), "nginx -t", "nginx_test_failed")
        t1 = time.monotonic()
        master = self.master.master_pid()
        before = workers(master)
        offset = self.log.offset()
        await self.master.send_reload(master)
        self.signalled = True
        t2 = time.monotonic()
        await self.confirm(master, before, offset)
        t3 = time.monotonic()
        self.old_generation = set(before)
        return {
            "port": port,
            "test": round(t1 - t0, 4),
            "reload": round(t2 - t1, 4),
            "confirm": round(t3 - t2, 4),
            "old_workers": len(before),
        }

    async def recover(self, port: int | None) -> None:
        """After a failed confirmation: a reload, so that the running nginx loads the restored file."""
        if not self.signalled:
            return
        try:
            master = self.master.master_pid()
            await self.master.send_reload(master)
        except (NginxError, OSError):
            pass

    async def confirm(self, master: int, before: dict[int, str], log_offset: int) -> None:
        # The current generation only: right after a reload the previous one may still be titled
        # "worker process" for nginx's 100 ms, and it is never replaced again.
        expected = max(1, sum(1 for p, t in before.items() if t == PLAIN_WORKER and p not in self.old_generation))
        deadline = time.monotonic() + self.n.reload_timeout
        seen, steady_since = 0, time.monotonic()
        while True:
            if not procs.alive(master):
                raise NginxError(
                    f"the nginx master (pid {master}) exited during the reload: "
                    + " | ".join(self.log.since(log_offset) or ["no error logged"]),
                    code="nginx_down",
                )
            now = workers(master)
            new = [p for p, t in now.items() if p not in before and t == PLAIN_WORKER]
            # New workers exist only once the master accepted the new config: that is the switch.
            # nginx tells the old workers to quit 100 ms later (hard-coded); the drain phase then
            # waits until every one of them has exited, which is stronger than "shutting down".
            if len(new) >= expected:
                return
            # Fewer than expected: `before` may have held two generations (another reload of this
            # nginx, e.g. a second app's daemon, ran just before ours). nginx forks a generation's
            # workers at once: a count that stays the same for STEADY is all of it.
            if len(new) != seen:
                seen, steady_since = len(new), time.monotonic()
            elif seen and time.monotonic() - steady_since >= STEADY:
                return
            # Only [emerg] means the master refused the config; [alert]/[crit] lines also come from
            # running workers (e.g. "write() to access.log was incomplete" on a full disk).
            errors = [ln for ln in self.log.since(log_offset) if "[emerg]" in ln]
            if errors and not new:
                raise NginxError(
                    "nginx refused the new config and kept the old one: " + " | ".join(errors),
                    code="nginx_reload_failed",
                    nginx=errors,
                )
            if time.monotonic() > deadline:
                raise NginxError(
                    f"the reload was not confirmed within {self.n.reload_timeout:g}s "
                    f"({len(new)} new worker(s) of {expected})"
                    + (": " + " | ".join(errors) if errors else "; see nginx's error log"),
                    code="nginx_reload_failed",
                    nginx=errors,
                )
            await asyncio.sleep(POLL)

    async def wait_released(self, port: int, deadline: float) -> int:
        """Wait until every worker that predates the last reload has exited (only those can still
        send a request to a port no longer in the upstream); return how many have not."""
        left = [p for p in self.old_generation if procs.alive(p)]
        while left and time.monotonic() < deadline:
            await asyncio.sleep(POLL * 2)
            left = [p for p in left if procs.alive(p)]
        return len(left)
