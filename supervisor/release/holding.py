"""What nginx holds for one app (the runtime switch's hold server: bluegreen.lua): what a crash
cost, counted from nginx's counters as they were while the app still lived, and the pause an
operator asks for (`pause`, `resume`). The I/O is the proxy's `hold` call; nothing here routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from .. import client
from ..config.schema import Config
from ..errors import BluegreenError
from ..proxy.counters import Hold
from ..proxy.front import FrontProxy
from .phases import SwapRecord

log = logging.getLogger("bluegreen")
SETTLE = 1.0  # seconds a crash restart waits, at most, for nginx's counts to settle (held requests on their way)


class Holding:
    def __init__(self, config: Config, proxy: FrontProxy, event: Callable[..., None]) -> None:
        self.config, self.proxy, self.event = config, proxy, event
        self.before: Hold | None = None  # nginx's counters before a crash, until the swap that serves again counts them
        self.counted: Hold | None = None  # nginx's counters when the last crash was counted: the next one's floor
        self.paused: tuple[float, float, Hold] | None = None  # `pause`: since (wall clock), hold per request, counters
        self.seen: Hold | None = None  # nginx's counters at the last look while the active app lived
        self.fresh_nginx = False  # nginx restarted since that look: its old workers' counts are gone
        self.partial = False  # so for the outage being counted: its record says its counts are partial

    def looked(self, seen: Hold) -> None:
        """nginx's counters while the active app lived (and was not dying): a crash's baseline."""
        self.seen, self.fresh_nginx = seen, False

    def nginx_restarted(self) -> None:
        """What the old nginx held and lost died with it: no baseline, no floor from it, and the
        outage under way (or the next) says its counts are partial."""
        self.seen, self.counted, self.fresh_nginx = None, None, True
        self.partial = self.partial or self.before is not None

    def crashed(self, now: Hold) -> None:
        """The active app died (or hung); nginx's counters are `now` (the last look's are the
        baseline; what an earlier crash's count already took in is not counted twice)."""
        if self.before is not None:
            return  # (a crash while the last one's outage lasts: one outage, counted once)
        before, self.partial = self.seen or now, self.fresh_nginx
        floor = self.counted
        later = floor is not None and floor.held + floor.lost > before.held + before.lost
        self.before = floor if later else before

    async def count(self, record: SwapRecord) -> None:
        """A swap serves again after a crash (its restart, or a release that was running): what
        nginx held since the crash (waiting a moment for those still on their way to the new
        build) goes in its record, the history and the log."""
        if not record.committed or self.before is None:
            return
        before, self.before = self.before, None
        deadline = time.monotonic() + SETTLE
        try:
            now, last = await self.proxy.hold(), None
            # Until nothing is held and two looks 50 ms apart agree: what a stopped app's last
            # requests cost is logged by nginx a moment after its end.
            while now is not None and (now.holding or last != now) and time.monotonic() < deadline:
                await asyncio.sleep(0.05 if not now.holding else 0.02)
                last, now = now, await self.proxy.hold()
        except BluegreenError:
            return
        if now is None:
            return
        self.counted = now
        record.details["hold"] = held = now.since(before).report()
        if self.partial:
            held["nginx_restarted"], self.partial = True, False
        log.info("the crash restart %s", client.hold_line(held))

    async def pause(self, hold: float | None) -> dict[str, Any]:
        """Hold every new request in nginx (each up to `hold`, default hold.timeout) until resume()."""
        hold = hold or self.config.hold.timeout or 10.0
        before = await self._counters("pause")
        await self.proxy.hold(f"pause {hold:g}")
        self.paused = (self.paused[0] if self.paused else time.time(), hold, self.paused[2] if self.paused else before)
        log.warning("paused: nginx holds every new request (each up to %gs) until `bluegreen resume`", hold)
        self.event("paused", hold=hold)
        return {"timeout": hold, "since": self.paused[0]}

    async def resume(self) -> dict[str, Any]:
        """End the pause; what it held, and for how long."""
        await self._counters("resume")
        now = await self.proxy.hold("resume")
        assert now is not None
        if self.paused is None:
            raise BluegreenError("nothing is paused", code="not_paused")
        since, _, before = self.paused
        self.paused = None
        counts = now.since(before)
        took = time.time() - since
        log.info("resumed after %.1fs: nginx held %d request(s), %d timed out, %d turned away", took, counts.held,
                 counts.timed_out, counts.full)
        self.event("resumed", paused_for=round(took, 3), held=counts.held, hold_timeouts=counts.timed_out,
                   turned_away=counts.full)
        return {"paused_for": took, "held": counts.held, "hold_timeouts": counts.timed_out, "turned_away": counts.full}

    async def resume_an_orphan_pause(self) -> None:
        """nginx still paused by a daemon that is gone (stopped, killed): resume it. A pause nobody
        owns would hold every request until each times out, with no one to end it."""
        try:
            now = await self.proxy.hold()
            if now is not None and now.paused and self.paused is None:
                await self.proxy.hold("resume")
                log.warning("nginx was paused by a daemon that is gone: resumed (pause again if you still need it)")
                self.event("resumed", why="the daemon that paused is gone", held_now=now.holding)
        except BluegreenError as e:
            log.warning("could not look at nginx's pause: %s", e.message)

    async def pause_again(self) -> str | None:
        """A restarted nginx forgot the pause (its table is empty): pause it again."""
        if self.paused is None:
            return None
        now = await self.proxy.hold()
        if now is None or now.paused:
            return None
        await self.proxy.hold(f"pause {self.paused[1]:g}")
        if self.paused is None:  # resumed meanwhile: nginx must not stay paused with nobody to end it
            await self.proxy.hold("resume")
            return None
        return "the pause"

    async def _counters(self, verb: str) -> Hold:
        """nginx's hold counters, or why this app cannot be paused."""
        now = await self.proxy.hold()
        if now is None:
            why = ("the reload switch holds nothing" if self.proxy.mode != "runtime" else
                   f'an app.protocol = "{self.config.app.protocol}" service' if self.config.app.protocol != "http"
                   else "hold.timeout = 0 turns holding off")
            raise BluegreenError(f"cannot {verb}: {why}; pause needs the runtime switch and an HTTP app with "
                                 "hold.timeout above 0", code="cannot_hold")
        return now
