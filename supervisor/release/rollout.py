"""Judging a new build while it takes traffic: a gradual rollout (a growing share of users, each
step watched against the old build) and the watch after a plain swap. The numbers come from
nginx's counters (runtime switch); the verdict is verdict.judge's, pure; this module acts on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import Aborted, BluegreenError, NginxError, RolloutAborted
from ..processes import slots
from ..proxy.front import TrafficSplit
from .phases import Plan
from .verdict import Counters, Rules, Verdict, judge

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")
ROLLOUT_POLL = 0.25  # seconds between two looks at what nginx counted
WATCH_UNREAD = 10.0  # seconds a watch goes on without nginx's counters (a restart) before it gives up
Reply = Callable[[dict[str, Any]], None]


@dataclass
class Decision:
    """A swap waiting on a person: `promote` or `abort` decides (or the daemon itself does)."""

    standby: slots.AppProcess
    since: float = field(default_factory=time.time)
    decision: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def decide(self, what: str) -> None:
        if not self.decision.done():
            self.decision.set_result(what)


@dataclass
class Rolling(Decision):
    """A rollout in progress: promote jumps to everyone, abort goes back to no one."""

    share: int = 0
    step: int = 0
    steps: tuple[int, ...] = ()
    verdict: str = ""

    def info(self) -> dict[str, Any]:
        """For status: where the rollout stands, and its latest verdict."""
        return {"share": self.share, "step": self.step, "steps": len([s for s in self.steps if s < 100]),
                "port": self.standby.port, "since": self.since, "verdict": self.verdict}


class Rollouts:
    """The running rollout (promote and abort decide it) and the running swap's watch generation."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.rolling: Rolling | None = None
        self.watch_gen = 0  # the counters generation of the running swap's watch
        self.unread_since: float | None = None  # since when nginx's counters do not answer

    async def rollout(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess, emit: Reply) -> dict[str, Any]:
        """Each share of users in turn, for step_seconds and until the verdict passes; a failed
        verdict or an abort sends everyone back to the old build at once and raises."""
        from ..aio import shielded

        proxy, old, split = self.app.proxy, plan.old, self._split()
        assert old is not None
        ro = self.rolling = Rolling(standby, steps=plan.rollout)
        base, self.unread_since = _generation(), None
        done: list[dict[str, Any]] = []
        try:
            for i, share in enumerate(s for s in plan.rollout if s < 100):
                gen, began = base + i, time.monotonic()
                await split.split(standby.port, share, gen)
                ro.share, ro.step = share, i + 1
                while not ro.decision.done():
                    await asyncio.wait({ro.decision}, timeout=ROLLOUT_POLL)
                    if not old.alive():  # the new build is all that is left: everyone goes there now
                        log.error("the old build (pid %d) died during the rollout; moving everyone to the new build",
                                  old.pid)
                        ro.decide("old_died")
                        break
                    verdict = await self._verdict(gen, standby, old)
                    if verdict is None:
                        continue
                    ro.verdict = verdict.reason
                    waited = time.monotonic() - began
                    if verdict.failed:
                        raise _aborted(i + 1, share, f", after {waited:.1f}s: {verdict.reason}", verdict, done)
                    if verdict.outcome.value == "pass" and waited >= plan.step_seconds:
                        break
                    if waited >= self.app.config.rollout.step_timeout:
                        raise _aborted(i + 1, share, f" reached no verdict within rollout.step_timeout "
                                       f"({self.app.config.rollout.step_timeout:g}s): {verdict.reason} (a quiet site: "
                                       "lower rollout.min_requests, or raise rollout.step_timeout)", verdict, done)
                if ro.decision.done():
                    break
                done.append({"step": i + 1, "share": share, "seconds": round(time.monotonic() - began, 2),
                             "verdict": verdict.reason})
                emit({"event": "rollout", "status": "step", **done[-1]})
            what = ro.decision.result() if ro.decision.done() else "complete"
            if what == "abort":
                raise Aborted(f"aborted by `bluegreen abort` at {ro.share} % of users; everyone is back on the old "
                              "build, the new one is drained and stopped")
            if what == "old_died":  # nobody promoted: said as it happened
                return {"steps": done, "promoted_at": None, "warning": f"the old build died at {ro.share} % of "
                        "users: everyone moved to the new build, unjudged"}
            return {"steps": done, "promoted_at": ro.share if what == "promote" else None}
        except BaseException:
            try:  # one routing change: everyone on the old build (a route ends the split)
                await shielded(proxy.route(old.port))
            except BluegreenError as e:
                log.error("could not end the rollout's split: %s", e.message)
            raise
        finally:
            self.rolling = None

    def _split(self) -> TrafficSplit:
        """The front proxy as a TrafficSplit: the config schema refuses a rollout or a watch without one."""
        split = self.app.proxy.traffic_split()
        assert split is not None, "a rollout or a watch needs the runtime switch"
        return split

    async def start_watch(self) -> None:
        """Count from now (the old build's traffic before the switch is the watch's baseline)."""
        self.watch_gen = _generation()
        await self._split().split(None, 0, self.watch_gen)

    async def watch(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        """Judge the new build for plan.watch seconds after the switch, against the old build's
        traffic before it; RolloutAborted (the caller goes back to the old build) if it fails."""
        old, began = plan.old, time.monotonic()
        assert old is not None
        self.unread_since = None
        while True:
            await asyncio.sleep(ROLLOUT_POLL)
            verdict = await self._verdict(self.watch_gen, standby, old)
            if verdict is None:
                continue
            if verdict.failed:
                raise RolloutAborted(f"the watch after the switch, {time.monotonic() - began:.1f}s in: "
                                     f"{verdict.reason}; traffic is back on the old build, which never stopped, "
                                     "and the new one is drained and stopped", verdict=verdict.reason)
            if time.monotonic() - began >= plan.watch:
                return {"seconds": round(time.monotonic() - began, 2), "verdict": verdict.reason}

    async def _verdict(self, gen: int, new: slots.AppProcess, old: slots.AppProcess) -> Verdict | None:
        """The new build judged against the old one, on what nginx counted in generation `gen`;
        None while nginx does not answer (restarting: its counters come back, from zero, with it
        and the daemon's reconcile), NginxError `watch_failed` once that lasted WATCH_UNREAD."""
        r = self.app.config.rollout
        try:
            stats = await self._split().stats(gen)
        except NginxError as e:
            self.unread_since = self.unread_since or time.monotonic()
            if time.monotonic() - self.unread_since < WATCH_UNREAD:
                return None
            raise NginxError(f"nginx's counters could not be read for {WATCH_UNREAD:g}s ({e.message}); traffic is "
                             "back on the old build, which never stopped", code="watch_failed") from None
        self.unread_since = None
        return judge(stats.get(new.port, Counters()), stats.get(old.port, Counters()),
                     Rules(r.min_requests, r.max_error_rate, r.error_ratio, r.latency_ratio))

    async def end_split(self, plan: Plan[slots.AppProcess]) -> None:
        """After a rollout or a watched swap, however it ended: no split, no counting, no counters."""
        split = self.app.proxy.traffic_split()
        if (plan.rollout or plan.watch) and split is not None:
            try:
                await split.end_split()
            except BluegreenError as e:
                log.warning("could not drop the rollout's counters: %s", e.message)


def _aborted(step: int, share: int, why: str, verdict: Verdict, done: list[dict[str, Any]]) -> RolloutAborted:
    return RolloutAborted(f"step {step} ({share} % of users){why}; everyone is back on the old build, the new one "
                          "is drained and stopped", step=step, share=share, verdict=verdict.reason, steps=done)


def _generation() -> int:
    """A counters generation unique to this rollout or watch (a rollout adds its step number);
    under 10^14, which lua prints exactly."""
    return int(time.time()) % 10**9 * 100
