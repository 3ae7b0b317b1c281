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

import psutil

from . import __version__, drain, nginx, probes, slots
from .config import SLOTS, Config, expand
from .control import ControlServer
from .errors import AppError, BluegreenError, BuildError, Busy, NotReadyYet, PortInUse
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
    if not build.is_absolute():
        raise BuildError(f"build path {str(build)!r} must be absolute (the CLI resolves relative paths for you)")
    if not build.exists():
        raise BuildError(f"build {build} does not exist")
    if not build.is_dir():
        raise BuildError(f"build {build} is not a directory")
    return build


def port_holder(port: int) -> str:
    """Name the process listening on `port` (only called on the error path: it scans every socket)."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    cmd = " ".join(psutil.Process(c.pid).cmdline()) or psutil.Process(c.pid).name()
                except psutil.Error:
                    cmd = "?"
                return f"pid {c.pid} ({cmd})"
    except psutil.Error:
        pass
    return "a process this user cannot see (try as root: ss -ltnp)"


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
        self.started_at = time.time()
        self.signals: asyncio.Queue[Any] = asyncio.Queue()
        self.keep_serving = config.daemon.on_stop == "keep"
        self._lock_fd: int | None = None

    # ---- life cycle

    async def run(self) -> int:
        for sub in ("logs", "slots"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
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
        if await self.adopt():
            return
        saved = self.state.active
        slot, build = "blue", self.config.app.build
        if saved is not None:
            if Path(saved.build).is_dir():
                slot, build = saved.slot, Path(saved.build)
            else:
                log.warning("saved build %s is gone; starting app.build %s", saved.build, build)
        check_build(build)
        port = self.config.app.port(slot)
        self._check_port_free(port)
        log.info("starting %s on %s (port %d)", build, slot, port)
        app = await self._spawn(slot, build)
        self.standby = app
        try:
            ready = await probes.wait_ready(app, self.config.app.ready, self._ready_url(app))
            log.info("%s ready after %.2fs (%d checks)", slot, ready.seconds, ready.checks)
            await self.point_nginx_at(port, force=True)
        except BaseException:
            await slots.stop(app, self.config.app.stop.signal, self.config.app.stop.timeout)
            self.standby = None
            raise
        self.standby = None
        self.active = app
        self.state.swap = None
        self._remember(app)
        self.store.save(self.state)
        log.info("serving %s from %s (port %d, pid %d)", build, slot, port, app.pid)

    def _adoptable(self, saved: SlotState | dict[str, Any] | None) -> slots.AppProcess | None:
        if not saved:
            return None
        s = SlotState(**saved) if isinstance(saved, dict) else saved
        return slots.adopt(s.slot, s.port, Path(s.build), s.pid, s.create_time, s.since,
                           self.state_dir / "logs" / f"{s.slot}.log")

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
        self._event("adopted", slot=active.slot, pid=active.pid, build=str(active.build))
        log.info("adopted %s (pid %d, port %d) serving %s", active.slot, active.pid, active.port, active.build)
        for p in leftovers:
            await self._retire(p, drain=True)
        st.swap = None
        self._remember(active)
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
        ops = SlotOps(self)
        if drain:
            await ops.drain_port(app.port)
        s = self.config.app.stop
        result = await slots.stop(app, s.signal, s.timeout)
        log.info("stopped leftover %s (pid %d): %s", app.slot, app.pid, result["how"])

    # ---- watching the active app and nginx

    async def monitor(self) -> None:
        """Notice a dead active app or managed nginx at once (our children) or within 0.25 s
        (adopted processes, polled), and bring it back."""
        while True:
            await self._wait_for_an_exit(0.25)
            if self.swap_task is not None and not self.swap_task.done():
                await asyncio.gather(self.swap_task, return_exceptions=True)
                continue  # a swap replaces the active app anyway; a failed one is seen next round
            try:
                if self.managed is not None and not self.managed.alive():
                    await self.restart_nginx(self.managed)
                if self.active is not None and not self.active.alive() and self.status in ("serving", "recovering"):
                    await self.recover()
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
        lines = managed._log_since(0)[-3:]
        log.error("the managed nginx master (pid %s) died%s; restarting it", managed.pid,
                  (": " + " | ".join(lines)) if lines else "")
        self._event("nginx_died", pid=managed.pid)
        port = self.active.port if self.active else self.config.app.port("blue")
        try:
            info = await managed.start(port)
        except BluegreenError as e:
            log.error("could not restart nginx: %s; retrying in 1s", e.message)
            await asyncio.sleep(1.0)
            return
        self._event("nginx_restarted", pid=info["pid"])
        if self.active is not None:
            self._remember(self.active)
        self._save_quietly()

    async def recover(self) -> None:
        """The active app died: start the same build on the other slot, with capped backoff."""
        dead = self.active
        assert dead is not None
        r = self.config.app.restart
        if self._crashed_pid != dead.pid:  # a new crash (not a retry of the same one)
            self._crashed_pid = dead.pid
            why = dead.exit_reason or slots.describe_exit(dead.returncode)
            if time.time() - dead.started_at >= r.reset_after:
                self.restarts = 0
            log.error("the active app (%s, pid %d, %s) %s", dead.slot, dead.pid, dead.build, why)
            self._event("crash", slot=dead.slot, pid=dead.pid, exit=why, build=str(dead.build))
        self.restarts += 1
        if self.restarts > r.attempts:
            self.status = "failed"
            self.failure = (f"the app crashed {self.restarts - 1} times in a row; not restarting it again. "
                            f"Fix the build and `bluegreen swap` to it (see {dead.log_path})")
            log.error("%s", self.failure)
            self._event("failed", build=str(dead.build), restarts=self.restarts - 1)
            self._save_quietly()
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
        self._event("restarted", slot=self.active.slot if self.active else None,
                    pid=self.active.pid if self.active else None)

    def _event(self, kind: str, **details: Any) -> None:
        self.state.events.append({"at": time.time(), "event": kind, **details})

    def _save_quietly(self) -> None:
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
        if self.swap_task is not None and not self.swap_task.done():
            self.swap_task.cancel()
            await asyncio.gather(self.swap_task, return_exceptions=True)
        if self.keep_serving:
            if self.active is not None and self.active.alive():
                self._remember(self.active)
                self._save_quietly()
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
        for app in (self.standby, self.active):
            if app is not None:
                result = await slots.stop(app, stop.signal, stop.timeout if graceful else 0.0)
                log.info("%s (pid %d) %s", app.slot, app.pid, result["how"])

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

    def _context(self, slot: str, build: Path) -> dict[str, str]:
        slot_dir = self.state_dir / "slots" / slot
        return {
            "port": str(self.config.app.port(slot)),
            "slot": slot,
            "build": str(build),
            "build_name": build.name,
            "slot_dir": str(slot_dir),
        }

    def _ready_url(self, app: slots.AppProcess) -> str | None:
        url = self.config.app.ready.url
        return expand(url, self._context(app.slot, app.build)) if url else None

    async def _spawn(self, slot: str, build: Path) -> slots.AppProcess:
        app = self.config.app
        ctx = self._context(slot, build)
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

    def _check_port_free(self, port: int) -> None:
        if drain.listening(port):
            raise PortInUse(
                f"port {port} is already in use by {port_holder(port)}; stop that process or change app.ports",
                port=port,
            )

    def _remember(self, app: slots.AppProcess) -> None:
        self.state.active = _slot_state(app)
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
            target = self.active.build
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
        old = self.active
        slot = other_slot(old.slot)
        plan = Plan(build=build, slot=slot, port=self.config.app.port(slot), old=old, reason=reason)
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
                self.store.save(self.state)
            reply(event)

        # The swap runs as its own task: a client that disconnects does not cancel it.
        self.swap_task = asyncio.ensure_future(run_swap(plan, SlotOps(self), emit, record))
        try:
            await asyncio.shield(self.swap_task)
        except asyncio.CancelledError:
            if self.swap_task.cancelled() and self.status != "stopping":
                # `bluegreen cancel`, not our own connection being torn down
                raise BluegreenError(f"the {reason} was cancelled in phase {record.error and record.error.get('phase')}; "
                                     "the standby was stopped and traffic is unchanged", code="cancelled",
                                     phase=record.error and record.error.get("phase")) from None
            raise
        except BluegreenError as e:
            log.error("%s to %s failed in %s: %s", reason, build, e.details.get("phase"), e.message)
            raise
        finally:
            self.state.swap = None
            self.state.last_swap = record.to_dict()
            self.state.history.append({k: record.to_dict()[k] for k in ("build", "reason", "outcome", "started_at")})
            self._save_quietly()
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
        if self.managed is not None:
            n["listen"] = self.config.nginx.listen
            n["prefix"] = str(self.managed.prefix)
        else:
            n["upstream_file"] = str(self.nginx.upstream_path)
        running = self.swap if self.swap_task is not None and not self.swap_task.done() else None
        return {
            "daemon": {"pid": os.getpid(), "version": __version__, "status": self.status,
                       "since": self.started_at, "config": str(self.config.path), "state_dir": str(self.state_dir),
                       "failure": self.failure, "restarts": self.restarts},
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

    async def prepare(self, plan: Plan[slots.AppProcess]) -> dict[str, Any]:
        check_build(plan.build)
        self.d._check_port_free(plan.port)
        return {"slot": plan.slot, "port": plan.port, "build": str(plan.build)}

    async def start(self, plan: Plan[slots.AppProcess]) -> tuple[slots.AppProcess, dict[str, Any]]:
        app = await self.d._spawn(plan.slot, plan.build)
        self.d.standby = app
        return app, {"pid": app.pid, "log": str(app.log_path)}

    async def wait_ready(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        r = await probes.wait_ready(standby, self.cfg.app.ready, self.d._ready_url(standby))
        return {"checks": r.checks, "target": r.target, "log_line": r.log_line}

    async def switch(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        if not standby.alive():
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} right after it "
                           "became ready; nginx was not switched", code="app_exited")
        result = await self.d.nginx.switch(plan.port)
        if not standby.alive():  # it died while nginx reloaded: put the old upstream back at once
            await self.switch_back(plan)
            raise AppError(f"the {standby.slot} slot {slots.describe_exit(standby.returncode)} during the switch; "
                           "nginx was switched back", code="app_exited")
        return result

    async def switch_back(self, plan: Plan[slots.AppProcess]) -> None:
        try:
            await self.d.nginx.switch(plan.old.port)
        except BluegreenError as e:
            log.error("could not switch nginx back to port %d: %s", plan.old.port, e.message)

    async def commit(self, plan: Plan[slots.AppProcess], standby: slots.AppProcess) -> dict[str, Any]:
        d = self.d
        before = (d.state.active, d.state.previous_build)
        d.state.previous_build = str(plan.old.build)
        d._remember(standby)
        try:
            d.store.save(d.state)
        except BluegreenError:
            d.state.active, d.state.previous_build = before
            raise
        d.active, d.standby = standby, None
        return {"state": str(d.store.path)}

    async def drain_port(self, port: int) -> dict[str, Any]:
        """Wait for the last reload's old nginx workers to exit, then for `port` to have no
        connection in flight, both within drain.timeout; report what was left."""
        began = time.monotonic()
        deadline = began + self.cfg.drain.timeout
        old_workers = await self.d.nginx.wait_old_generation(deadline)
        workers_s = time.monotonic() - began
        left = drain.inflight(port)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(self.cfg.drain.interval)
            left = drain.inflight(port)
        return {
            "workers_wait": round(workers_s, 4),
            "old_workers_left": len(old_workers),
            "connections_cut": left,
            "timed_out": bool(left or old_workers),
        }

    async def drain(self, plan: Plan[slots.AppProcess]) -> dict[str, Any]:
        result = await self.drain_port(plan.old.port)
        if result["timed_out"]:
            log.warning("drain of %s timed out after %gs: %d connection(s) will be cut",
                        plan.old.slot, self.cfg.drain.timeout, result["connections_cut"])
        return result

    async def stop_old(self, plan: Plan[slots.AppProcess]) -> dict[str, Any]:
        s = self.cfg.app.stop
        return await slots.stop(plan.old, s.signal, s.timeout)

    async def discard(self, standby: slots.AppProcess, *, drain: bool) -> None:
        if drain:
            await self.drain_port(standby.port)
        s = self.cfg.app.stop
        result = await slots.stop(standby, s.signal, s.timeout)
        log.info("standby %s (pid %d) %s", standby.slot, standby.pid, result["how"])
        if self.d.standby is standby:
            self.d.standby = None


def setup_logging(state_dir: Path) -> None:
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("bluegreen")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(state_dir / "logs" / "daemon.log")):
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
