"""Watching what serves: a dead active app or managed nginx is noticed at once (our children) or
within 0.25 s (adopted processes, polled), a hung app by its liveness checks, and each is
brought back; a state.json write that failed is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config.schema import expand
from ..errors import BluegreenError
from ..processes import probes, procs, slots
from ..processes.slots import AppProcess
from ..proxy.managed import ManagedNginx
from ..proxy.render import HOLD
from ..release.app import App
from ..state import DaemonStatus

log = logging.getLogger("bluegreen")
POLL = 0.25
RECONCILE = 1.0  # seconds between two comparisons of nginx's routing table with what it was told
BEFORE_THE_SWITCH = ("prepare", "start", "ready", "before_switch", "check")  # a swap's phases with the old build serving


class Monitor:
    def __init__(self, app: App) -> None:
        self.app = app
        self.crashed_pid: int | None = None  # the crash being retried (a new pid is a new crash)
        self.nginx_failures = 0  # failed restarts of the managed nginx in a row
        self.nginx_retry_at = 0.0
        self.health_failures = 0
        self.reconcile_failed = False  # said once, until nginx answers again

    async def run(self) -> None:
        """Supervise, whatever runs: nginx always (restarted when it dies, its routing put back
        when it forgot it); the active build's death and liveness when no swap runs, and while
        a swap waits on a person or a verdict (paused, rolling out). The swap itself reacts to its
        new build dying (phases.py) and to the old one dying in those phases."""
        app = self.app
        next_health = time.monotonic() + app.config.app.health.interval
        next_reconcile = 0.0
        await app.holding.resume_an_orphan_pause()
        await self.look_at_hold()
        while app.status != DaemonStatus.STOPPING:  # (a cancellation lost in a wait_for ends it too)
            await self._wait_for_an_exit(POLL)
            if app.status != DaemonStatus.STOPPING and app.config.hold.timeout and app.config.app.protocol == "http" \
                    and app.proxy.hold_port():
                app.catcher.keep(app.active)  # (a dead one is never copied)
            if app.status == DaemonStatus.STOPPING:  # what the shutdown stops is never brought back
                return
            try:
                if app.managed is not None and not app.managed.alive() and time.monotonic() >= self.nginx_retry_at:
                    await self.restart_nginx(app.managed)
                elif app.proxy.mode == "runtime" and time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + RECONCILE
                    await self.reconcile()
                waiting = app.release.pause is not None or app.release.rollouts.rolling is not None
                if app.swapping() and not waiting:
                    await self.crashed_during_a_swap()
                    continue  # a short phase: the swap replaces or watches what serves itself
                if app.keeper.unsaved and not app.swapping():
                    await app.retry_save()
                if app.active is not None and not app.active.alive() \
                        and app.status in (DaemonStatus.SERVING, DaemonStatus.RECOVERING):
                    await self.recover()
                elif app.config.app.health.url and time.monotonic() >= next_health:
                    next_health = time.monotonic() + app.config.app.health.interval
                    await self.check_health()
                await app.release.notice_a_dead_warm()
                app.spare.tend()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must outlive any single failure
                log.exception("monitor error")

    async def reconcile(self) -> None:
        """An nginx restarted behind the daemon's back (your `systemctl restart nginx`) comes back
        with an empty routing table: put back what it was told (the port comes from the route file
        by itself; the preview and a rollout's split do not)."""
        try:
            app = self.app
            again = ", ".join(filter(None, [await app.proxy.reconcile(), await app.holding.pause_again()])) or None
        except BluegreenError as e:
            if not self.reconcile_failed:
                log.warning("could not read nginx's routing state: %s", e.message)
            self.reconcile_failed = True
            return
        self.reconcile_failed = False
        if again:  # (before the look: that one is from the new nginx)
            self.app.holding.nginx_restarted()
        await self.look_at_hold()
        if again:
            log.warning("nginx had forgotten its routing (restarted?): set again: %s", again)
            self.app.event("routing_restored", what=again)

    async def _wait_for_an_exit(self, timeout: float) -> None:
        app = self.app
        candidates = [app.active.proc if app.active else None, app.managed.proc if app.managed else None]
        waits = [asyncio.ensure_future(p.wait()) for p in candidates if p is not None and p.returncode is None]
        if not waits:
            await asyncio.sleep(timeout)
            return
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def restart_nginx(self, managed: ManagedNginx) -> None:
        """Start a new master after the managed one died; retry with capped backoff, and let
        status say that nginx is down and why."""
        app = self.app
        if self.nginx_failures == 0:
            lines = managed.log.tail()
            log.error("the managed nginx master (pid %s) died%s; restarting it", managed.pid,
                      (": " + " | ".join(lines)) if lines else "")
            app.event("nginx_died", pid=managed.pid)
        if not app.swapping():
            app.set_status(DaemonStatus.RECOVERING)
        port = app.proxy.port or (app.active.port if app.active else app.config.app.port("blue"))
        try:
            async with app.proxy.lock:  # no swap changes the routing meanwhile
                info = await managed.start(port)
                again = await app.proxy.reconcile()  # the preview, a rollout's split
                again = ", ".join(filter(None, [again, await self.app.holding.pause_again()])) or None
        except BluegreenError as e:
            self.nginx_failures += 1
            delay = min(30.0, 0.5 * 2 ** (self.nginx_failures - 1))
            self.nginx_retry_at = time.monotonic() + delay
            app.warn(f"the managed nginx is down and could not be restarted: {e.message}; retrying in {delay:g}s",
                     nginx_down=True)
            log.error("%s", app.warning)
            app.event("nginx_restart_failed", error=e.message.splitlines()[0], retry_in=delay)
            return
        self.nginx_failures = 0
        app.holding.nginx_restarted()
        app.warn(None)
        if app.status == DaemonStatus.RECOVERING:
            app.set_status(DaemonStatus.SERVING)
        app.event("nginx_restarted", pid=info["pid"], **({"routing": again} if again else {}))
        if app.active is not None:
            app.serving(app.active)
        app.keeper.save_quietly()

    async def recover(self, hung: str | None = None) -> None:
        """The active app died (or hung, saying `hung`): start the same build on the other slot, with
        capped backoff (none with a ready spare: it is switched to); a hung one is stopped by that
        swap once it serves, with no drain (what is inside a hung app never finishes)."""
        app = self.app
        await app.release.abort_pause(f"the active build {hung or 'died'}")  # its standby is no restart
        dead = app.active
        assert dead is not None
        r = app.config.app.restart
        if self.crashed_pid != dead.pid:  # a new crash, not a retry of the same one
            self.crashed_pid = dead.pid
            await self.hold_new_requests(dead)
            why = hung or dead.exit_reason or slots.describe_exit(dead.returncode)
            log.error("the active app (%s, pid %d, %s) %s.%s", dead.slot, dead.pid, dead.build, why,
                      "" if hung else slots.exit_hint(dead.returncode))
            app.event("unhealthy" if hung else "crash", slot=dead.slot, pid=dead.pid, exit=why, build=str(dead.build))
            fresh = time.time() - dead.started_at >= r.reset_after
        else:
            fresh = False
        spare = await app.spare.take(dead.build)  # ready: no boot to wait for, so no backoff either
        if spare is None and app.count_restart(reset=fresh) > r.attempts:  # (restarts count boots: a spare is none)
            app.set_status(DaemonStatus.FAILED, f"the app {'stopped answering' if hung else 'crashed'} "
                           f"{app.restarts - 1} times in a row; not restarting it again. Fix the build and "
                           f"`bluegreen swap` to it (see {dead.log_path})")
            log.error("%s", app.failure)
            app.event("failed", build=str(dead.build), restarts=app.restarts - 1)
            app.keeper.save_quietly()
            return
        app.set_status(DaemonStatus.RECOVERING)
        delay = 0.0 if spare else r.delay(app.restarts)
        if delay:
            log.info("restart %d of %d in %.1fs", app.restarts, r.attempts, delay)
            await asyncio.sleep(delay)
        if app.active is not dead or app.status == DaemonStatus.STOPPING:  # a user's swap replaced it meanwhile
            await app.spare.discard(spare)
            return
        if spare is not None:
            log.info("switching to the spare (%s, pid %d)", spare.slot, spare.pid)
        try:
            await app.run_swap(dead.build, lambda event: None, reason="recover", spare=spare, hung=hung is not None)
        except BluegreenError as e:
            log.error("restart %d failed: %s", app.restarts, e.message.splitlines()[0])
            await app.spare.discard(spare)
            return
        if app.status == DaemonStatus.STOPPING:  # the daemon began to stop meanwhile: it stays stopping
            return
        app.set_status(DaemonStatus.SERVING)
        held = app.swap.details.get("hold") if app.swap is not None else None
        app.event("restarted", slot=app.active.slot if app.active else None,
                  pid=app.active.pid if app.active else None, **({"spare": True} if spare else {}),
                  **({"hold": held} if held else {}))

    async def look_at_hold(self) -> None:
        """Keep nginx's hold counters as they were a moment ago, while the active app lives: what
        its crash is counted from."""
        active = self.app.active
        try:
            seen = await self.app.proxy.hold()
        except BluegreenError:
            return
        # Checked after the read: an app already dying then (killed, not yet reaped) may have had
        # its lost requests counted in it, and its crash must be counted from an earlier look.
        if seen is not None and active is not None and active.alive() and not procs.exiting(active.pid):
            self.app.holding.looked(seen)

    async def crashed_during_a_swap(self) -> None:
        """The active build died while a swap starts its replacement: said at once (event `crash`),
        and nginx told to hold new requests for whatever serves next (the swap's new build once
        it switches, else the crash restart after the swap)."""
        app = self.app
        dead = app.active
        if app.swap is None or app.swap.phase not in BEFORE_THE_SWITCH:
            return  # from the switch on, the swap itself reacts to a build that dies
        if dead is None or dead.alive() or self.crashed_pid == dead.pid:
            return
        self.crashed_pid = dead.pid
        why = dead.exit_reason or slots.describe_exit(dead.returncode)
        log.error("the active app (%s, pid %d, %s) %s, while a swap runs.%s", dead.slot, dead.pid, dead.build, why,
                  slots.exit_hint(dead.returncode))
        app.event("crash", slot=dead.slot, pid=dead.pid, exit=why, build=str(dead.build), during="swap")
        await self.hold_new_requests(dead)

    async def hold_new_requests(self, dead: AppProcess) -> None:
        """Tell nginx `dead`'s port cannot answer: new requests are held (not sent into a hung app,
        nor to a dead one's refused port) until a build answers, and what it sent there before it
        knew goes to the hold server too (processes/catcher.py). Its counters from the last look
        before the crash (holding.looked) are what the restart's record counts from."""
        app = self.app
        try:
            now = await app.proxy.hold(f"down {dead.port}")
        except BluegreenError as e:
            log.warning("could not tell nginx to hold new requests: %s", e.message)
            return
        if now is not None:  # (the reload switch holds nothing)
            app.catcher.hand_over(dead.pid, (HOLD, app.proxy.hold_port()))
            app.holding.crashed(now)

    async def check_health(self) -> None:
        """A liveness check of the active app; after `failures` in a row it counts as hung and is
        replaced like a crashed one, same restart count and backoff (by a restart swap: the fresh
        copy serves before the hung one is stopped, and SIGKILL ends one that ignores SIGTERM)."""
        app, h = self.app, self.app.config.app.health
        active = app.active
        if active is None or h.url is None or app.status not in (DaemonStatus.SERVING, DaemonStatus.RECOVERING):
            return
        ok, what = await probes.alive(expand(h.url, app.launcher.context(active.slot, active.build)), h.timeout)
        if ok:
            self.health_failures = 0
            return
        self.health_failures += 1
        log.warning("liveness check %d of %d failed for %s (pid %d): %s", self.health_failures, h.failures,
                    active.slot, active.pid, what)
        if self.health_failures >= h.failures:
            self.health_failures = 0
            await self.recover(hung=f"failed {h.failures} liveness checks in a row (last: {what})")
