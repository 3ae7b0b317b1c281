"""What a release adds around the swap: its hooks, the pause for preview (swap --pause, then
promote or abort), and the old build kept warm after it (release.keep_warm) for an instant
rollback. One per App; the swap's phases (executor.py) and the control verbs drive it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config.schema import other_slot
from ..errors import BluegreenError
from ..processes import slots
from . import hooks
from .history import PEER
from .phases import RELEASES, Plan
from .rollout import Decision, Rollouts

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")
Reply = Callable[[dict[str, Any]], None]


@dataclass
class Pause(Decision):
    """A swap paused for preview (swap --pause): its standby serves preview requests only, until
    `promote` or `abort` decides, or release.pause_timeout does."""

    until: float = 0.0  # wall clock: the pause_timeout
    token: str = ""  # what the preview header or cookie must say (release.preview_token; "": 1)


@dataclass
class Warm:
    """The old build of the last release, still running with no traffic until `until`, so that
    `rollback` is one routing change."""

    app: slots.AppProcess
    until: float  # wall clock
    timer: asyncio.Task[Any] | None = None

    def usable(self) -> bool:
        return self.app.alive() and time.time() < self.until


class Release:
    def __init__(self, app: App) -> None:
        self.app = app
        self.rollouts = Rollouts(app)  # a rollout's steps, a watch: judged on nginx's counters
        self.pause: Pause | None = None
        self.paused = asyncio.Event()  # set when the running swap pauses for preview
        self.warm: Warm | None = None

    def plan(self, build: Path, reason: str, pause: bool, rollout: tuple[int, ...] = (),
             step_seconds: float | None = None, spare: slots.AppProcess | None = None,
             hung: bool = False) -> Plan[slots.AppProcess]:
        """A swap to `build`, with what its kind runs: a release gets the hooks, the checks, the
        pause it asked for, the warm build when it goes back to it, and keeps its old build warm;
        a crash restart gets the spare, if one was ready."""
        old = self.app.active
        assert old is not None
        slot = other_slot(old.slot)
        release = reason in RELEASES
        rollout = (rollout or self.app.config.rollout.steps) if reason == "swap" else ()
        kept = self.warm
        warm = spare or (kept.app if kept and kept.usable() and kept.app.build == build and release and not pause
                         else None)
        h = self.app.config.hooks
        watch = self.app.config.release.watch_seconds if reason == "swap" and not rollout else 0.0
        if (rollout or watch) and self.app.proxy.mode != "runtime":
            what = "a rollout" if rollout else "release.watch_seconds"
            raise BluegreenError(f"{what} needs the runtime switch; this daemon {self.app.switch_why} (install "
                                 "libnginx-mod-http-lua and use nginx.switch = \"auto\")", code="rollout_unavailable",
                                 traffic="unchanged")
        return Plan(build=build, slot=slot, port=self.app.config.app.port(slot), old=old, reason=reason,
                    old_build=old.build, checks=release and bool(self.app.config.release.checks),
                    hooks=frozenset(n for n in ("before_switch", "after_switch") if release and h.get(n)),
                    pause=pause, warm=warm, keep_warm=self.app.config.release.keep_warm if release else 0.0,
                    rollback_on_hook=h.after_switch_failed == "rollback", rollout=rollout,
                    step_seconds=step_seconds or self.app.config.rollout.step_seconds, watch=watch, old_hung=hung)

    async def check_warm(self) -> None:
        """A rollback is about to reuse the warm build: one readiness check first (no wait). One
        that does not answer is no longer warm: it is stopped, and the rollback starts it afresh."""
        warm = self.warm
        if warm is None or not warm.usable():
            return
        from ..processes import probes

        ready = self.app.config.app.ready
        ok, what = await probes.answers(warm.app.port, ready, self.app.launcher.url(ready.url, warm.app))
        if not ok:
            log.warning("the warm %s (pid %d) does not answer (%s): rolling back with a fresh start",
                        warm.app.slot, warm.app.pid, what)
            await self.end_warm(f"it did not answer a readiness check ({what})")

    def hook_env(self, plan: Plan[slots.AppProcess]) -> dict[str, str]:
        old = plan.old
        return {"BLUEGREEN_OLD_BUILD": str(old.build) if old else "", "BLUEGREEN_NEW_BUILD": str(plan.build),
                "BLUEGREEN_OLD_PORT": str(old.port) if old else "", "BLUEGREEN_NEW_PORT": str(plan.port),
                "BLUEGREEN_REASON": plan.reason, hooks.MARKER: str(self.app.state_dir)}

    async def run_hook(self, name: str, plan: Plan[slots.AppProcess], emit: Reply,
                       extra: dict[str, str] | None = None) -> dict[str, Any]:
        argv = self.app.config.hooks.get(name)
        assert argv is not None
        return await hooks.run(name, argv, self.app.launcher.context(plan.slot, plan.build),
                               {**self.hook_env(plan), **(extra or {})}, plan.build, self.app.config.hooks.timeout,
                               emit)

    async def after_failure(self, plan: Plan[slots.AppProcess], e: BluegreenError, emit: Reply) -> None:
        """hooks.after_failure, told what failed; its own failure is only logged."""
        try:
            await self.run_hook("after_failure", plan, emit, {
                "BLUEGREEN_ERROR_CODE": e.code, "BLUEGREEN_ERROR": e.message.splitlines()[0],
                "BLUEGREEN_PHASE": str(e.details.get("phase") or ""),
                "BLUEGREEN_TRAFFIC": str(e.details.get("traffic") or "")})
        except BluegreenError as hook_error:
            log.warning("%s", hook_error.message)

    async def until_paused(self, task: asyncio.Task[Any]) -> dict[str, Any] | None:
        """Wait until the swap `task` pauses (its pause_info) or ends first (None)."""
        paused = asyncio.ensure_future(self.paused.wait())
        try:
            await asyncio.wait({task, paused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            paused.cancel()
        return self.pause_info() if not task.done() else None

    def pause_info(self) -> dict[str, Any] | None:
        p = self.pause
        if p is None:
            return None
        r = self.app.config.release
        info = {"since": p.since, "until": p.until, "standby": p.standby.to_dict(),
                "header": f"{r.preview_header}: {p.token or 1}", "cookie": f"{r.preview_cookie}={p.token or 1}",
                "mode": self.app.proxy.mode}
        if self.app.managed is None and self.app.proxy.mode == "reload":
            from ..proxy.render import route_variable

            var = route_variable(self.app.config.nginx.upstream_name)
            info["needs"] = f"proxy_pass http://${var}; in your server block (see docs/releases.md#a-release-with-preview-promote-and-rollback)"
        return info

    def decide(self, what: str) -> Decision:
        """`promote` or `abort` the paused swap; not_paused if there is none."""
        target = self.pause or self.rollouts.rolling
        if target is None or target.decision.done():
            running = (f"a {self.app.swap.reason} to {self.app.swap.build} is in phase {self.app.swap.phase}"
                       if self.app.swap is not None and self.app.swapping() else "no swap is running")
            raise BluegreenError(f"nothing to {what}: no swap is paused or rolling out ({running}); `bluegreen swap "
                                 "BUILD --pause` (or --rollout) starts one that waits for promote or abort",
                                 code="not_paused")
        if self.app.swap is not None:
            self.app.swap.decided = {"what": what, "by": PEER.get(), "at": time.time()}
        target.decide(what)
        return target

    async def abort_pause(self, why: str) -> None:
        """End a paused swap because of something other than a user (the active build died)."""
        if self.pause is not None and self.app.swap_task is not None:
            log.warning("aborting the paused swap: %s", why)
            self.pause.decide(why)
            await asyncio.gather(self.app.swap_task, return_exceptions=True)

    def keep_warm(self, old: slots.AppProcess, seconds: float) -> float:
        """Keep `old` running (no traffic) for `seconds`, then stop it; when that will be."""
        until = time.time() + seconds
        self.warm = Warm(old, until)
        self.warm.timer = asyncio.ensure_future(self._cool(self.warm, seconds))
        self.app.keeper.warm(slots.slot_state(old), until)
        self.app.keeper.save_quietly()
        return until

    async def _cool(self, warm: Warm, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.warm is warm and not self.app.swapping():
            await self.end_warm("its keep_warm window is over")

    def drop_warm(self) -> Warm | None:
        """No longer warm (it serves again, or is about to stop): its timer and its record go; the
        process is the caller's."""
        warm, self.warm = self.warm, None
        if warm is not None and warm.timer is not None and warm.timer is not asyncio.current_task():
            warm.timer.cancel()
        self.app.keeper.warm(None, None)
        return warm

    async def notice_a_dead_warm(self) -> None:
        """A warm old build that died is said at once (and its slot is free for a spare)."""
        if self.warm is not None and not self.warm.app.alive():
            await self.end_warm(f"it exited ({slots.describe_exit(self.warm.app.returncode)})")

    async def end_warm(self, why: str) -> None:
        """Stop the warm old build (no traffic goes there: no drain)."""
        warm = self.drop_warm()
        if warm is None:
            return
        if warm.app.alive():
            result = await self.app.stop(warm.app)
            log.info("warm %s (pid %d, %s) stopped, %s: %s", warm.app.slot, warm.app.pid, warm.app.build, why,
                     result["how"])
        else:
            log.warning("the warm %s (pid %d, %s) is gone: %s; `rollback` starts it afresh", warm.app.slot,
                        warm.app.pid, warm.app.build, why)
        self.app.event("warm_stopped", slot=warm.app.slot, pid=warm.app.pid, why=why)
        self.app.keeper.save_quietly()
