"""The process-level daemon: the state-dir lock, signals, the control socket, the shutdown order.

Signal handlers only enqueue; the main task reacts. Start-up: lock the state dir, open the
control socket (status answers "starting" at once), boot the app (adopt what still serves, or
start the saved or configured build), then watch it. SIGTERM/SIGINT: stop accepting, settle a
running swap (before its switch it is cancelled and its standby stopped; after it, it reports
success and its old build is stopped or handed over), stop nginx gracefully (managed mode), then
the app; a second signal forces. The app's own life cycle is app.App.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__, commands, faults
from ..config.schema import Config, LogsConfig, machine_warnings
from ..errors import BluegreenError
from ..processes import procs
from ..processes.logs import DaemonLog
from ..protocol import Request
from ..proxy.runtime import route_file_of
from ..release.app import App
from ..release.history import History
from ..state import DaemonStatus
from .control import ControlServer
from .metrics import MetricsServer, Recorder
from .monitor import Monitor
from .notify import Notifier

log = logging.getLogger("bluegreen")
HOUSEKEEPING = 1.0  # seconds between two rounds of housekeeping
FORCE_GRACE = 2.0  # seconds the graceful shutdown gets to unwind after a second signal


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.daemon.state_dir
        self.app = App(config)
        self.monitor = Monitor(self.app)
        self.control = ControlServer(config.daemon.socket, self.handle, config.daemon)
        self.verbs = commands.load()
        self.monitor_task: asyncio.Task[Any] | None = None
        self.started_at = time.time()
        self.signals: asyncio.Queue[Any] = asyncio.Queue()
        self._lock_fd: int | None = None
        self._owner_fd: int | None = None  # the lock beside your upstream file (external mode)
        self._created: list[Path] = []  # files this start added beside your upstream file: a failed start removes them
        self._failed_start = False
        self.recorder = Recorder(self.started_at)
        self.history = History(self.state_dir / "history.jsonl", config.logs.max_bytes, config.logs.backups)
        self.app.keeper.observers += [self.recorder.swap_ended, self.history.record]
        self.notifier = Notifier()
        if self.notifier.enabled:  # under systemd: every phase of a swap shows in `systemctl status`
            self.app.watchers.append(lambda event: self.notifier.status(status_line(self.app, event)))
        listen = config.daemon.metrics_listen
        self.metrics = MetricsServer(self.app, self.recorder, listen) if listen else None

    async def run(self) -> int:
        try:
            for sub in ("logs", "slots"):
                (self.state_dir / sub).mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise BluegreenError(f"cannot create {self.state_dir}: {e.strerror}; check daemon.state_dir",
                                 code="config") from None
        self._lock()
        if not procs.become_subreaper():
            log.warning("could not become a child subreaper: orphans of the app, its hooks or nginx go to pid 1")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # queued only; the main task reacts
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        if self.metrics is not None:
            await self.metrics.start()
        await self.control.start()
        log.info("bluegreen %s daemon pid %d, config %s, socket %s", __version__, os.getpid(),
                 self.config.path, self.config.daemon.socket)
        for warning in machine_warnings(self.config):
            log.warning("%s", warning)
        boot = asyncio.ensure_future(self.app.boot())
        stop_sig = asyncio.ensure_future(self.stop_requested())
        done, _ = await asyncio.wait({boot, stop_sig}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if boot in done:
            if boot.exception() is not None:
                err = boot.exception()
                msg = f"[{err.code}] {err.message}" if isinstance(err, BluegreenError) else repr(err)
                log.error("start-up failed: %s", msg)
                self.notifier.status(f"start-up failed: {msg.splitlines()[0]}")
                code = 1
                self._failed_start = True
            else:
                self.app.set_status(DaemonStatus.SERVING)
                self.notifier.ready(status_line(self.app))
                self.monitor_task = asyncio.ensure_future(self.monitor.run())
                housekeeping = asyncio.ensure_future(self.housekeeping())
                await stop_sig
                housekeeping.cancel()
        else:
            boot.cancel()
            await asyncio.gather(boot, return_exceptions=True)
        stop_sig.cancel()
        await self.shutdown()
        return code

    @property
    def cleanup_bound(self) -> float:
        """The longest a cancelled swap's or monitor's cleanups may take: drain a standby, then stop it."""
        return self.config.drain.timeout + self.config.drain.grace + self.config.app.stop.timeout + FORCE_GRACE

    async def stop_requested(self) -> Any:
        """The next SIGTERM, SIGINT or `quit`. A SIGHUP on the way (logrotate's convention) reopens
        the daemon's log; it never stops the daemon."""
        while True:
            sig = await self.signals.get()
            if sig != signal.SIGHUP:
                return sig
            for handler in logging.getLogger("bluegreen").handlers:
                if isinstance(handler, DaemonLog):
                    handler.reopen()
            log.info("SIGHUP: logs/daemon.log reopened (the config is read at start only: restart the daemon "
                     "to apply a changed config)")

    async def housekeeping(self) -> None:
        """Whatever the monitor or a long swap is doing, once a second: rotate the managed nginx's
        logs, write state.json again if someone else changed it, tell systemd what the daemon does;
        and ping its watchdog (from this loop: a hung loop misses its pings and systemd restarts the
        daemon). No error ends it: a loop that stopped pinging would have systemd kill a daemon
        that works."""
        interval = min(HOUSEKEEPING, self.notifier.watchdog_interval or HOUSEKEEPING)
        zombies: set[int] = set()
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.ping()
            await asyncio.sleep(interval)
            faults.block_loop()  # tests only
            try:
                zombies = procs.reap(zombies)  # orphans reparented to the daemon, once they exit
                self.app.keeper.keep_file()
                if self.notifier.enabled:
                    self.notifier.status(status_line(self.app))
                if self.app.managed is not None:
                    for path in self.app.managed.rotate_logs():
                        log.info("rotated %s (logs.max_bytes)", path)
            except OSError as e:
                log.warning("could not rotate the nginx logs: %s", e)
            except Exception:
                log.exception("housekeeping error")

    async def handle(self, request: Request, reply: Any) -> Any:
        return await self.verbs[request.cmd].handle(self, reply, **request.args)

    def quit(self, keep: bool) -> None:
        """Stop as on SIGTERM; with `keep`, leave the app and the managed nginx to the next daemon."""
        if keep:
            self.app.hand_over()
        self.signals.put_nowait("quit")

    # ---- stopping

    async def shutdown(self) -> None:
        self.app.set_status(DaemonStatus.STOPPING)
        self.notifier.stopping()
        log.info("shutting down%s", " (keeping the app and nginx serving)" if self.app.keep_serving else "")
        # A second SIGTERM/SIGINT forces, whatever the graceful steps wait for (a recovery swap
        # draining a hung app, nginx finishing long requests): they get FORCE_GRACE to notice.
        force = asyncio.ensure_future(self.stop_requested())
        work = asyncio.ensure_future(self._graceful_shutdown())
        done, _ = await asyncio.wait({force, work}, return_when=asyncio.FIRST_COMPLETED)
        if force in done:
            log.warning("second signal: forcing shutdown (processes get SIGKILL)")
            work.cancel()
            await asyncio.wait({work}, timeout=FORCE_GRACE)
            await self._forced_shutdown()
        force.cancel()
        await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        self._unlock()
        for path in self._created if self._failed_start else ():  # your nginx's directory, as it was found
            path.unlink(missing_ok=True)
        log.info("stopped")

    async def _graceful_shutdown(self) -> None:
        if self.monitor_task is not None:
            await cancelled(self.monitor_task, self.cleanup_bound)
        await self._shutdown_steps(graceful=True)

    async def _forced_shutdown(self) -> None:
        """Without waiting for any swap or drain: nginx and every app process are killed (unless
        they are to keep serving for the next daemon)."""
        app = self.app
        if self.monitor_task is not None:
            self.monitor_task.cancel()  # nothing it would restart may come back
        await app.spare.end("the daemon stops", graceful=False)
        await app.catcher.close()
        if app.keep_serving:
            return
        if app.managed is not None:
            log.info("managed nginx %s", await app.managed.stop(0.0))
        await _stop_the_apps(app, graceful=False)
        app.keeper.save_quietly()

    async def _shutdown_steps(self, graceful: bool) -> None:
        app = self.app
        await self._settle_swap()
        if app.holding.paused is not None:  # nobody would be left to end it
            try:
                await app.holding.resume()
            except BluegreenError as e:
                log.warning("could not resume nginx before stopping: %s (the next daemon resumes it)", e.message)
        await app.spare.end("the daemon stops", graceful)  # (no traffic: kept for nobody)
        await app.catcher.close()
        if app.keep_serving:
            if app.active is not None and app.active.alive():
                app.serving(app.active)
                app.keeper.save_quietly()
                log.info("left %s (pid %d)%s running; the next daemon adopts them", app.active.slot,
                         app.active.pid, f" and nginx (pid {app.managed.pid})" if app.managed else "")
            return
        # nginx first, so no request is sent to an app that is already stopping.
        if app.managed is not None:
            how = await app.managed.stop(self.config.drain.timeout if graceful else 0.0)
            log.info("managed nginx %s", how)
        await _stop_the_apps(app, graceful)

    async def _settle_swap(self) -> None:
        """Cancel a running swap. Past its commit only the old build's exit is left: say that it
        is handed over (keep serving) or stopped with the daemon."""
        app, record = self.app, self.app.swap
        if app.swap_task is None or app.swap_task.done():
            return
        old = app.retiring
        if record is not None and record.committed and old is not None:
            record.warnings.append(
                f"the daemon stopped during the {record.phase}: the old build ({old.slot}, pid {old.pid}) "
                + ("was handed over to the next daemon, which drains and stops it" if app.keep_serving
                   else "is stopped with the daemon, once nginx has finished its requests"))
        await cancelled(app.swap_task, self.cleanup_bound)

    def _lock(self) -> None:
        """One daemon per state_dir; with your nginx, also one per upstream file (two daemons
        writing one would send each other's traffic to their own app)."""
        self._lock_fd = _take_lock(self.state_dir / "daemon.lock", self.state_dir, lambda other: BluegreenError(
            f"another bluegreen daemon (pid {other.split()[0] if other else '?'}) already uses {self.state_dir}; "
            "stop it first, or give this config its own daemon.state_dir", code="locked"))
        n = self.config.nginx
        if n.mode == "external" and n.upstream_file is not None:
            owner = n.upstream_file.parent / f".{n.upstream_file.name}.owner"  # (not *.conf: nginx never reads it)
            self._created = [p for p in (owner, route_file_of(n.upstream_file)) if not p.exists()]
            try:
                self._owner_fd = _take_lock(owner, self.state_dir, lambda other: BluegreenError(
                    f"nginx.upstream_file {n.upstream_file} is already written by another bluegreen daemon "
                    f"({_owner(other)}): two daemons on one upstream file take each other's traffic. Give this "
                    "config its own nginx.upstream_file and nginx.upstream_name", code="locked"),
                    lambda last: self._other_owner(owner, last))
            except BaseException:
                self._unlock()
                raise

    def _other_owner(self, owner: Path, last: str) -> BluegreenError | None:
        """The upstream file's last owner is another app whose daemon is not running now (killed,
        or stopped with its app left serving): its app may still serve through the file."""
        state_dir = Path(last.partition(" ")[2]) if last.partition(" ")[2] else None
        if state_dir is None or state_dir.resolve() == self.state_dir.resolve() or not (state_dir / "state.json").exists():
            return None
        return BluegreenError(
            f"nginx.upstream_file {self.config.nginx.upstream_file} belongs to the app of state_dir {state_dir}, whose "
            "daemon is not running (its app may still serve through that file): give this config its own "
            f"nginx.upstream_file and nginx.upstream_name. If that app is gone for good, remove {owner}", code="locked")

    def _unlock(self) -> None:
        for fd in (self._lock_fd, self._owner_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._owner_fd = None


async def cancelled(task: asyncio.Task[Any], bound: float) -> None:
    """Cancel `task` once and wait for it to end: its shielded cleanups (a standby stopped, a
    preview ended) run to their end and are recorded. No wait on its path loses a cancellation
    (aio.within), so once is enough; past `bound` seconds (a cleanup that hangs) it is cancelled
    again, and the shutdown goes on."""
    task.cancel()
    await asyncio.wait({task}, timeout=bound)
    if not task.done():
        log.warning("%s did not end within %gs of its cancellation: cancelled again", task.get_name(), bound)
        task.cancel()
        await asyncio.wait({task}, timeout=FORCE_GRACE)


def status_line(app: App, event: dict[str, Any] | None = None) -> str:
    """One line for systemd's STATUS= (`systemctl status` shows it): the swap's phase, or what serves."""
    swap = app.swap if app.swapping() else None
    if swap is not None:
        phase = event["event"] if event and event.get("status") == "begin" else swap.phase
        return f"{swap.reason} to {Path(swap.build).name}: {phase}"
    active = app.active
    what = f"{active.build.name} on {active.slot} :{active.port} (pid {active.pid})" if active else "nothing"
    if app.status == DaemonStatus.FAILED:
        return f"failed: {app.failure}"
    return f"{app.status}: {what}" + (f"; warning: {app.warning}" if app.warning else "")


def setup_logging(state_dir: Path, logs: LogsConfig = LogsConfig()) -> None:
    (state_dir / "logs").mkdir(mode=0o750, parents=True, exist_ok=True)
    (state_dir / "logs").chmod(0o750)  # logs hold the apps' and the hooks' output: not for every local user
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("bluegreen")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    for handler in (logging.StreamHandler(sys.stderr), DaemonLog(state_dir / "logs" / "daemon.log", maxBytes=logs.max_bytes,
                                                                   backupCount=logs.backups)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _take_lock(path: Path, state_dir: Path, refused: Callable[[str], BluegreenError],
               owned: Callable[[str], BluegreenError | None] = lambda last: None) -> int:
    """An exclusive flock on `path` (held while the daemon lives, released by the kernel at its
    death), the file saying "pid state_dir"; `refused(what the holder wrote)` if another holds it,
    and `owned(what the last holder wrote)`'s error if that one's claim outlives it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        raise refused(other) from None
    claim = owned(os.read(fd, 4096).decode(errors="replace").strip())
    if claim is not None:
        os.close(fd)
        raise claim
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {state_dir}\n".encode())
    return fd


def _owner(text: str) -> str:
    pid, _, state_dir = text.partition(" ")
    return f"pid {pid or '?'}" + (f", state_dir {state_dir}" if state_dir else "")


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code. What is still running
    once it returns (cleanup a forced shutdown left behind) gets FORCE_GRACE, never longer."""
    setup_logging(config.daemon.state_dir, config.logs)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(Daemon(config).run())
    except BluegreenError as e:
        log.error("%s", e.message)
        return 1
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=FORCE_GRACE))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _stop_the_apps(app: App, graceful: bool) -> None:
    """Every app process of ours, after nginx: the standby, the active, the old and the warm builds."""
    app.keeper.nginx_stopped()
    warm = app.release.drop_warm()
    for proc in {p.pid: p for p in (app.standby, app.active, app.retiring, warm.app if warm else None)
                 if p is not None}.values():
        result = await app.stop(proc, graceful)
        log.info("%s (pid %d) %s", proc.slot, proc.pid, result["how"])
    app.retired()
