"""The daemon: owns the slots, nginx, the state, and the one swap that may run at a time.

Signal handlers only enqueue; the main task reacts. Start-up: lock the state dir, open the
control socket (status answers "starting" at once), start the saved or configured build,
point nginx at it. SIGTERM/SIGINT: stop accepting, cancel a running swap (its standby is
stopped), stop nginx gracefully (managed mode), then the app; a second signal forces.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


from . import __version__, drain, nginx, probes, protocol, slots
from .config import SLOTS, Config, expand
from .control import ControlServer
from .errors import AppDied, AppError, BluegreenError, BuildError, Busy, NotReadyYet, PortInUse, StateError
from .protocol import COMMANDS, Request
from .state import SlotState, State, StateStore
from .swap import Plan, SwapRecord, run_swap

log = logging.getLogger("bluegreen")
# Before commit a swap can be undone without touching traffic (see swap.py).
CANCELLABLE = ("prepare", "start", "ready", "switch")
# Phases whose start is written to state.json (with the standby's pid once it exists).
PERSISTED_PHASES = ("start", "ready", "switch", "commit", "drain", "stop")


def _slot_state(app: slots.AppProcess) -> SlotState:
    return SlotState(app.slot, app.port, str(app.build), app.pid, app.create_time, app.started_at)


def other_slot(slot: str) -> str:
    return SLOTS[1 - SLOTS.index(slot)]


def check_build(build: Path) -> Path:
    """The build's real path: a `current -> releases/42` link is resolved now, at release time,
    so status, rollback and crash restarts name (and restart) what was released."""
    if not build.is_absolute():
        raise BuildError(f"build path {protocol.clip(str(build))} must be absolute (the CLI resolves relative "
                         "paths for you)")
    try:
        real = build.resolve(strict=True)
        if not real.is_dir():
            raise BuildError(f"build {build} is not a directory")
    except FileNotFoundError:
        raise BuildError(f"build {protocol.clip(str(build))} does not exist") from None
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop, no permission
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BuildError(f"build {protocol.clip(str(build))} cannot be used: {why}") from None
    return real


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.daemon.state_dir
        self.store = StateStore(self.state_dir / "state.json")
        self.state = State()
        self.nginx = nginx.make(config)
        # The managed nginx, which the daemon also starts, adopts, restarts and stops (None: external).
        self.managed = self.nginx if isinstance(self.nginx, nginx.ManagedNginx) else None
        self.control = ControlServer(config.daemon.socket, self.handle, config.daemon)
        self.active: slots.AppProcess | None = None
        self.standby: slots.AppProcess | None = None
        self.swap: SwapRecord | None = None
        self.swap_task: asyncio.Task[Any] | None = None
        self.monitor_task: asyncio.Task[Any] | None = None
        # starting | serving | recovering | failed | stopping
        self.status = "starting"
        self.failure: str | None = None
        self.restarts = 0  # restarts of a crashed active app since it last ran stably
        self._crashed_pid: int | None = None
        # The old app of a committed swap, until it is stopped (drain, stop, or a handover).
        self.retiring: slots.AppProcess | None = None
        # What is wrong right now and what to do (shown by status), e.g. state.json not written.
        self.warning: str | None = None
        self.state_unsaved = False
        self.nginx_failures = 0  # failed restarts of the managed nginx in a row
        self.nginx_retry_at = 0.0
        self.health_failures = 0
        self.started_at = time.time()
        self.signals: asyncio.Queue[Any] = asyncio.Queue()
        self.keep_serving = config.daemon.on_stop == "keep"
        self._lock_fd: int | None = None

    # ---- life cycle

    async def run(self) -> int:
        try:
            for sub in ("logs", "slots"):
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BluegreenError(f"cannot create {self.state_dir}: {e.strerror}; check daemon.state_dir",
                                 code="config") from None
        self._lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        await self.control.start()
        log.info("bluegreen %s daemon pid %d, config %s, socket %s", __version__, os.getpid(),
                 self.config.path, self.config.daemon.socket)
        boot = asyncio.ensure_future(self.boot())
        stop_sig = asyncio.ensure_future(self.signals.get())
        done, _ = await asyncio.wait({boot, stop_sig}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if boot in done:
            if boot.exception() is not None:
                err = boot.exception()
                msg = err.message if isinstance(err, BluegreenError) else repr(err)
                log.error("start-up failed: %s", msg)
                code = 1
            else:
                self.status = "serving"
                self.monitor_task = asyncio.ensure_future(self.monitor())
                await stop_sig
        else:
            boot.cancel()
            await asyncio.gather(boot, return_exceptions=True)
        stop_sig.cancel()
        await self.shutdown()
        return code

    async def boot(self) -> None:
        self.state = self.store.load()
        if self.managed is not None and self.managed.adopt(self.state.nginx):
            log.info("adopted the running managed nginx (pid %d)", self.managed.pid)
        self.nginx.clean_stale_temp()
        if await self.adopt():
            return
        saved = self.state.active
        slot, build = "blue", self.config.app.build
        if saved is not None:
            if Path(saved.build).is_dir():
                slot, build = saved.slot, Path(saved.build)
            else:
                log.warning("saved build %s is gone; starting app.build %s", saved.build, build)
        build = check_build(build)
        port = self.config.app.port(slot)
        await self.free_port(port)
        log.info("starting %s on %s (port %d)", build, slot, port)
        app = await self.spawn(slot, build)
        self.standby = app
        try:
            ready = await probes.wait_ready(app, self.config.app.ready, self.ready_url(app))
            log.info("%s ready after %.2fs (%d checks)", slot, ready.seconds, ready.checks)
            await self.point_nginx_at(port, force=True)
        except BaseException:
            await slots.stop(app, self.config.app.stop.signal, self.config.app.stop.timeout)
            self.standby = None
            raise
        self.standby = None
        self.active = app
        self.state.swap = None
        self.adopt_active(app)
        self.store.save(self.state)
        log.info("serving %s from %s (port %d, pid %d)", build, slot, port, app.pid)

    def _adoptable(self, saved: SlotState | dict[str, Any] | None) -> slots.AppProcess | None:
        if not saved:
            return None
        s = SlotState(**saved) if isinstance(saved, dict) else saved
        return slots.adopt(s.slot, s.port, Path(s.build), s.pid, s.create_time, s.since,
                           self.state_dir / "logs" / f"{s.slot}.log", self.state_dir)

    async def adopt(self) -> bool:
        """Take over the processes a previous daemon left running, instead of restarting them.

        An interrupted swap is finished if it had committed (state.json names the new slot
        active), and undone otherwise; either way nginx is pointed at the active slot and the
        other slot's process is drained and stopped.
        """
        st = self.state
        interrupted = st.swap or {}
        active = self._adoptable(st.active)
        others = [self._adoptable(interrupted.get(k)) for k in ("standby", "old")]
        if active is None and others[0] is not None:
            # The saved active app is gone but the swap's new one runs (nginx may point at it):
            # finish that swap rather than stop a process that serves.
            active, others[0] = others[0], None
            st.active = _slot_state(active)
        if interrupted and not interrupted.get("standby"):
            # Killed between spawning the standby and recording it: find it by the marker it inherited.
            slot = other_slot(interrupted["old"]["slot"])
            others += slots.find_ours(self.state_dir, slot, self.state_dir / "logs" / f"{slot}.log")
        leftovers = [p for p in others if p is not None and (active is None or p.pid != active.pid)]
        if interrupted:
            committed = active is not None and interrupted.get("standby") and \
                interrupted["standby"]["pid"] == active.pid
            log.warning("a %s to %s was interrupted in phase %s; %s it", interrupted.get("reason"),
                        interrupted.get("build"), interrupted.get("phase"), "finishing" if committed else "undoing")
        if active is None:
            for p in leftovers:  # they would hold the ports the fresh start needs
                await self._retire(p, drain=False)
            st.swap = None
            return False
        # Past this point a failure must not stop what still serves: detach and exit.
        try:
            # After an interrupted swap we cannot know which upstream the master has loaded.
            await self.point_nginx_at(active.port, force=bool(interrupted))
        except BaseException:
            log.error("could not point nginx at the adopted %s slot; leaving every process as it was",
                      active.slot)
            self.keep_serving = True
            raise
        self.active = active
        self.event("adopted", slot=active.slot, pid=active.pid, build=str(active.build))
        log.info("adopted %s (pid %d, port %d) serving %s", active.slot, active.pid, active.port, active.build)
        for p in leftovers:
            await self._retire(p, drain=True)
        st.swap = None
        self.adopt_active(active)
        self.store.save(st)
        return True

    async def point_nginx_at(self, port: int, force: bool) -> None:
        """Make nginx send traffic to `port`: start the managed nginx if it is not running, else
        switch (test, reload, confirm) when forced, when its config changed, or when the upstream
        file names another port."""
        if self.managed is not None and not self.managed.alive():
            info = await self.managed.start(port)
            log.info("managed nginx pid %s listening on %s", info["pid"], info["listen"])
            return
        changed = await self.managed.ensure_config() if self.managed is not None else False
        if force or changed or self.nginx.upstream_port() != port:
            await self.nginx.switch(port)
            log.info("nginx switched to port %d", port)

    async def _retire(self, app: slots.AppProcess, drain: bool) -> None:
        if drain:
            await self.drain_port(app.port)
        s = self.config.app.stop
        result = await slots.stop(app, s.signal, s.timeout)
        log.info("stopped leftover %s (pid %d): %s", app.slot, app.pid, result["how"])

    # ---- watching the active app and nginx

    async def monitor(self) -> None:
        """Notice a dead active app or managed nginx at once (our children) or within 0.25 s
        (adopted processes, polled), a hung one by its liveness checks, and bring it back; retry
        a state.json write that failed."""
        next_health = time.monotonic() + self.config.app.health.interval
        while True:
            await self._wait_for_an_exit(0.25)
            if self.swap_task is not None and not self.swap_task.done():
                # A swap replaces the active app anyway, and reacts itself to a new build that
                # dies while the old one drains; a failed one is seen next round. (wait, not
                # gather: cancelling the monitor at shutdown must not cancel the swap.)
                await asyncio.wait({self.swap_task})
                continue
            try:
                if self.state_unsaved:
                    await self.retry_save()
                if self.managed is not None and not self.managed.alive() and time.monotonic() >= self.nginx_retry_at:
                    await self.restart_nginx(self.managed)
                if self.active is not None and not self.active.alive() and self.status in ("serving", "recovering"):
                    await self.recover()
                elif self.config.app.health.url and time.monotonic() >= next_health:
                    next_health = time.monotonic() + self.config.app.health.interval
                    await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must outlive any single failure
                log.exception("monitor error")

    async def _wait_for_an_exit(self, timeout: float) -> None:
        candidates = [self.active.proc if self.active else None, self.managed.proc if self.managed else None]
        procs = [p for p in candidates if p is not None and p.returncode is None]
        if not procs:
            await asyncio.sleep(timeout)
            return
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def restart_nginx(self, managed: nginx.ManagedNginx) -> None:
        """Start a new master after the managed one died; retry with capped backoff, and let
        status say that nginx is down and why."""
        if self.nginx_failures == 0:
            lines = managed.log_tail()
            log.error("the managed nginx master (pid %s) died%s; restarting it", managed.pid,
                      (": " + " | ".join(lines)) if lines else "")
            self.event("nginx_died", pid=managed.pid)
        self.status = "recovering"
        port = self.active.port if self.active else self.config.app.port("blue")
        try:
            info = await managed.start(port)
        except BluegreenError as e:
            self.nginx_failures += 1
            delay = min(30.0, 0.5 * 2 ** (self.nginx_failures - 1))
            self.nginx_retry_at = time.monotonic() + delay
            self.warning = f"the managed nginx is down and could not be restarted: {e.message}; retrying in {delay:g}s"
            log.error("%s", self.warning)
            self.event("nginx_restart_failed", error=e.message.splitlines()[0], retry_in=delay)
            return
        self.nginx_failures, self.warning = 0, None
        if self.status == "recovering":
            self.status = "serving"
        self.event("nginx_restarted", pid=info["pid"])
        if self.active is not None:
            self.adopt_active(self.active)
        self.save_quietly()

    async def recover(self, hung: str | None = None) -> None:
        """The active app died (or hung, saying `hung`): start the same build on the other slot, with
        capped backoff; a hung one is drained and stopped by that swap like any old build."""
        dead = self.active
        assert dead is not None
        r = self.config.app.restart
        if self._crashed_pid != dead.pid:  # a new crash (not a retry of the same one)
            self._crashed_pid = dead.pid
            why = hung or dead.exit_reason or slots.describe_exit(dead.returncode)
            if time.time() - dead.started_at >= r.reset_after:
                self.restarts = 0
            log.error("the active app (%s, pid %d, %s) %s.%s", dead.slot, dead.pid, dead.build, why,
                      "" if hung else slots.exit_hint(dead.returncode))
            self.event("unhealthy" if hung else "crash", slot=dead.slot, pid=dead.pid, exit=why,
                       build=str(dead.build))
        self.restarts += 1
        if self.restarts > r.attempts:
            self.status = "failed"
            self.failure = (f"the app {'stopped answering' if hung else 'crashed'} {self.restarts - 1} times in a "
                            f"row; not restarting it again. Fix the build and `bluegreen swap` to it "
                            f"(see {dead.log_path})")
            log.error("%s", self.failure)
            self.event("failed", build=str(dead.build), restarts=self.restarts - 1)
            self.save_quietly()
            return
        self.status = "recovering"
        delay = r.delay(self.restarts)
        if delay:
            log.info("restart %d of %d in %.1fs", self.restarts, r.attempts, delay)
            await asyncio.sleep(delay)
        if self.active is not dead:  # a user's swap replaced it meanwhile
            return
        try:
            await self.run_swap(dead.build, lambda event: None, reason="recover")
        except BluegreenError as e:
            log.error("restart %d failed: %s", self.restarts, e.message.splitlines()[0])
            return
        self.status = "serving"
        self.event("restarted", slot=self.active.slot if self.active else None,
                   pid=self.active.pid if self.active else None)

    async def check_health(self) -> None:
        """A liveness check of the active app; after `failures` in a row it counts as hung and is
        replaced like a crashed one, same restart count and backoff (by a restart swap: the fresh
        copy serves before the hung one is stopped, and SIGKILL ends one that ignores SIGTERM)."""
        h, app = self.config.app.health, self.active
        if app is None or h.url is None or self.status not in ("serving", "recovering"):
            return
        ok, what = await probes.alive(expand(h.url, self.context(app.slot, app.build)), h.timeout)
        if ok:
            self.health_failures = 0
            return
        self.health_failures += 1
        log.warning("liveness check %d of %d failed for %s (pid %d): %s", self.health_failures, h.failures,
                    app.slot, app.pid, what)
        if self.health_failures >= h.failures:
            self.health_failures = 0
            await self.recover(hung=f"failed {h.failures} liveness checks in a row (last: {what})")

    async def retry_save(self) -> None:
        """state.json could not be written after traffic moved: write it as soon as there is room,
        then let the old build go."""
        try:
            self.store.save(self.state)
        except BluegreenError:
            return
        log.info("state.json written again; it names %s", self.state.active.build if self.state.active else None)
        self.state_unsaved, self.warning = False, None
        old, self.retiring = self.retiring, None
        if old is not None and old.alive():
            await self._retire(old, drain=True)

    def event(self, kind: str, **details: Any) -> None:
        self.state.events.append({"at": time.time(), "event": kind, **details})

    def save_quietly(self) -> None:
        try:
            self.store.save(self.state)
        except BluegreenError as e:
            log.error("%s", e.message)

    # ---- stopping

    async def shutdown(self) -> None:
        self.status = "stopping"
        log.info("shutting down%s", " (keeping the app and nginx serving)" if self.keep_serving else "")
        if self.monitor_task is not None:
            self.monitor_task.cancel()
            await asyncio.gather(self.monitor_task, return_exceptions=True)
        force = asyncio.ensure_future(self.signals.get())
        work = asyncio.ensure_future(self._shutdown_steps(graceful=True))
        done, _ = await asyncio.wait({force, work}, return_when=asyncio.FIRST_COMPLETED)
        if force in done:
            log.warning("second signal: forcing shutdown")
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            await self._shutdown_steps(graceful=False)
        force.cancel()
        await self.control.close()
        self._unlock()
        log.info("stopped")

    async def _shutdown_steps(self, graceful: bool) -> None:
        record = self.swap
        if self.swap_task is not None and not self.swap_task.done():
            old = self.retiring
            if record is not None and record.committed and old is not None:
                # Past commit only the old build's exit is left: hand it over, or stop it below.
                record.warnings.append(
                    f"the daemon stopped during the {record.phase}: the old build ({old.slot}, pid {old.pid}) "
                    + ("was handed over to the next daemon, which drains and stops it" if self.keep_serving
                       else "is stopped with the daemon, once nginx has finished its requests"))
            self.swap_task.cancel()
            await asyncio.gather(self.swap_task, return_exceptions=True)
        if self.keep_serving:
            if self.active is not None and self.active.alive():
                self.adopt_active(self.active)
                self.save_quietly()
                log.info("left %s (pid %d)%s running; the next daemon adopts them", self.active.slot,
                         self.active.pid, f" and nginx (pid {self.managed.pid})" if self.managed else "")
            return
        timeout = self.config.drain.timeout if graceful else 0.0
        # nginx first, so no request is sent to an app that is already stopping.
        if self.managed is not None:
            how = await self.managed.stop(timeout)
            log.info("managed nginx %s", how)
        self.state.nginx = None
        stop = self.config.app.stop
        for app in (self.standby, self.active, self.retiring):
            if app is not None:
                result = await slots.stop(app, stop.signal, stop.timeout if graceful else 0.0)
                log.info("%s (pid %d) %s", app.slot, app.pid, result["how"])
        self.retiring = None

    def _lock(self) -> None:
        path = self.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise BluegreenError(
                f"another bluegreen daemon (pid {other}) already uses {self.state_dir}; "
                "stop it first, or give this config its own daemon.state_dir",
                code="locked",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- app processes

    def context(self, slot: str, build: Path) -> dict[str, str]:
        slot_dir = self.state_dir / "slots" / slot
        return {
            "port": str(self.config.app.port(slot)),
            "slot": slot,
            "build": str(build),
            "build_name": build.name,
            "slot_dir": str(slot_dir),
        }

    def ready_url(self, app: slots.AppProcess) -> str | None:
        url = self.config.app.ready.url
        return expand(url, self.context(app.slot, app.build)) if url else None

    async def spawn(self, slot: str, build: Path) -> slots.AppProcess:
        app = self.config.app
        ctx = self.context(slot, build)
        slot_dir = Path(ctx["slot_dir"])
        slot_dir.mkdir(parents=True, exist_ok=True)
        slots.lay_out(slot_dir, app.dirs, app.files, ctx)
        cwd = Path(expand(app.cwd, ctx))
        if not cwd.is_absolute():
            cwd = self.config.path.parent / cwd
        env = {k: expand(v, ctx) for k, v in app.env.items()}
        env.update(BLUEGREEN_SLOT=slot, BLUEGREEN_PORT=ctx["port"], BLUEGREEN_BUILD=str(build),
                   BLUEGREEN_STATE_DIR=str(self.state_dir))
        return await slots.spawn(
            [expand(a, ctx) for a in app.command], cwd, env,
            slot=slot, port=app.port(slot), build=build, log_path=self.state_dir / "logs" / f"{slot}.log",
        )

    async def free_port(self, port: int) -> None:
        """Make sure `port` is free for a new app: a leftover of ours holding it (a server its start
        script left behind, a process a killed daemon never recorded) is stopped; anything
        else is the user's, and named."""
        if not drain.listening(port):
            return
        ours = {p.pid for p in (self.active, self.retiring) if p is not None}
        holders = drain.listening_pids(port) - ours
        s = self.config.app.stop
        for what in await slots.clear_leftovers(self.state_dir, holders, s.signal, s.timeout):
            log.warning("port %d was held by a leftover of this daemon's apps; stopped it: %s", port, what)
            self.event("leftover_stopped", port=port, detail=what)
        if drain.listening(port):
            raise PortInUse(f"port {port} is already in use by {drain.port_holder(port)}; stop that process or "
                            "change app.ports", port=port)

    async def drain_port(self, port: int, watch: slots.AppProcess | None = None) -> dict[str, Any]:
        """Wait for the last reload's old nginx workers to exit, then for `port` to have no
        connection in flight, both within drain.timeout; report what was left. Stops early if
        `watch` (the new build) dies meanwhile: then waiting would only prolong an outage."""
        began = time.monotonic()
        deadline = began + self.config.drain.timeout
        died = False

        async def wait_workers() -> list[int]:
            return await self.nginx.wait_old_generation(deadline)

        workers = asyncio.ensure_future(wait_workers())
        try:
            while not workers.done():
                if watch is not None and not watch.alive():
                    died = True
                    break
                await asyncio.wait({workers}, timeout=self.config.drain.interval)
        finally:
            workers.cancel()
        old_workers = workers.result() if workers.done() and not workers.cancelled() else []
        workers_s = time.monotonic() - began
        left = 0 if died else drain.inflight(port)
        while left and time.monotonic() < deadline:
            if watch is not None and not watch.alive():
                died = True
                break
            await asyncio.sleep(self.config.drain.interval)
            left = drain.inflight(port)
        return {
            "workers_wait": round(workers_s, 4),
            "old_workers_left": len(old_workers),
            "connections_cut": left,
            "timed_out": bool(left or old_workers) and not died,
            "died": died,
            "after": time.monotonic() - began,
        }

    def adopt_active(self, app: slots.AppProcess, previous: Path | None = None) -> None:
        """Record `app` as the one that serves (and `previous`, for a release, as what served before)."""
        self.state.active = _slot_state(app)
        if previous is not None:
            self.state.previous_build = str(previous)
        self.state.nginx = self.managed.identity() if self.managed is not None else None

    # ---- control commands

    async def handle(self, request: Request, reply: Any) -> Any:
        handler = getattr(self, f"cmd_{request.cmd}")
        return await handler(reply, **request.args)

    async def cmd_help(self, reply: Any) -> Any:
        return {name: spec.help for name, spec in COMMANDS.items()}

    async def cmd_status(self, reply: Any) -> Any:
        return self.status_report()

    async def cmd_swap(self, reply: Any, build: str | None = None) -> Any:
        if build is None:
            if self.active is None:
                raise NotReadyYet("the daemon has not started the app yet; try again when status shows it serving")
            target = self.active.build  # a restart: what was released, not what a link names now
        else:
            target = Path(build)
        return await self.run_swap(check_build(target), reply, reason="swap" if build else "restart")

    async def cmd_rollback(self, reply: Any) -> Any:
        previous = self.state.previous_build
        if not previous:
            raise BluegreenError("there is no previous build to roll back to (no swap has completed yet)",
                                 code="no_previous")
        return await self.run_swap(check_build(Path(previous)), reply, reason="rollback")

    async def cmd_cancel(self, reply: Any) -> Any:
        task, record = self.swap_task, self.swap
        if task is None or task.done() or record is None:
            raise BluegreenError("no swap is running", code="no_swap")
        if record.phase not in CANCELLABLE:
            raise BluegreenError(
                f"the swap is past the switch (phase: {record.phase}): the new build serves; "
                "let it finish draining, then `bluegreen rollback` if needed",
                code="too_late", phase=record.phase,
            )
        log.info("cancelling the %s to %s in phase %s", record.reason, record.build, record.phase)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return {"cancelled": record.build, "phase": record.error.get("phase") if record.error else None,
                "active": self.active.to_dict() if self.active else None}

    async def cmd_quit(self, reply: Any, keep: bool = False) -> Any:
        self.keep_serving = self.keep_serving or keep
        self.signals.put_nowait("quit")
        return {"stopping": True, "keep_serving": self.keep_serving}

    async def run_swap(self, build: Path, reply: Any, reason: str) -> Any:
        if self.swap_task is not None and not self.swap_task.done():
            assert self.swap is not None
            raise Busy(
                f"a {self.swap.reason} to {self.swap.build} is in progress (phase: {self.swap.phase}); "
                "wait for it to finish (bluegreen status)",
                phase=self.swap.phase,
            )
        if self.status not in ("serving", "recovering", "failed") or self.active is None:
            raise NotReadyYet(f"the daemon is {self.status}; swaps are accepted once it serves")
        if self.state_unsaved:
            await self.retry_save()
            if self.state_unsaved:
                raise StateError(f"no swap until state.json can be written: {self.warning}", traffic="unchanged")
        old = self.active
        slot = other_slot(old.slot)
        plan = Plan(build=build, slot=slot, port=self.config.app.port(slot), old=old, reason=reason,
                    old_build=old.build)
        record = SwapRecord(build=str(build), to_slot=slot, to_port=plan.port, from_slot=old.slot, reason=reason)
        self.swap = record
        log.info("%s: %s -> %s (port %d)", reason, old.build, build, plan.port)

        def emit(event: dict[str, Any]) -> None:
            if event.get("status") == "done":
                detail = {k: v for k, v in event.items() if k not in ("event", "status", "elapsed")}
                log.info("  %s done %s", event["event"], detail)
            step = (event["event"], event.get("status"))
            if step == ("start", "done") or (step[1] == "begin" and step[0] in PERSISTED_PHASES):
                # Written before each step that changes processes or traffic: a daemon killed
                # right after it can tell, on restart, what to finish or undo.
                # The new process: the standby until commit, the active one after it.
                new = self.standby or (self.active if self.active is not old else None)
                self.state.swap = {"phase": event["event"], "reason": reason, "build": str(build),
                                   "old": asdict(_slot_state(old)),
                                   "standby": asdict(_slot_state(new)) if new else None}
                if record.committed:
                    self.save_quietly()  # after commit a failed write must not stop the old build's exit
                else:
                    self.store.save(self.state)
            reply(event)

        # The swap runs as its own task: a client that disconnects does not cancel it.
        self.swap_task = asyncio.ensure_future(run_swap(plan, SlotOps(self), emit, record))
        handed_over = False
        try:
            await asyncio.shield(self.swap_task)
        except asyncio.CancelledError:
            if record.committed and self.status == "stopping":
                handed_over = self.keep_serving  # the swap is done; the old build's exit is handed over
            elif self.swap_task.cancelled() and self.status != "stopping":
                # `bluegreen cancel`, not our own connection being torn down
                raise BluegreenError(f"the {reason} was cancelled in phase {record.error and record.error.get('phase')}; "
                                     "the standby was stopped and traffic is unchanged", code="cancelled",
                                     phase=record.error and record.error.get("phase"), traffic="unchanged") from None
            else:
                raise
        except BluegreenError as e:
            log.error("%s to %s failed in %s: %s", reason, build, e.details.get("phase"), e.message)
            raise
        finally:
            self.nginx.forget_undo()
            if not handed_over:  # a handed-over swap stays in state.json for the next daemon to finish
                self.state.swap = None
            self.state.last_swap = record.to_dict()
            self.state.history.append({k: record.to_dict()[k] for k in ("build", "reason", "outcome", "started_at")})
            if not self.state_unsaved:
                self.save_quietly()
        if self.active is not None and not self.active.alive() and self.status != "stopping":
            why = self.active.exit_reason or slots.describe_exit(self.active.returncode)
            raise AppError(f"the new build ({self.active.slot}, pid {self.active.pid}) {why} right after the swap "
                           f"(the old build was already stopped); the daemon restarts it: see `bluegreen status` "
                           f"and {self.active.log_path}", code="app_exited", traffic="moved")
        if reason != "recover":  # a release the user asked for: a fresh start for crash counting
            self.restarts, self.status, self.failure = 0, "serving", None
        log.info("%s to %s done in %.2fs", reason, build, (record.finished_at or 0) - record.started_at)
        return {"active": self.active.to_dict() if self.active else None, "swap": record.to_dict()}

    def status_report(self) -> dict[str, Any]:
        n: dict[str, Any] = {"mode": self.config.nginx.mode}
        try:
            n["master_pid"] = self.nginx.master_pid()
            n["running"] = True
        except BluegreenError as e:
            n["running"] = False
            n["error"] = e.message
            if self.managed is not None and self.nginx_failures:
                n["error"] = self.warning or e.message
        if self.managed is not None:
            n["listen"] = self.config.nginx.listen
            n["prefix"] = str(self.managed.prefix)
        else:
            n["upstream_file"] = str(self.nginx.upstream_path)
        running = self.swap if self.swap_task is not None and not self.swap_task.done() else None
        return {
            "daemon": {"pid": os.getpid(), "version": __version__, "status": self.status,
                       "since": self.started_at, "config": str(self.config.path), "state_dir": str(self.state_dir),
                       "failure": self.failure, "restarts": self.restarts, "warning": self.warning,
                       "state_saved": not self.state_unsaved},
            "events": self.state.events[-10:],
            "active": self.active.to_dict() if self.active else None,
            "standby": self.standby.to_dict() if self.standby else None,
            "previous_build": self.state.previous_build,
            "swap": running.to_dict() if running else None,
            "last_swap": self.state.last_swap,
            "nginx": n,
        }


class SlotOps:
    """The real I/O behind each swap phase (see swap.SwapOps)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.cfg = daemon.config
        self.before: tuple[SlotState | None, str | None] = (None, None)

    async def prepare(self, plan: Plan[slots.AppProcess]) -> dict[str, Any]:
        check_build(plan.build)
        await self.d.free_port(plan.port)
        return {"slot": plan.slot, "port": plan.port, "build": str(plan.build)}

    async def start(self, plan: Plan[slots.AppProcess]) -> tuple[slots.AppProcess, dict[str, Any]]:
        app = await self.d.spawn(plan.slot, plan.build)
        self.d.standby = app
        return app, {"pid": app.pid, "log": str(app.log_path)}

    async def wait_ready(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        r = await probes.wait_ready(standby, self.cfg.app.ready, self.d.ready_url(standby))
        return {"checks": r.checks, "target": r.target, "log_line": r.log_line}

    async def switch(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        if not standby.alive():
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} right after it "
                           "became ready; nginx was not switched", code="app_exited")
        result = await self.d.nginx.switch(plan.port)
        if not standby.alive():  # it died while nginx reloaded: put the old upstream back at once
            if not await self.switch_back(plan):
                raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} during the "
                               "switch, and nginx could not be switched back; see the daemon log", code="app_exited")
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} during the switch; "
                           "nginx was switched back", code="app_exited")
        return result

    async def switch_back(self, plan: Plan[slots.AppProcess]) -> bool:
        try:
            await self.d.nginx.switch_back(plan.old.port)
        except BluegreenError as e:
            log.error("could not switch nginx back to port %d: %s", plan.old.port, e.message)
            return False
        log.info("nginx switched back to port %d", plan.old.port)
        return True

    async def commit(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        d = self.d
        self.before = (d.state.active, d.state.previous_build)
        d.adopt_active(standby, previous=plan.old.build if plan.is_release else None)
        try:
            d.store.save(d.state)
        except BluegreenError:
            d.state.active, d.state.previous_build = self.before
            raise
        d.active, d.standby, d.retiring = standby, None, plan.old
        return {"state": str(d.store.path)}

    async def keep(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> None:
        """nginx serves from the standby and could not be switched back: it is the active app now.
        state.json still names the old one (its write failed), and the old one keeps running, so
        a daemon restarted before the write succeeds still finds a consistent world."""
        d = self.d
        d.adopt_active(standby, previous=plan.old.build if plan.is_release else None)
        d.active, d.standby, d.retiring = standby, None, plan.old
        d.state_unsaved = True
        d.warning = (f"state.json could not be written, and nginx could not be switched back: the new build "
                     f"({standby.build}) serves, while state.json still names the old one. Free disk space "
                     f"in {d.state_dir}: the daemon retries the write by itself, then stops the old build")
        log.error("%s", d.warning)

    async def revert(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> bool:
        """The new build died while the old one drained: send traffic back to the old one."""
        d = self.d
        if not plan.old.alive():
            return False
        if not await self.switch_back(plan):
            return False
        d.state.active, d.state.previous_build = self.before
        d.active, d.retiring = plan.old, None
        d.save_quietly()
        d.event("reverted", slot=plan.old.slot, pid=plan.old.pid, build=str(plan.old.build),
                dead=standby.exit_reason or slots.describe_exit(standby.returncode))
        await self.discard(standby, drain=False)
        return True

    async def drain(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        result = await self.d.drain_port(plan.old.port, watch=standby)
        if result["died"]:
            why = slots.describe_exit(standby.returncode)
            raise AppDied(
                f"the new build ({standby.slot}, pid {standby.pid}) {why} {result['after']:.2f}s after the switch, "
                f"while the old build was still serving its last requests; traffic is back on the old build "
                f"({plan.old.slot}, pid {plan.old.pid}), which never stopped. See {standby.log_path}"
                + slots.exit_hint(standby.returncode))
        if result["timed_out"]:
            result["warning"] = (f"{result['connections_cut']} connection(s) still open on the old build at "
                                 f"drain.timeout ({self.cfg.drain.timeout:g}s) were cut")
            log.warning("drain of %s: %s", plan.old.slot, result["warning"])
        del result["died"], result["after"]
        return result

    async def stop_old(self, plan: Plan[slots.AppProcess]) -> dict[str, Any]:
        s = self.cfg.app.stop
        result = await slots.stop(plan.old, s.signal, s.timeout)
        if self.d.retiring is plan.old:
            self.d.retiring = None
        return result

    async def discard(self, standby: slots.AppProcess, *, drain: bool) -> None:
        if drain:
            await self.d.drain_port(standby.port)
        s = self.cfg.app.stop
        result = await slots.stop(standby, s.signal, s.timeout)
        log.info("standby %s (pid %d) %s", standby.slot, standby.pid, result["how"])
        if self.d.standby is standby:
            self.d.standby = None


class LogFile(logging.FileHandler):
    """daemon.log: a failed write (a full disk) is said once on stderr, not as a traceback per line."""

    failing = False
    failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self.failed_now = False
        super().emit(record)  # calls handleError on failure
        if not self.failed_now:
            self.failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed_now = True
        if not self.failing:
            self.failing = True
            print(f"bluegreen: cannot write {self.baseFilename}: {sys.exc_info()[1]}; logging to stderr only "
                  "until it works again", file=sys.stderr)


def setup_logging(state_dir: Path) -> None:
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("bluegreen")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    for handler in (logging.StreamHandler(sys.stderr), LogFile(state_dir / "logs" / "daemon.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    setup_logging(config.daemon.state_dir)
    try:
        return asyncio.run(Daemon(config).run())
    except BluegreenError as e:
        log.error("%s", e.message)
        return 1
