"""The managed nginx: an unprivileged nginx the daemon runs as its child, with every path in
its prefix (state_dir/nginx). Starting, adopting, restarting and stopping it lives here;
switching its traffic is nginx.ReloadSwitch's job, which reloads it through this Master.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from ..config.schema import Config
from ..errors import NginxError, PortInUse
from ..fsutil import atomic_write
from ..processes import sockets, procs
from ..processes.logs import NginxLogs
from .master import ErrorLog, run_command, workers
from .render import HOLD, TEMP_KINDS, free_loopback_port, render_managed_conf, runtime_part, upstream_text
from ..aio import within

log = logging.getLogger("bluegreen")


class ManagedNginx:
    """The nginx master the daemon starts, adopts, restarts and stops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.n = config.nginx
        self.prefix = config.daemon.state_dir / "nginx"
        self.conf_path = self.prefix / "nginx.conf"
        self.upstream_path = self.prefix / "upstream.conf"
        self.log = ErrorLog(self.prefix / "error.log")
        self.logs = NginxLogs(self.prefix, config.logs.max_bytes, config.logs.backups)
        self.pid_file = self.prefix / "nginx.pid"
        self.route_path = self.prefix / "route"  # the runtime switch's table is seeded from it
        self.hold_port = 0  # the runtime switch's hold server (render.hold_port_in), when it has one
        self.control_path = self.prefix / "control.sock"
        self.runtime = False  # rendered with the runtime switch (set by whoever chooses the switch)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.create_time = 0.0
        # Process groups of dead masters whose workers still finish their requests.
        self.orphans: list[int] = []

    def base_argv(self) -> list[str]:
        # -e keeps start-up logging out of /var/log/nginx; every reload/test uses these exact args.
        return [self.n.binary, "-p", f"{self.prefix}/", "-c", str(self.conf_path), "-e", str(self.log.path),
                "-g", "daemon off;"]

    def test_argv(self) -> list[str]:
        return self.base_argv() + ["-t", "-q"]

    def master_pid(self) -> int:
        if not self.alive():
            raise NginxError(f"the managed nginx is not running (see {self.log.path})", code="nginx_down")
        assert self.pid is not None
        return self.pid

    async def send_reload(self, master: int) -> None:
        # We own the master: signal it directly rather than through the pid file.
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            raise NginxError(f"the managed nginx master (pid {master}) is gone; see {self.log.path}",
                             code="nginx_down") from None

    def rotate_logs(self) -> list[Path]:
        """Rotate the access and error logs that passed logs.max_bytes (nginx reopens them)."""
        return self.logs.rotate_if_due(self.pid if self.alive() else None)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self.pid is not None and procs.alive(self.pid, self.create_time)

    def identity(self) -> dict[str, Any] | None:
        """What the next daemon needs to adopt this master."""
        return {"pid": self.pid, "create_time": self.create_time} if self.alive() else None

    def adopt(self, saved: dict[str, Any] | None) -> bool:
        """Take over the master a previous daemon started, if it still runs with our prefix."""
        if not saved or not procs.alive(saved["pid"], saved["create_time"]):
            return False
        try:
            cmdline = " ".join(psutil.Process(saved["pid"]).cmdline())
        except psutil.Error:
            return False
        if str(self.prefix) not in cmdline:
            return False
        self.proc, self.pid, self.create_time = None, saved["pid"], saved["create_time"]
        return True

    async def ensure_config(self) -> bool:
        """Rewrite nginx.conf from the current bluegreen config; True if it changed (a reload is due)."""
        text = self._conf()
        try:
            if self.conf_path.read_bytes() == text:
                return False
        except OSError:
            pass
        atomic_write(self.conf_path, text)
        return True

    def _conf(self) -> bytes:
        return render_managed_conf(self.config, self.prefix, self.upstream_path, self.runtime).encode()

    async def _wait_exit(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                await within(self.proc.wait(), timeout)
                return True
            except asyncio.TimeoutError:
                return False
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def refuse_what_blocks_a_start(self) -> None:
        """Raise now what would make nginx's start fail: an nginx left running on this prefix, or
        nginx.listen held by another process (a copied config): the daemon asks before it starts
        any app, so that a refused daemon has started nothing."""
        await self._clear_dead_master()
        self._refuse_leftover()
        self._refuse_held_listen()

    async def start(self, port: int) -> dict[str, Any]:
        """Write the config for `port`, test it, start nginx, wait until it accepts connections. A
        hold server's port another process took meanwhile is changed for a free one, once."""
        try:
            return await self._start(port)
        except NginxError as e:
            if not self.hold_port or f"bind() to {HOLD}:{self.hold_port} failed" not in e.message:
                raise
            log.warning("the hold server's port %d is taken: starting nginx on another one", self.hold_port)
            self.hold_port = free_loopback_port()
            return await self._start(port)

    async def _start(self, port: int) -> dict[str, Any]:
        await self.refuse_what_blocks_a_start()
        self._remove_stale_control_socket()
        for kind in TEMP_KINDS:
            (self.prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
        atomic_write(self.conf_path, self._conf())
        if self.hold_port and sockets.listening(self.hold_port):  # taken meanwhile (nginx is not running)
            self.hold_port = free_loopback_port()
        upstream = (self.runtime_part() if self.runtime else upstream_text(self.config, port))
        try:
            atomic_write(self.upstream_path, upstream.encode())
        except OSError as e:
            raise NginxError(f"cannot write {self.upstream_path}: {e.strerror} (check free disk space and permissions)",
                             code="upstream_write_failed") from e
        atomic_write(self.route_path, f"{port}\n".encode())
        self.prefix.chmod(0o700)  # the control socket inside is for the daemon's user only
        await run_command(self.test_argv(), "nginx -t", "nginx_test_failed")
        offset = self.log.offset()
        path = self.config.daemon.state_dir / "logs" / "nginx.log"  # every log 0640, as the apps' logs
        log = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640), "ab", buffering=0)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.base_argv(), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self.proc.pid
        self.create_time = procs.create_time(self.pid)
        deadline = time.monotonic() + self.n.reload_timeout
        while True:
            if self.proc.returncode is not None:
                errors = self.log.since(offset)
                raise NginxError(
                    f"the managed nginx exited at start ({self.proc.returncode}): "
                    + " | ".join(errors or ["see " + str(self.log.path)]),
                    code="nginx_down",
                    nginx=errors,
                )
            if workers(self.proc.pid) and _accepts(self.n.listen):
                if self.runtime and self.control_path.exists():
                    self.control_path.chmod(0o600)
                return {"pid": self.proc.pid, "listen": self.n.listen}
            if time.monotonic() > deadline:
                await self.stop(1.0)
                raise NginxError(f"the managed nginx did not accept on {self.n.listen} within "
                                 f"{self.n.reload_timeout:g}s; see {self.log.path}", code="nginx_down")
            await asyncio.sleep(0.01)

    def runtime_part(self) -> str:
        """The runtime switch's part, as this nginx includes it."""
        return runtime_part(self.config, self.route_path, self.control_path, preload=False, hold_port=self.hold_port)

    def _remove_stale_control_socket(self) -> None:
        """A killed master leaves its Unix socket file (nginx removes it only on a clean exit),
        and a new master cannot bind over it. One nobody answers on is stale."""
        sockets.remove_stale_sockets([self.control_path])

    def _refuse_held_listen(self) -> None:
        port = int(self.n.listen.rsplit(":", 1)[-1])
        if not sockets.listening(port):
            return
        owner = _other_daemons_nginx(sockets.listening_pids(port))
        if owner is not None:
            master, state_dir = owner
            raise PortInUse(f"nginx.listen {self.n.listen} is already served by the managed nginx (master pid "
                            f"{master}) of another bluegreen daemon, the one with daemon.state_dir {state_dir}: "
                            "give this config its own nginx.listen, or stop that daemon (bluegreen quit -c ITS "
                            "CONFIG)", port=port)
        raise PortInUse(f"nginx.listen {self.n.listen} is already in use by {sockets.port_holder(port)}; "
                        "stop that process or change nginx.listen", port=port)

    def _refuse_leftover(self) -> None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            proc = psutil.Process(pid)
            if "nginx" in proc.name() and procs.alive(pid):
                raise NginxError(
                    f"an nginx master (pid {pid}) from an earlier run still uses {self.prefix}; stop it "
                    f"(kill -QUIT {pid}) and start the daemon again",
                    code="nginx_leftover",
                )
        except psutil.Error:
            return

    async def stop(self, timeout: float) -> str:
        """Graceful stop (SIGQUIT: finish in-flight requests), then SIGKILL the group."""
        if not self.alive():
            return "not running"
        assert self.pid is not None
        procs.killpg(self.pid, signal.SIGQUIT)
        how = "stopped gracefully" if await self._wait_exit(timeout) else f"killed after {timeout:g}s"
        for group in (self.pid, *self.orphans):  # no worker, old or new, survives it
            procs.killpg(group, signal.SIGKILL)
        self.orphans.clear()
        await self._wait_exit(10)
        return how

    async def _clear_dead_master(self) -> None:
        """A master killed with SIGKILL leaves its workers running, holding the listen socket.
        SIGQUIT makes them close it at once and finish their in-flight requests (bounded by
        worker_shutdown_timeout): the new master binds as soon as the socket is closed,
        without waiting for those requests."""
        if self.pid is None or self.alive():
            return
        old = self.pid
        procs.killpg(old, signal.SIGQUIT)
        port = int(self.n.listen.rsplit(":", 1)[-1])
        deadline = time.monotonic() + 5.0
        while procs.group_alive(old) and sockets.listening(port) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if procs.group_alive(old):
            self.orphans.append(old)
        self.orphans = [g for g in self.orphans if procs.group_alive(g)]
        self.pid = None



def _accepts(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _other_daemons_nginx(holders: set[int]) -> tuple[int, Path] | None:
    """If a port's holders are a managed nginx (a worker or its master, started with `-p
    STATE_DIR/nginx/`), its master's pid and that state_dir: the message then names the other
    bluegreen daemon, not a worker that its master would only fork again."""
    for pid in holders:
        try:
            proc = psutil.Process(pid)
            master = proc.parent() if "worker process" in (procs.title(pid) or "") else proc
            argv = master.cmdline() if master is not None else []
        except psutil.Error:
            continue
        if "-p" in argv and argv.index("-p") + 1 < len(argv):
            prefix = Path(argv[argv.index("-p") + 1])
            if prefix.name == "nginx" and (prefix.parent / "daemon.lock").exists():
                return master.pid, prefix.parent
    return None
