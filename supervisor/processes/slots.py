"""App processes: the only module that creates or stops them.

Each app runs in its own session (so its own process group), with stdout and stderr piped
through a log pump into `state_dir/logs/<slot>.log` (rotated by size: logpump.py), and carries
BLUEGREEN_STATE_DIR and BLUEGREEN_SLOT in its environment, which every descendant inherits. Stopping signals the whole group and
every marked process of the slot (a start script may have exited and left its server running,
or the server may have left the group), waits, then SIGKILLs what is left: no orphan outlives
its slot. Knows nothing about HTTP or nginx.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import aiofiles.os
import psutil

from ..config.schema import LogsConfig, expand, render_tokens
from ..errors import AppError
from ..fsutil import atomic_write
from ..state import SlotState
from . import procs, sockets
from .logs import QUOTE_TOTAL, Ident, last_lines, quoted
from ..aio import within

PUMP = Path(__file__).with_name("logpump.py")


@dataclass
class AppProcess:
    slot: str
    port: int
    build: Path
    pid: int
    create_time: float
    log_path: Path
    log_offset: int = 0  # where this start's output begins in the (shared, appended) slot log...
    log_origin: Ident | None = None  # ...of that file (it may be rotated to <slot>.log.1 since)
    started_at: float = field(default_factory=time.time)
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    pump: asyncio.subprocess.Process | None = field(default=None, repr=False)  # its log pump, if we started it
    exit_reason: str | None = None
    state_dir: Path | None = None  # whose markers its descendants carry (None: unknown)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return procs.alive(self.pid, self.create_time)

    async def output_written(self, timeout: float = 1.0) -> None:
        """Once the app exited: wait (briefly) until its pump wrote its last lines to the log."""
        if self.pump is not None:
            try:
                await within(self.pump.wait(), timeout)
            except asyncio.TimeoutError:
                pass  # a descendant still holds its output; what is written so far will do

    async def wait(self) -> int | None:
        if self.proc is not None:
            return await self.proc.wait()
        while self.alive():
            await asyncio.sleep(0.05)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "port": self.port,
            "pid": self.pid,
            "build": str(self.build),
            "since": self.started_at,
            "alive": self.alive(),
            "log": str(self.log_path),
        }


def adopt(slot: str, port: int, build: Path, pid: int, create_time: float, since: float,
          log_path: Path, state_dir: Path | None = None) -> AppProcess | None:
    """Take over an app a previous daemon started, if it is still that same process."""
    if not procs.alive(pid, create_time):
        return None
    return AppProcess(slot, port, build, pid, create_time, log_path, started_at=since, state_dir=state_dir)


def adopt_state(saved: SlotState, state_dir: Path) -> AppProcess | None:
    """Take over a process saved in state.json, if it is still that same process."""
    return adopt(saved.slot, saved.port, Path(saved.build), saved.pid, saved.create_time, saved.since,
                 state_dir / "logs" / f"{saved.slot}.log", state_dir)


def marked(state_dir: Path | str, slot: str | None = None, key: str = "BLUEGREEN_STATE_DIR") -> list[psutil.Process]:
    """Live processes started for `state_dir` (and `slot`), found by the markers in their environment
    (`key`: apps carry BLUEGREEN_STATE_DIR, hooks BLUEGREEN_HOOK_STATE_DIR, a hook run's processes
    BLUEGREEN_HOOK_RUN with its id)."""
    marker = f"{key}={state_dir}\0".encode()
    slot_marker = f"BLUEGREEN_SLOT={slot}\0".encode() if slot else b""
    found = []
    for pid in procs.pids():
        env = procs.environ(pid)
        if env is None or b"\0" + marker not in env or b"\0" + slot_marker not in env:
            continue
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def holders(app: AppProcess) -> set[int]:
    """The processes that may hold `app`'s connections: its listener's, and every process its
    slot's markers name (a cluster's workers serve connections they never listened for)."""
    pids = sockets.listening_pids(app.port)
    if app.state_dir is not None:
        pids |= {p.pid for p in marked(app.state_dir, app.slot)}
    pids.discard(os.getpid())  # the daemon's own copy of the listener (processes/catcher.py) serves nothing
    return pids


def find_ours(state_dir: Path, slot: str, log_path: Path) -> list[AppProcess]:
    """Session leaders this state dir started for `slot` (marked by the environment they inherit)."""
    found = []
    for p in marked(state_dir, slot):
        try:
            if os.getsid(p.pid) == p.pid:
                found.append(AppProcess(slot, 0, Path("?"), p.pid, p.create_time(), log_path, state_dir=state_dir))
        except (OSError, psutil.Error):
            continue
    return found


async def clear_leftovers(state_dir: Path, pids: set[int], sig: signal.Signals, timeout: float) -> list[str]:
    """Stop those of `pids` that this state dir started (a slot's leftover holding its port);
    return what was stopped. Processes without our markers are never touched."""
    ours = {p.pid: p for p in marked(state_dir)}
    stopped = []
    for pid in sorted(pids & ours.keys()):
        p = ours[pid]
        try:
            slot = p.environ().get("BLUEGREEN_SLOT", "?")
            leftover = AppProcess(slot, 0, Path("?"), pid, p.create_time(), Path("/dev/null"), state_dir=state_dir)
        except psutil.Error:
            continue
        result = await stop(leftover, sig, timeout)
        stopped.append(f"pid {pid} ({slot} slot): {result['how']}")
    return stopped


def describe_exit(returncode: int | None, *, we_killed: bool = False) -> str:
    if returncode is None:
        return "exited (status unknown: not our child)"
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        # Shells and the JVM exit 128+N when signal N ended them (143 = a clean JVM exit on SIGTERM).
        return f"exited with code {returncode} (128+{signal.Signals(returncode - 128).name})"
    if returncode >= 0:
        return f"exited with code {returncode}"
    sig = signal.Signals(-returncode)
    hint = " (perhaps out of memory?)" if sig == signal.SIGKILL and not we_killed else ""
    return f"killed by {sig.name}{hint}"


BACKGROUND_HINT = (
    "A main process that exits with code 0 usually put the server in the background (`node server.js &`, "
    "`catalina.sh start`, a daemonizing start script) and returned. bluegreen must run the server in the "
    "foreground: `exec node server.js` in a start script, `catalina.sh run`, or the server's no-daemon flag."
)


def exit_hint(returncode: int | None) -> str:
    """What to do about an app's main process exiting on its own (only code 0 has a likely cause)."""
    return f" {BACKGROUND_HINT}" if returncode == 0 else ""


async def spawn(
    argv: list[str], cwd: Path, env: Mapping[str, str], *, slot: str, port: int, build: Path, log_path: Path,
    logs: LogsConfig = LogsConfig(),
) -> AppProcess:
    """Start the app in a new session, its output piped through a log pump into `log_path`;
    raise AppError(start_failed) if it cannot be executed."""
    offset, origin = _log_header(log_path, f"starting {build} on {slot} (port {port}): {argv}")
    read_end, write_end = os.pipe()
    try:
        pump = await _start_pump(read_end, log_path, logs)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env={**os.environ, **env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_end,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            missing = cwd if not cwd.is_dir() else argv[0]
            raise AppError(
                f"cannot start the app: {missing} does not exist (check app.command and app.cwd)",
                code="start_failed",
            ) from e
        except PermissionError as e:
            raise AppError(
                f"cannot start the app: permission denied running {argv[0]!r} in {cwd}", code="start_failed"
            ) from e
    finally:
        os.close(write_end)  # the app and the pump hold what they need; the pump sees EOF when the app is gone
    created = procs.create_time(proc.pid)
    marker = env.get("BLUEGREEN_STATE_DIR")
    return AppProcess(slot, port, build, proc.pid, created, log_path, log_offset=offset, log_origin=origin,
                      proc=proc, pump=pump, state_dir=Path(marker) if marker else None)


def _log_header(log_path: Path, what: str) -> tuple[int, Ident | None]:
    """Append the "--- bluegreen ... starting" line; return where this start's output begins."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        log_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        log = open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640), "ab", buffering=0)
    except OSError as e:
        raise AppError(f"cannot start the app: cannot open its log {log_path}: {e.strerror} (check permissions)",
                       code="start_failed") from e
    with log:
        try:
            log.write(f"--- bluegreen {stamp}: {what}\n".encode())
            st = os.fstat(log.fileno())
        except OSError as e:
            raise AppError(f"cannot start the app: cannot write its log {log_path}: {e.strerror} (check free disk "
                           "space and permissions)", code="start_failed") from e
    return st.st_size, (st.st_dev, st.st_ino)


async def _start_pump(read_end: int, log_path: Path, logs: LogsConfig) -> asyncio.subprocess.Process:
    """The pump is our child (reaped by asyncio), in its own session: a stop or a Ctrl-C aimed at
    the app never reaches it. It owns the pipe's read end from here on."""
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", str(PUMP), str(log_path), str(logs.max_bytes), str(logs.backups),
            stdin=read_end, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={"BLUEGREEN_LOG_PUMP": str(log_path)}, start_new_session=True,
        )
    except OSError as e:
        raise AppError(f"cannot start the app: cannot start its log pump ({e.strerror})", code="start_failed") from e
    finally:
        os.close(read_end)


def lay_out(slot_dir: Path, dirs: tuple[str, ...], files: Mapping[str, Path], context: Mapping[str, str]) -> None:
    """Create the slot's directories and render its files (before every start), so each slot has its
    own copy, e.g. a per-slot CATALINA_BASE. Relative destinations are relative to the slot dir."""
    try:
        for d in dirs:
            (slot_dir / expand(d, context)).mkdir(parents=True, exist_ok=True)
        for dest, src in files.items():
            target = slot_dir / expand(dest, context)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, render_tokens(src.read_text(encoding="utf-8"), context).encode(), mode=0o644)
    except OSError as e:
        raise AppError(f"cannot lay out the slot directory {slot_dir}: {e} (check app.dirs and app.files)",
                       code="start_failed") from e


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


async def _gone(watched: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Poll (without reaping: they are not our children) until all exit or the deadline; return survivors."""
    alive = [p for p in watched if procs.running(p)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = [p for p in alive if procs.running(p)]
    return alive


def _leftovers(app: AppProcess) -> list[psutil.Process]:
    """What belongs to the app besides its main process: its descendants, and every process
    still carrying its slot's markers (in its group, or escaped from it with setsid)."""
    found = {p.pid: p for p in _tree(app.pid)} if app.alive() else {}
    if app.state_dir is not None:
        for p in marked(app.state_dir, app.slot):
            if p.pid != app.pid:
                found.setdefault(p.pid, p)
    return list(found.values())


async def stop(proc: AppProcess, sig: signal.Signals, timeout: float) -> dict[str, Any]:
    """Signal the app's group and its slot's marked processes, wait up to `timeout`, then
    SIGKILL whatever is left. Return how it ended."""
    began = time.monotonic()
    leader_alive = proc.alive()
    tree = _leftovers(proc)  # collect now: once the leader dies its children are reparented
    if not leader_alive and not tree:
        # No killpg here: a group whose leader died long ago may be someone else's by now (its id
        # is a pid, and pids are reused); what is still ours carries our markers, and none does.
        proc.exit_reason = proc.exit_reason or describe_exit(proc.returncode)
        return {"pid": proc.pid, "how": f"already gone: {proc.exit_reason}", "seconds": 0.0}
    if leader_alive:  # its group id cannot be anyone else's while it runs
        procs.killpg(proc.pid, sig)
    for p in tree:
        procs.send(p, sig)
    deadline = began + timeout
    leader_done = await _wait_leader(proc, deadline)
    survivors = await _gone(tree, deadline)
    killed = not leader_done or bool(survivors)
    if killed:
        if leader_alive:
            procs.killpg(proc.pid, signal.SIGKILL)
        for p in survivors:
            procs.send(p, signal.SIGKILL)
        await _wait_leader(proc, time.monotonic() + 10)
        await _gone(survivors, time.monotonic() + 10)
    # Anything left in the group (a grandchild that outlived its parent) goes too: the group is
    # still ours, its leader ran a moment ago (a dead leader's group: only marked processes above).
    if leader_alive:
        procs.killpg(proc.pid, signal.SIGKILL)
    exit_text = describe_exit(proc.returncode, we_killed=True)
    if not leader_alive:
        gone = proc.exit_reason or describe_exit(proc.returncode)
        how = f"already gone ({gone}); stopped {len(tree)} process(es) it left running"
        if killed:
            how += f" (killed with SIGKILL after {timeout:g}s)"
    elif killed:
        what = "did not exit" if not leader_done else f"left {len(survivors)} child process(es) running"
        how = f"{what} within {timeout:g}s of {sig.name}: killed with SIGKILL ({exit_text})"
    else:
        how = f"{exit_text} after {sig.name}"
    proc.exit_reason = how
    return {"pid": proc.pid, "how": how, "killed": killed, "seconds": round(time.monotonic() - began, 4)}


async def _wait_leader(app: AppProcess, deadline: float) -> bool:
    try:
        await within(app.wait(), max(0.0, deadline - time.monotonic()))
        return True
    except asyncio.TimeoutError:
        return False


async def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of this start's output in its slot's log (across its latest
    rotation; never the previous process's, before this start's `--- bluegreen ... starting`
    line), read without blocking the loop, bounded for quoting in an error (logs.quoted: 4 KiB in all)."""
    tail = await _last_lines(path, lines + 1, None, 4 * QUOTE_TOTAL)
    starts = [i for i, line in enumerate(tail) if line.startswith("--- bluegreen ") and ": starting " in line]
    return quoted(tail[starts[-1] + 1:] if starts else tail[-lines:])


_last_lines = aiofiles.os.wrap(last_lines)  # run in the loop's executor


def slot_state(app: AppProcess) -> SlotState:
    """What state.json keeps of a running app: enough for the next daemon to adopt it."""
    return SlotState(app.slot, app.port, str(app.build), app.pid, app.create_time, app.started_at)
