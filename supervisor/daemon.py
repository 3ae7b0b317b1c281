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
from typing import Any

from . import __version__, commands
from .app import App
from .config import Config
from .control import ControlServer
from .errors import BluegreenError
from .monitor import Monitor
from .protocol import Request
from .state import DaemonStatus

log = logging.getLogger("bluegreen")


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
        boot = asyncio.ensure_future(self.app.boot())
        stop_sig = asyncio.ensure_future(self.signals.get())
        done, _ = await asyncio.wait({boot, stop_sig}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if boot in done:
            if boot.exception() is not None:
                err = boot.exception()
                msg = f"[{err.code}] {err.message}" if isinstance(err, BluegreenError) else repr(err)
                log.error("start-up failed: %s", msg)
                code = 1
            else:
                self.app.status = DaemonStatus.SERVING
                self.monitor_task = asyncio.ensure_future(self.monitor.run())
                await stop_sig
        else:
            boot.cancel()
            await asyncio.gather(boot, return_exceptions=True)
        stop_sig.cancel()
        await self.shutdown()
        return code

    async def handle(self, request: Request, reply: Any) -> Any:
        return await self.verbs[request.cmd].handle(self, reply, **request.args)

    def quit(self, keep: bool) -> None:
        """Stop as on SIGTERM; with `keep`, leave the app and the managed nginx to the next daemon."""
        self.app.keep_serving = self.app.keep_serving or keep
        self.signals.put_nowait("quit")

    # ---- stopping

    async def shutdown(self) -> None:
        self.app.status = DaemonStatus.STOPPING
        log.info("shutting down%s", " (keeping the app and nginx serving)" if self.app.keep_serving else "")
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
        app = self.app
        await self._settle_swap()
        if app.keep_serving:
            if app.active is not None and app.active.alive():
                app.serving(app.active)
                app.ledger.save_quietly()
                log.info("left %s (pid %d)%s running; the next daemon adopts them", app.active.slot,
                         app.active.pid, f" and nginx (pid {app.managed.pid})" if app.managed else "")
            return
        # nginx first, so no request is sent to an app that is already stopping.
        if app.managed is not None:
            how = await app.managed.stop(self.config.drain.timeout if graceful else 0.0)
            log.info("managed nginx %s", how)
        app.ledger.nginx_stopped()
        warm = app.release.drop_warm()
        for proc in (app.standby, app.active, app.retiring, warm.app if warm else None):
            if proc is not None:
                result = await app.stop(proc, graceful)
                log.info("%s (pid %d) %s", proc.slot, proc.pid, result["how"])
        app.retiring = None

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
        app.swap_task.cancel()
        await asyncio.gather(app.swap_task, return_exceptions=True)

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
