"""The real I/O behind each swap phase (swap.SwapOps), on an App's public parts.

A plan without an old app is the first start: its switch starts (or points) nginx, and there
is nothing to switch back to, drain or stop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from .. import builds, client
from ..aio import shielded
from ..errors import Aborted, AppDied, AppError, BluegreenError, StateError
from ..processes import probes, slots
from ..state import SlotState
from .phases import Phase, Plan

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")
AppPlan = Plan[slots.AppProcess]


class SlotOps:
    def __init__(self, app: App, emit: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
        self.app = app
        self.cfg = app.config
        self.emit = emit  # a hook's output lines, as events
        self.before: tuple[SlotState | None, str | None] = (None, None)
        self.still_open = 0  # connections the drain left open on the old build (its stop cuts them, or not)

    async def prepare(self, plan: AppPlan) -> dict[str, Any]:
        builds.check_build(plan.build)
        if self.app.release.warm is not None:  # it holds the slot this swap needs
            await self.app.release.end_warm("a new swap needs its slot")
        await self.app.spare.end("a swap needs its slot")
        if self.app.proxy.preview_port is not None:  # left by an abort whose preview could not be ended
            await self.app.proxy.preview(None)
        await self.app.free_port(plan.port)
        if plan.watch:
            await self.app.release.rollouts.start_watch()
        return {"slot": plan.slot, "port": plan.port, "build": str(plan.build)}

    async def start(self, plan: AppPlan) -> tuple[slots.AppProcess, dict[str, Any]]:
        standby = await self.app.launcher.spawn(plan.slot, plan.build)
        self.app.standby_started(standby)
        return standby, {"pid": standby.pid, "log": str(standby.log_path)}

    async def wait_ready(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        ready = self.cfg.app.ready
        r = await probes.wait_ready(standby, ready, self.app.launcher.url(ready.url, standby))
        return {"checks": r.checks, "target": r.target, "log_line": r.log_line}

    async def hook(self, name: str, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        return await self.app.release.run_hook(name, plan, self.emit)

    async def pause(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        """Preview on; wait for promote, abort, the pause_timeout or the active build's death;
        preview off (a promote's switch follows at once)."""
        from .controller import Pause

        app, old, timeout = self.app, plan.old, self.cfg.release.pause_timeout
        assert old is not None
        token = secrets.token_urlsafe(18) if self.cfg.release.preview_token == "random" else ""
        await app.proxy.preview(standby.port, token)
        pause = app.release.pause = Pause(standby, until=time.time() + timeout, token=token)
        app.release.paused.set()
        log.info("paused: preview requests go to %s (port %d) until promote or abort", standby.build, standby.port)
        deadline = time.monotonic() + timeout
        try:
            while not pause.decision.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    pause.decide("timeout")
                elif not old.alive():
                    pause.decide("the active build died while the swap was paused")
                else:
                    await asyncio.wait({pause.decision}, timeout=min(0.25, left))
        finally:
            app.release.pause = None
            try:
                await shielded(app.proxy.preview(None))
            except BluegreenError as e:
                log.error("could not end the preview (the next swap ends it): %s", e.message)
        decision, paused_for = pause.decision.result(), round(time.time() - pause.since, 3)
        if decision == "promote":
            return {"paused_for": paused_for, "decision": "promote"}
        if decision == "abort":
            raise Aborted(f"aborted by `bluegreen abort` after {paused_for:.1f}s paused; the standby was stopped and "
                          "traffic is unchanged")
        if decision == "timeout":
            raise Aborted(f"no promote or abort within release.pause_timeout ({timeout:g}s): the paused swap was "
                          "aborted, the standby stopped; traffic is unchanged", code="pause_timeout")
        raise Aborted(f"{decision}: the paused swap was aborted and the standby stopped; the daemon restarts the "
                      "active build")

    async def watch(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        return await self.app.release.rollouts.watch(plan, standby)

    async def rollout(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        return await self.app.release.rollouts.rollout(plan, standby, self.emit)

    async def check(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        results = await probes.run_checks(standby.port, self.cfg.release.checks)
        failed = probes.checks_failed(results)
        if failed is not None:
            raise failed
        return {"checks": results}

    async def switch(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        if plan.warm is not None:  # recorded as the standby with the commit, like a started one
            self.app.standby_started(standby)
        if not standby.alive():
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} right after it "
                           "became ready; nginx was not switched", code="app_exited")
        keeper = self.app.keeper
        if plan.old is not None and keeper.unsaved and not keeper.retry():  # the commit could not be written
            raise StateError(f"state.json cannot be written ({keeper.error}); nginx was not switched",
                             traffic="unchanged")
        if plan.old is None:
            await self.app.point_nginx_at(plan.port, force=True)
            return {"port": plan.port}
        result = await self.app.proxy.route(plan.port)
        if not standby.alive():  # it died while nginx reloaded: put the old upstream back at once
            back = await self.switch_back(plan)
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} during the switch; "
                           + ("nginx was switched back" if back else "and nginx could not be switched back; see the "
                              "daemon log"), code="app_exited")
        return result

    async def switch_back(self, plan: AppPlan) -> bool:
        if plan.old is None:
            return False
        try:
            await self.app.proxy.route_back(plan.old.port)
        except BluegreenError as e:
            log.error("could not switch nginx back to port %d: %s", plan.old.port, e.message)
            return False
        log.info("nginx switched back to port %d", plan.old.port)
        return True

    async def commit(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        app = self.app
        self.before = app.keeper.snapshot()
        app.serving(standby, previous=plan.old_build if plan.is_release else None)
        if plan.warm is not None:
            app.release.drop_warm()  # it serves again (if the write fails, the switch back stops it)
        try:
            app.keeper.save()
        except BluegreenError:
            app.keeper.restore(self.before)
            raise
        app.committed(standby, plan.old)
        return {"state": str(app.keeper.store.path)}

    async def keep(self, plan: AppPlan, standby: slots.AppProcess) -> None:
        """nginx serves from the standby and cannot be switched back: it is the active app now.
        state.json still names the old one (its write failed), and the old one keeps running, so
        a daemon restarted before the write succeeds still finds a consistent world."""
        app = self.app
        app.serving(standby, previous=plan.old_build if plan.is_release else None)
        app.keeper.save_quietly()
        app.committed(standby, plan.old)
        if plan.old is None:  # the first start: there is nothing to go back to
            app.warn(f"state.json could not be written: {standby.build} serves, but a restarted daemon would "
                     f"not know it. Free disk space in {app.state_dir}: the daemon retries the write by itself")
        else:
            app.warn(f"state.json could not be written, and nginx could not be switched back: the new build "
                     f"({standby.build}) serves, while state.json still names the old one. Free disk space "
                     f"in {app.state_dir}: the daemon retries the write by itself, then stops the old build")
        log.error("%s", app.warning)

    async def revert(self, plan: AppPlan, standby: slots.AppProcess, why: str) -> bool:
        """After commit: send traffic back to the old build, if it still runs, and drop the new one
        (drained first if it still serves)."""
        app, old = self.app, plan.old
        if old is None or not old.alive() or not await self.switch_back(plan):
            return False
        app.keeper.restore(self.before)
        app.reverted(old)
        app.keeper.save_quietly()
        app.event("reverted", slot=old.slot, pid=old.pid, build=str(old.build),
                  why=standby.exit_reason or slots.describe_exit(standby.returncode) if why == "died" else why)
        await self.discard(standby, drain=standby.alive())
        return True

    async def exited(self, standby: slots.AppProcess) -> None:
        await standby.wait()

    def died(self, standby: slots.AppProcess, phase: Phase, where: str) -> AppDied:
        why = standby.exit_reason or slots.describe_exit(standby.returncode)
        when = "while paused" if phase == Phase.PAUSED else f"during the {phase}"
        return AppDied(f"the new build ({standby.slot}, pid {standby.pid}) {why} {when}; {where}. "
                       f"See {standby.log_path}" + slots.exit_hint(standby.returncode))

    async def drain(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        old = plan.old
        assert old is not None
        if plan.old_hung:  # what is inside it never ends: stopped now, not after drain.timeout
            return {"skipped": "the old build was found hung: its requests cannot finish (they are counted lost)"}
        result = await self.app.drain(old, watch=standby)
        if result.pop("died"):
            why = slots.describe_exit(standby.returncode)
            raise AppDied(
                f"the new build ({standby.slot}, pid {standby.pid}) {why} {result['after']:.2f}s after the switch, "
                f"while the old build was still serving its last requests; traffic is back on the old build "
                f"({old.slot}, pid {old.pid}), which never stopped. See {standby.log_path}"
                + slots.exit_hint(standby.returncode))
        stop = self.cfg.app.stop
        if result["timed_out"]:
            self.still_open = result["still_open"]
            running = (f"{result['still_open']} request(s) still running on the old build" if result["still_open"] else
                       f"nginx still held {result['old_workers_left']} old worker(s) on the old build")
            result["warning"] = (f"{running} at drain.timeout ({self.cfg.drain.timeout:g}s): it gets "
                                 f"{stop.signal.name} now, and what it has not finished within app.stop.timeout "
                                 f"({stop.timeout:g}s) is cut by SIGKILL")
            log.warning("drain of %s: %s", old.slot, result["warning"])
        if result["long_lived_left"]:
            self.still_open += result["long_lived_left"]
            left = (f"{result['long_lived_left']} long-lived connection(s) could not be closed at "
                    f"drain.long_lived_grace ({result['cut_error']}): the old build gets {stop.signal.name} now, "
                    f"and SIGKILL after app.stop.timeout ({stop.timeout:g}s) if they hold it")
            result["warning"] = f"{result['warning']}; {left}" if result.get("warning") else left
            log.warning("drain of %s: %s", old.slot, left)
        if result["long_lived_cut"]:
            log.info("drain of %s: closed long-lived connections at the grace: %s", old.slot, result["long_lived_cut"])
        for said in client.drain_warnings(result):
            result["warning"] = f"{result['warning']}; {said}" if result.get("warning") else said
            log.warning("drain of %s: %s", old.slot, said)
        del result["after"]
        return result

    async def stop_old(self, plan: AppPlan) -> dict[str, Any]:
        assert plan.old is not None
        if plan.keep_warm > 0 and plan.old.alive() and plan.is_release:
            until = self.app.release.keep_warm(plan.old, plan.keep_warm)
            self.app.retired(plan.old)
            return {"pid": plan.old.pid, "how": f"kept warm for {plan.keep_warm:g}s (no traffic)", "warm_until": until}
        result = await self.app.stop(plan.old, graceful=not plan.old_hung)  # (hung: its stop would hang too)
        self.app.retired(plan.old)
        if self.still_open:  # what became of the connections the drain left open, exactly
            result["warning"] = (f"{self.still_open} connection(s) left open at drain.timeout were cut: the old build "
                                 if result.get("killed") else
                                 f"the {self.still_open} connection(s) left open at drain.timeout were not cut: the old "
                                 "build finished them and ") + result["how"]
        elif result.get("killed"):  # nothing left open, and still no exit: the app's own shutdown hangs
            result["warning"] = f"the old build {result['how']}: it did not exit on its own within app.stop.timeout"
        return result

    async def discard(self, standby: slots.AppProcess, *, drain: bool) -> None:
        if drain:
            result = await self.app.drain(standby)
            if result["timed_out"]:
                log.warning("drain of standby %s: drain.timeout (%gs) reached with %d connection(s) still open, "
                            "nginx still holding on (%d); stopping it", standby.slot, self.cfg.drain.timeout,
                            result["still_open"], result["old_workers_left"])
        result = await self.app.stop(standby)
        log.info("standby %s (pid %d) %s", standby.slot, standby.pid, result["how"])
        self.app.standby_gone(standby)
