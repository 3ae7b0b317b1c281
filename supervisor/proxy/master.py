"""An nginx master seen from outside: its workers (by title), its error log, the commands that
test and reload it, and the Master interface the managed nginx and the user's nginx share."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Protocol

from ..errors import NginxError
from ..processes import procs
from ..aio import within

PLAIN_WORKER = "nginx: worker process"
LOG_TAIL = 65536


def workers(master: int) -> dict[int, str]:
    """The master's worker processes, pid -> title (cache manager/loader ignored)."""
    return {pid: name for pid in procs.children(master) if (name := worker_title(pid))}


def processes(master: "Master") -> set[int]:
    """nginx's master and its children (none if it is down)."""
    try:
        pid = master.master_pid()
    except NginxError:
        return set()
    return {pid, *procs.children(pid)}


def worker_title(pid: int) -> str | None:
    """The title of nginx worker `pid`, serving or shutting down after a reload (it still serves
    its requests then); None if `pid` is gone or no worker (a cache manager, a loader)."""
    name = procs.title(pid)
    return name if name is not None and name.startswith(PLAIN_WORKER) else None


def _error_lines(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    important = [ln for ln in lines if any(f"[{lvl}]" in ln for lvl in ("emerg", "alert", "crit"))]
    return important or [ln for ln in lines if "test is successful" not in ln and "syntax is ok" not in ln]


COMMAND_TIMEOUT = 30.0  # seconds `nginx -t` or a reload command may take (a hung sudo, a stuck NFS include)


async def run_command(argv: list[str], what: str, code: str, timeout: float = COMMAND_TIMEOUT) -> None:
    """Run an nginx command in its own process group; one that does not finish in `timeout` is
    killed with its children and reported, so that no swap waits on it for ever."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
    except OSError as e:
        raise NginxError(f"{what}: cannot run {argv[0]!r}: {e.strerror}", code=code) from e
    try:
        out, _ = await within(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        procs.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise NginxError(f"{what} did not finish within {timeout:g}s ({' '.join(argv)}): killed; nothing was "
                         "reloaded by it. Check that the command runs by hand without waiting for input",
                         code=code, command=argv) from None
    if proc.returncode != 0:
        lines = _error_lines(out.decode("utf-8", "replace"))
        raise NginxError(
            f"{what} failed (exit {proc.returncode}): " + " | ".join(lines or ["(no output)"]),
            code=code,
            nginx=lines,
            command=argv,
        )



class ErrorLog:
    """nginx's error log, read from an offset (what a reload just said) or from its tail."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size if self.path else 0
        except OSError:
            return 0

    def since(self, offset: int) -> list[str]:
        """The emerg/alert/crit lines written since `offset` (at most 64 KiB of them)."""
        if not self.path:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)  # 0: rotated meanwhile
                text = f.read(LOG_TAIL).decode("utf-8", "replace")
        except OSError:
            return []
        return [ln for ln in _error_lines(text) if any(f"[{lvl}]" in ln for lvl in ("emerg", "alert", "crit"))]

    def tail(self, lines: int = 3) -> list[str]:
        """The latest such lines (from the last 64 KiB: older lines are stale)."""
        return self.since(max(0, self.offset() - LOG_TAIL))[-lines:]


class Master(Protocol):
    """The nginx master a switch reloads: how to test its config, find it, and signal it."""

    upstream_path: Path
    log: ErrorLog

    def test_argv(self) -> list[str]: ...
    def master_pid(self) -> int: ...
    async def send_reload(self, master: int) -> None: ...
