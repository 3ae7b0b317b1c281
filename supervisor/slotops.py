"""The real I/O behind each swap phase (swap.SwapOps), on an App's public parts.

A plan without an old app is the first start: its switch starts (or points) nginx, and there
is nothing to switch back to, drain or stop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import probes, slots
from .errors import AppDied, AppError, BluegreenError
from .state import SlotState
from .swap import Plan

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")
AppPlan = Plan[slots.AppProcess]


class SlotOps:
    def __init__(self, app: App) -> None:
        self.app = app
        self.cfg = app.config
        self.before: tuple[SlotState | None, str | None] = (None, None)

    async def prepare(self, plan: AppPlan) -> dict[str, Any]:
        from .app import check_build

        check_build(plan.build)
        await self.app.free_port(plan.port)
        return {"slot": plan.slot, "port": plan.port, "build": str(plan.build)}

    async def start(self, plan: AppPlan) -> tuple[slots.AppProcess, dict[str, Any]]:
        standby = await self.app.launcher.spawn(plan.slot, plan.build)
        self.app.standby = standby
        return standby, {"pid": standby.pid, "log": str(standby.log_path)}

    async def wait_ready(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        ready = self.cfg.app.ready
        r = await probes.wait_ready(standby, ready, self.app.launcher.url(ready.url, standby))
        return {"checks": r.checks, "target": r.target, "log_line": r.log_line}

    async def check(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        results = await probes.run_checks(standby.port, self.cfg.release.checks)
        failed = probes.checks_failed(results)
        if failed is not None:
            raise failed
        return {"checks": results}

    async def switch(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        if not standby.alive():
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} right after it "
                           "became ready; nginx was not switched", code="app_exited")
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
        self.before = app.ledger.snapshot()
        app.serving(standby, previous=plan.old_build if plan.is_release else None)
        try:
            app.ledger.save()
        except BluegreenError:
            app.ledger.restore(self.before)
            raise
        app.active, app.standby, app.retiring = standby, None, plan.old
        return {"state": str(app.ledger.store.path)}

    async def keep(self, plan: AppPlan, standby: slots.AppProcess) -> None:
        """nginx serves from the standby and cannot be switched back: it is the active app now.
        state.json still names the old one (its write failed), and the old one keeps running, so
        a daemon restarted before the write succeeds still finds a consistent world."""
        app = self.app
        app.serving(standby, previous=plan.old_build if plan.is_release else None)
        app.ledger.save_quietly()
        app.active, app.standby, app.retiring = standby, None, plan.old
        if plan.old is None:  # the first start: there is nothing to go back to
            app.warning = (f"state.json could not be written: {standby.build} serves, but a restarted daemon would "
                           f"not know it. Free disk space in {app.state_dir}: the daemon retries the write by itself")
        else:
            app.warning = (f"state.json could not be written, and nginx could not be switched back: the new build "
                           f"({standby.build}) serves, while state.json still names the old one. Free disk space "
                           f"in {app.state_dir}: the daemon retries the write by itself, then stops the old build")
        log.error("%s", app.warning)

    async def revert(self, plan: AppPlan, standby: slots.AppProcess) -> bool:
        """The new build died while the old one drained: send traffic back to the old one."""
        app, old = self.app, plan.old
        if old is None or not old.alive() or not await self.switch_back(plan):
            return False
        app.ledger.restore(self.before)
        app.active, app.retiring = old, None
        app.ledger.save_quietly()
        app.event("reverted", slot=old.slot, pid=old.pid, build=str(old.build),
                  dead=standby.exit_reason or slots.describe_exit(standby.returncode))
        await self.discard(standby, drain=False)
        return True

    async def drain(self, plan: AppPlan, standby: slots.AppProcess) -> dict[str, Any]:
        old = plan.old
        assert old is not None
        result = await self.app.drain(old.port, watch=standby)
        if result.pop("died"):
            why = slots.describe_exit(standby.returncode)
            raise AppDied(
                f"the new build ({standby.slot}, pid {standby.pid}) {why} {result['after']:.2f}s after the switch, "
                f"while the old build was still serving its last requests; traffic is back on the old build "
                f"({old.slot}, pid {old.pid}), which never stopped. See {standby.log_path}"
                + slots.exit_hint(standby.returncode))
        if result["timed_out"]:
            result["warning"] = (f"{result['connections_cut']} connection(s) still open on the old build at "
                                 f"drain.timeout ({self.cfg.drain.timeout:g}s) were cut")
            log.warning("drain of %s: %s", old.slot, result["warning"])
        del result["after"]
        return result

    async def stop_old(self, plan: AppPlan) -> dict[str, Any]:
        assert plan.old is not None
        result = await self.app.stop(plan.old)
        if self.app.retiring is plan.old:
            self.app.retiring = None
        return result

    async def discard(self, standby: slots.AppProcess, *, drain: bool) -> None:
        if drain:
            result = await self.app.drain(standby.port)
            if result["timed_out"]:
                log.warning("drain of standby %s: cut at drain.timeout (%gs): %d connection(s) still open, "
                            "nginx still holding on (%d)", standby.slot, self.cfg.drain.timeout,
                            result["connections_cut"], result["old_workers_left"])
        result = await self.app.stop(standby)
        log.info("standby %s (pid %d) %s", standby.slot, standby.pid, result["how"])
        if self.app.standby is standby:
            self.app.standby = None
