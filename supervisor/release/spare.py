"""The hot spare (app.spare): the build that serves, started and ready on the other slot while no
swap needs that slot, with no traffic. A crash (or a hung app) is then one routing change to it,
not a boot; a new spare boots behind. Its liveness is checked like the active's; one that dies,
hangs or never gets ready is started again with the active's backoff (app.restart). A swap takes
its slot back first (executor.prepare), and the spare comes back once the swap is over.

The monitor calls tend() between its looks; everything slow (a boot, a liveness check, a stop)
runs in one task of the spare's own, so that the monitor never waits on the spare.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable

from ..aio import shielded
from ..config.schema import StopConfig, expand, other_slot
from ..errors import BluegreenError
from ..processes import probes, slots
from ..state import DaemonStatus

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")
STOP = 2.0  # seconds a spare has to exit on its stop signal: it never had traffic, nothing to finish


class Spare:
    def __init__(self, app: App) -> None:
        self.app = app
        self.proc: slots.AppProcess | None = None  # started (booting until `ready`)
        self.ready_at: float | None = None  # wall clock: when it answered its readiness checks
        self.task: asyncio.Task[Any] | None = None  # the boot, a liveness check or a stop running now
        self.checking = False  # the task is a liveness check (a crash does not wait for it)
        self.failures = 0  # spares in a row that died, hung or never got ready
        self.retry_at = 0.0  # monotonic: no new spare before
        self.health_failures = 0
        self.next_health = 0.0
        self.gave_up: tuple[Path, str] | None = None  # (the build, why): no more spares of that build

    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def _wanted(self) -> bool:
        """A spare fits now: asked for, the active build serves, and nothing else uses the other slot."""
        app = self.app
        return (app.config.app.spare and app.active is not None and app.active.alive()
                and app.status == DaemonStatus.SERVING and not app.swapping() and app.standby is None
                and app.retiring is None and app.release.warm is None)

    def tend(self) -> None:
        """Between the monitor's looks: notice a spare that died or no longer fits, check a ready
        one's liveness when due, boot one when it is wanted and none runs."""
        if self.busy():
            return
        app, proc = self.app, self.proc
        if proc is not None:
            active = app.active
            if not proc.alive():
                self._failed(f"exited ({proc.exit_reason or slots.describe_exit(proc.returncode)})")
                self._forget()
            elif active is None or active.slot == proc.slot or active.build != proc.build or app.swapping():
                self._run(self.end("it no longer runs the build that serves"))
            elif self.ready_at is not None and time.time() - self.ready_at >= app.config.app.restart.reset_after:
                self.failures = 0  # it ran long enough: the next failure starts a new count
            if self.ready_at is not None and app.config.app.health.url and time.monotonic() >= self.next_health:
                self.next_health = time.monotonic() + app.config.app.health.interval
                self._run(self._check_health(proc), checking=True)
            return
        if self.gave_up is not None and app.active is not None and app.active.build != self.gave_up[0]:
            self.gave_up, self.failures = None, 0  # a new build serves: its spare gets a fresh count
        if self._wanted() and self.gave_up is None and time.monotonic() >= self.retry_at:
            self._run(self._boot())

    def _run(self, work: Awaitable[Any], checking: bool = False) -> None:
        self.task, self.checking = asyncio.ensure_future(work), checking

    async def _boot(self) -> None:
        app = self.app
        active = app.active
        assert active is not None
        slot, build = other_slot(active.slot), active.build
        await app.free_port(app.config.app.port(slot))
        spawn = asyncio.ensure_future(app.launcher.spawn(slot, build))
        try:
            proc = await asyncio.shield(spawn)
        except asyncio.CancelledError:  # a process started is always recorded, so that end() stops it
            self._started(await spawn)
            raise
        self._started(proc)
        log.info("spare: starting %s on %s (pid %d, port %d)", build, slot, proc.pid, proc.port)
        ready = app.config.app.ready
        try:
            await probes.wait_ready(proc, ready, app.launcher.url(ready.url, proc))
        except BluegreenError as e:
            self._failed(f"did not get ready: {e.message.splitlines()[0]}")
            await self._stop(proc, "it did not get ready")
            return
        self.ready_at, self.health_failures = time.time(), 0
        self.next_health = time.monotonic() + app.config.app.health.interval
        log.info("spare: %s (pid %d) is ready on %s; a crash is now one routing change", build, proc.pid, slot)
        app.event("spare_ready", slot=slot, pid=proc.pid, build=str(build))

    def _started(self, proc: slots.AppProcess) -> None:
        self.proc, self.ready_at = proc, None
        self.app.keeper.spare(slots.slot_state(proc))
        self.app.keeper.save_quietly(durable=False)

    async def _check_health(self, proc: slots.AppProcess) -> None:
        h = self.app.config.app.health
        assert h.url is not None
        ok, what = await probes.alive(expand(h.url, self.app.launcher.context(proc.slot, proc.build)), h.timeout)
        if ok or self.proc is not proc:
            self.health_failures = 0
            return
        self.health_failures += 1
        if self.health_failures >= h.failures:
            self._failed(f"failed {h.failures} liveness checks in a row (last: {what})")
            await shielded(self._stop(proc, "it stopped answering", graceful=False))  # (take() cancels a check)

    def _failed(self, why: str) -> None:
        """A spare died, hung or never got ready: the next one waits the active's backoff, and
        past app.restart.attempts in a row none is started for this build until another serves."""
        app, proc, r = self.app, self.proc, self.app.config.app.restart
        self.failures += 1
        self.retry_at = time.monotonic() + r.delay(self.failures + 1)
        desc = f"the spare ({proc.slot}, pid {proc.pid}, {proc.build}) {why}" if proc else f"the spare {why}"
        if self.failures >= r.attempts and proc is not None:
            self.gave_up = (proc.build, desc)
            log.error("%s; %d failures in a row: no more spares of this build (a crash now waits for a boot; "
                      "see %s)", desc, self.failures, proc.log_path)
        else:
            log.warning("%s; another starts in %.1fs", desc, r.delay(self.failures + 1))
        app.event("spare_failed", why=desc, failures=self.failures, **({"gave_up": True} if self.gave_up else {}))

    async def _stop(self, proc: slots.AppProcess, why: str, graceful: bool = True) -> None:
        self._forget()
        if proc.alive():
            result = await stop(proc, self.app.config.app.stop, graceful)
            log.info("spare %s (pid %d) stopped, %s: %s", proc.slot, proc.pid, why, result["how"])
        self.app.keeper.save_quietly()

    def _forget(self) -> None:
        self.proc, self.ready_at = None, None
        self.app.keeper.spare(None)

    async def end(self, why: str, graceful: bool = True) -> None:
        """Stop the spare, booting or ready (its slot is needed, or the daemon stops)."""
        task, proc = self.task, self.proc
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            proc = self.proc  # (a boot cancelled after its start recorded it)
        if proc is not None:
            await self._stop(proc, why, graceful)

    async def discard(self, proc: slots.AppProcess | None) -> None:
        """A spare taken for a crash restart that did not run (a user's swap came first)."""
        if proc is not None and proc.alive() and proc is not self.app.active:
            await stop(proc, self.app.config.app.stop)

    async def take(self, build: Path) -> slots.AppProcess | None:
        """A crash: the spare of `build`, ready (a boot under way is waited for: it ends sooner than
        a fresh one) and answering one check now, handed to the swap that replaces the dead build;
        None if there is none."""
        if self.busy():
            assert self.task is not None
            if self.checking:  # take()'s own check follows
                self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        proc = self.proc
        if proc is None or self.ready_at is None or not proc.alive() or proc.build != build:
            return None
        ready = self.app.config.app.ready
        ok, what = await probes.answers(proc.port, ready, self.app.launcher.url(ready.url, proc),
                                        min(probes.ATTEMPT_TIMEOUT, self.app.config.app.health.timeout))  # (held)
        if not ok:
            log.warning("the spare (pid %d) does not answer (%s): starting the build afresh", proc.pid, what)
            await self._stop(proc, f"it did not answer ({what})", graceful=False)
            return None
        self._forget()
        self.failures = 0
        return proc

    def info(self) -> dict[str, Any] | None:
        """What status says of the spare: its process and state (None: app.spare is off)."""
        if not self.app.config.app.spare:
            return None
        proc = self.proc
        state = ("ready" if proc is not None and self.ready_at is not None else "starting" if proc is not None
                 else "given up" if self.gave_up else "waiting")
        out: dict[str, Any] = {"state": state, "failures": self.failures}
        if proc is not None:
            out["process"] = proc
        if self.gave_up:
            out["why"] = self.gave_up[1]
        elif proc is None:
            out["why"] = self._why_none()
        return out

    def _why_none(self) -> str:
        app = self.app
        if app.swapping():
            return "a swap uses the other slot"
        if app.release.warm is not None:
            return "the warm old build holds the other slot (release.keep_warm)"
        if app.status != DaemonStatus.SERVING:
            return f"the daemon is {app.status}"
        left = self.retry_at - time.monotonic()
        return f"the next one starts in {left:.1f}s" if left > 0 else "about to start"


async def stop(proc: slots.AppProcess, how: StopConfig, graceful: bool = True) -> dict[str, Any]:
    """Stop a spare (this daemon's, or one a killed daemon left): no drain, and its stop signal only
    STOP seconds (SIGKILL at once for one that is hung): it never had traffic, and a crash
    restart may be waiting for its slot."""
    return await slots.stop(proc, how.signal, min(how.timeout, STOP) if graceful else 0.0)
