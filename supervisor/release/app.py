"""One app's life cycle: its two slots, what serves, the one swap that may run at a time.

The process-level daemon (lock, signals, control socket, shutdown order) owns an App; the
monitor watches it; control commands drive it. Written for one app, holding nothing global,
so that a later `[[apps]]` list could hold several.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from .. import builds, faults
from ..config.schema import Config
from ..errors import BluegreenError, Busy, NotReadyYet, StateError
from ..processes import drain, slots
from ..processes.catcher import Catcher
from ..processes.launch import Launcher
from ..proxy import switch
from ..proxy.external import ExternalMaster
from ..proxy.managed import ManagedNginx
from ..proxy.master import Master, processes
from ..state import DaemonStatus, InterruptedSwap, StateKeeper, StateStore
from . import hooks, takeover
from .controller import Release
from .executor import SlotOps
from .history import PEER
from .holding import Holding
from .phases import RELEASES, Phase, Plan, SwapRecord, run_swap
from .spare import Spare

log = logging.getLogger("bluegreen")
Reply = Callable[[dict[str, Any]], None]


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.daemon.state_dir
        self.keeper = StateKeeper(StateStore(self.state_dir / "state.json"))
        self.managed = ManagedNginx(config) if config.nginx.mode == "managed" else None
        self.master: Master = self.managed or ExternalMaster(config)
        self.proxy, self.switch_why = switch.make(config, self.master, self.managed)
        self.launcher = Launcher(config)
        self.active: slots.AppProcess | None = None
        self.standby: slots.AppProcess | None = None
        self.retiring: slots.AppProcess | None = None  # a committed swap's old app, until stopped
        self.swap: SwapRecord | None = None
        self.swap_task: asyncio.Task[Any] | None = None
        self.listeners: list[Reply] = []  # the clients following the running swap (swap, then promote)
        self.watchers: list[Reply] = []  # the daemon's own, told of every swap event (systemd's STATUS=)
        self.release = Release(self)  # hooks, the pause for preview, the warm old build
        self.status = DaemonStatus.STARTING
        self.failure: str | None = None  # why it gave up (status FAILED)
        self.warning: str | None = None  # what is wrong right now, and what to do
        self.nginx_down: str | None = None  # why the managed nginx could not be restarted
        self.restarts = 0  # restarts of a crashed or hung app since it last ran stably
        self.holding = Holding(config, self.proxy, self.event)  # what nginx holds: a crash's cost, a pause
        self.spare = Spare(self)  # app.spare: the serving build, ready on the other slot
        self.catcher = Catcher()  # a copy of the active app's listener: its death resets nothing
        # On shutdown, leave the app (and a committed swap's old app) to the next daemon.
        self.keep_serving = config.daemon.on_stop == "keep"

    # ---- what serves

    def serving(self, app: slots.AppProcess, previous: Path | None = None) -> None:
        """Record `app` as the one that serves (and `previous`, for a release, as what served before)."""
        self.keeper.serving(slots.slot_state(app), self.managed.identity() if self.managed else None,
                            str(previous) if previous is not None else None)

    def event(self, kind: str, **details: Any) -> None:
        self.keeper.event(kind, **details)

    def swapping(self) -> bool:
        return self.swap_task is not None and not self.swap_task.done()

    # ---- start-up

    async def boot(self) -> None:
        """Adopt what a previous daemon left serving, or start the saved (else configured) build."""
        state = self.keeper.load()
        log.info("switch: %s: %s", self.proxy.mode, self.switch_why)
        if self.managed is not None and self.managed.adopt(state.nginx):
            log.info("adopted the running managed nginx (pid %d)", self.managed.pid)
        elif self.managed is not None:
            await self.managed.refuse_what_blocks_a_start()
        self.proxy.clean_stale_temp()
        await hooks.stop_leftovers(self.state_dir, lambda what: self.event("hook_stopped", hook=what))
        if await takeover.adopt(self):
            return
        slot, build = "blue", self.config.app.build
        if state.active is not None:  # the build that served last: a directory or a file (a WAR)
            saved = Path(state.active.build)
            why = builds.problem(saved.resolve()) if saved.exists() else "is gone"
            if why is None:
                slot, build = state.active.slot, saved
            else:
                log.warning("saved build %s %s; starting app.build %s", saved, why, build)
        plan: Plan[slots.AppProcess] = Plan(build=builds.check_build(build), slot=slot, port=self.config.app.port(slot),
                                            old=None, reason="start")
        record = SwapRecord(build=str(plan.build), to_slot=slot, to_port=plan.port, from_slot=None, reason="start")
        log.info("starting %s on %s (port %d)", plan.build, slot, plan.port)
        try:
            await run_swap(plan, SlotOps(self), _log_phase, record)
        finally:
            self.proxy.forget_undo()  # the staged copy of the previous upstream file is not kept past the start
        log.info("serving %s from %s (port %d)", plan.build, slot, plan.port)

    async def point_nginx_at(self, port: int, force: bool) -> None:
        """Make nginx send traffic to `port`: start the managed nginx if it is not running, else
        switch when forced, when its config changed, or when its routing names another port."""
        if self.managed is not None and not self.managed.alive():
            async with self.proxy.lock:
                info = await self.managed.start(port)
                self.proxy.port = port
            log.info("managed nginx pid %s listening on %s", info["pid"], info["listen"])
            return
        changed = self.managed is not None and await self.managed.ensure_config()
        if changed or self.proxy.config_stale():
            await self.proxy.apply_config(port)
            log.info("nginx reloaded its new config; traffic to port %d", port)
        elif force or await self.proxy.routed_port() != port:
            await self.proxy.route(port)
            log.info("nginx switched to port %d", port)
        self.proxy.port = port

    # ---- processes

    async def free_port(self, port: int) -> None:
        self.catcher.free(port)
        keep = {p.pid for p in (self.active, self.retiring) if p is not None}
        await self.launcher.free_port(port, keep, lambda what: self.event("leftover_stopped", port=port, detail=what))

    async def drain(self, app: slots.AppProcess, watch: slots.AppProcess | None = None,
                    since: float | None = None) -> dict[str, Any]:
        """Drain `app`'s port; `since` (wall clock): when traffic left it, if before now (a drain a
        killed daemon began: nginx's own backstop, worker_shutdown_timeout, runs from then too)."""
        d = self.config.drain
        gone = max(0.0, time.time() - since) if since else 0.0
        return await drain.wait_drained(app.port, self.proxy.wait_released, max(0.0, d.timeout - gone), d.interval,
                                        watch, max(0.0, d.grace - gone), self.config.app.protocol,
                                        lambda: slots.holders(app), lambda: processes(self.master),
                                        d.tcp_calls == "pipelined")

    async def stop(self, app: slots.AppProcess, graceful: bool = True) -> dict[str, Any]:
        self.catcher.drop(app.pid)
        s = self.config.app.stop
        return await slots.stop(app, s.signal, s.timeout if graceful else 0.0)

    async def retire(self, app: slots.AppProcess, drain: bool, since: float | None = None) -> dict[str, Any] | None:
        """Drain (if asked) and stop a leftover; the drain's report."""
        report = await self.drain(app, since=since) if drain else None
        result = await self.stop(app)
        log.info("stopped leftover %s (pid %d): %s", app.slot, app.pid, result["how"])
        return report

    async def retry_save(self) -> None:
        """state.json could not be written after traffic moved: write it once there is room, then
        let the old build go."""
        if not self.keeper.retry():
            return
        log.info("state.json written again")
        self.warning = None  # (not nginx_down: the monitor clears that)
        old, self.retiring = self.retiring, None
        if old is not None and old.alive():
            await self.retire(old, drain=True)

    # ---- what it is doing: changed only here (by the executor, the monitor, takeover, the daemon)

    def standby_started(self, proc: slots.AppProcess) -> None:
        self.standby = proc

    def standby_gone(self, proc: slots.AppProcess) -> None:
        if self.standby is proc:
            self.standby = None

    def committed(self, new: slots.AppProcess, old: slots.AppProcess | None) -> None:
        """`new` serves (adopted, or a swap's commit); `old` retires until `retired`."""
        self.active, self.standby, self.retiring = new, None, old
        self.catcher.drop(old.pid if old else None)

    def reverted(self, old: slots.AppProcess) -> None:
        self.active, self.retiring = old, None

    def retired(self, proc: slots.AppProcess | None = None) -> None:
        if proc is None or self.retiring is proc:
            self.retiring = None

    def set_status(self, status: DaemonStatus, failure: str | None = None) -> None:
        self.status, self.failure = status, failure

    def warn(self, text: str | None, nginx_down: bool = False) -> None:
        """What is wrong now and what to do (None: nothing); `nginx_down`: the managed nginx could
        not be restarted (status says so apart)."""
        self.warning = text
        if nginx_down or text is None:
            self.nginx_down = text

    def count_restart(self, reset: bool) -> int:
        """One more restart of a crashed or hung app (`reset`: the last one ran long enough to start
        counting again); how many in a row."""
        self.restarts = 1 if reset else self.restarts + 1
        return self.restarts

    def hand_over(self) -> None:
        """Leave the app and nginx serving when the daemon stops, for the next daemon to adopt."""
        self.keep_serving = True

    # ---- swaps

    async def run_swap(self, build: Path, reply: Reply, reason: str, pause: bool = False,
                       rollout: tuple[int, ...] = (), step_seconds: float | None = None,
                       spare: slots.AppProcess | None = None, hung: bool = False) -> dict[str, Any]:
        """Run one swap to `build` as its own task (a client that leaves does not stop it); the
        result, or a BluegreenError whose `traffic` says where traffic is. With `pause`, return
        once the swap is paused for preview: `promote` or `abort` carries it on. `spare`: a crash
        restart's ready spare, switched to with no start; `hung`: the build it replaces is hung."""
        _refuse_swap(self)
        if reason == "rollback":
            await self.release.check_warm()
            _refuse_swap(self)  # another swap may have begun meanwhile
        plan = self.release.plan(build, reason, pause, rollout, step_seconds, spare, hung)
        old = plan.old
        assert old is not None
        record = SwapRecord(str(build), to_slot=plan.slot, to_port=plan.port, from_slot=old.slot, reason=reason,
                            from_build=str(old.build), by=PEER.get())
        self.swap, self.listeners = record, [reply]
        self.release.paused.clear()
        log.info("%s: %s -> %s (port %d)%s", reason, old.build, build, plan.port,
                 f"; the {'spare' if spare else 'warm build'} (pid {plan.warm.pid}) serves" if plan.warm else "")
        task = self.swap_task = asyncio.ensure_future(self._swap(plan, record))
        try:
            if pause and (info := await self.release.until_paused(task)):
                return {"paused": info}
            return await self.swap_result()
        finally:
            if reply in self.listeners:
                self.listeners.remove(reply)

    async def swap_result(self) -> dict[str, Any]:
        """Wait for the running swap (shielded: a client that leaves does not stop it); its result."""
        task, record = self.swap_task, self.swap
        assert task is not None and record is not None
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not (record.committed and self.status == DaemonStatus.STOPPING):
                raise _cancelled(self, record) from None
        _check_new_build(self, record)
        return {"active": self.active.to_dict() if self.active else None, "swap": record.to_dict()}

    async def _swap(self, plan: Plan[slots.AppProcess], record: SwapRecord) -> SwapRecord:
        """The swap task: the swap, then what is recorded and run after it, whoever waits for it."""
        handed_over = False
        emit = _emitter(self, plan)
        try:
            await run_swap(plan, SlotOps(self, emit), emit, record, hold=faults.phase_hold())
        except asyncio.CancelledError:
            # Stopping mid-drain: done; the next daemon drains and stops the old build.
            handed_over = record.committed and self.status == DaemonStatus.STOPPING and self.keep_serving
            raise
        except BluegreenError as e:
            log.error("%s to %s failed in %s: %s", plan.reason, plan.build, e.details.get("phase"), e.message)
            if plan.reason in RELEASES and self.config.hooks.after_failure:
                await self.release.after_failure(plan, e, emit)
            raise
        finally:
            self.proxy.forget_undo()
            await self.release.rollouts.end_split(plan)
            await self.holding.count(record)
            self.keeper.swap_ended(record.to_dict(), keep_progress=handed_over)
            if not self.keeper.unsaved:
                self.keeper.save_quietly()
        if plan.reason != "recover":  # a release the user asked for: a fresh start for crash counting
            self.restarts, self.status, self.failure = 0, DaemonStatus.SERVING, None
        log.info("%s to %s done in %.2fs", plan.reason, plan.build, (record.finished_at or 0) - record.started_at)
        return record


def _refuse_swap(app: App) -> None:
    """Why no swap can start now (a BluegreenError), if so."""
    if app.swapping() and app.release.pause is not None:
        raise Busy(f"a swap to {app.release.pause.standby.build} is paused for preview; `bluegreen promote` or "
                   "`bluegreen abort` it first", phase="paused")
    if app.swapping():
        assert app.swap is not None
        raise Busy(f"a {app.swap.reason} to {app.swap.build} is in progress (phase: {app.swap.phase}); "
                   "wait for it to finish (bluegreen status)", phase=app.swap.phase)
    if app.status not in (DaemonStatus.SERVING, DaemonStatus.RECOVERING, DaemonStatus.FAILED) \
            or app.active is None:
        raise NotReadyYet(f"the daemon is {app.status}; swaps are accepted once it serves")
    if app.keeper.unsaved and not app.keeper.retry():
        raise StateError(f"no swap until state.json can be written: {app.keeper.error or app.warning}",
                         traffic="unchanged")


def _emitter(app: App, plan: Plan[slots.AppProcess]) -> Callable[[dict[str, Any]], None]:
    """A swap's events: logged, saved where a daemon killed mid-swap needs them, sent to its clients."""
    old = plan.old
    assert old is not None

    def emit(event: dict[str, Any]) -> None:
        _log_phase(event)
        name, status = event["event"], event.get("status")
        if status in ("begin", "done") and Phase(name).persisted:
            # What a daemon killed mid-swap needs to finish or undo it: the slot about to be
            # started, then the new process (the standby until commit). Other phases change
            # neither, so they cost no write; commit's own write records it committed.
            new = app.standby or (app.active if app.active is not old else None)
            record, before = app.swap, app.keeper.state.swap
            app.keeper.swap_progress(InterruptedSwap(
                name, plan.reason, str(plan.build), slots.slot_state(old), slots.slot_state(new) if new else None,
                record.started_at if record else 0.0, record.by if record else None,
                awaiting="paused" if (name, status) == (Phase.PAUSED.value, "begin") else None,
                after_switch_done=(name, status) == (Phase.AFTER_SWITCH.value, "done"),
                switched_at=time.time() if name == Phase.COMMIT.value else before.switched_at if before else 0.0))
            if name in (Phase.PAUSED.value, Phase.AFTER_SWITCH.value):
                app.keeper.save_quietly(durable=False)
            if name == Phase.START.value:
                # No fsync: this is for a daemon killed while its processes run on; a power
                # loss ends them all (commit's write, which names the build, has one).
                app.keeper.save(durable=False)
        for reply in [*app.watchers, *app.listeners]:
            reply(event)

    return emit


def _log_phase(event: dict[str, Any]) -> None:
    if event.get("status") == "done":
        detail = {k: v for k, v in event.items() if k not in ("event", "status", "elapsed")}
        log.info("  %s done %s", event["event"], detail)


def _cancelled(app: App, record: SwapRecord) -> BluegreenError | asyncio.CancelledError:
    if app.swap_task is not None and app.swap_task.cancelled() and app.status != DaemonStatus.STOPPING:
        phase = record.error.get("phase") if record.error else None  # `bluegreen cancel`
        return BluegreenError(f"the {record.reason} was cancelled in phase {phase}; the standby was stopped "
                              "and traffic is unchanged", code="cancelled", phase=phase, traffic="unchanged")
    return asyncio.CancelledError()  # our own connection is being torn down


def _check_new_build(app: App, record: SwapRecord) -> None:
    """A swap whose new build is already dead (it died after the old one stopped) did not succeed."""
    active = app.active
    if active is not None and not active.alive() and app.status != DaemonStatus.STOPPING:
        why = active.exit_reason or slots.describe_exit(active.returncode)
        raise BluegreenError(f"the new build ({active.slot}, pid {active.pid}) {why} right after the swap (the old "
                             f"build was already stopped); the daemon restarts it: see `bluegreen status` and "
                             f"{active.log_path}", code="app_exited", traffic="moved")
