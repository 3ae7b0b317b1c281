"""Release hooks: the user's commands run at fixed points of a release (config [hooks]).

    before_switch   after ready, before the smoke checks and any traffic: the "expand" migration.
                    Failing or timing out aborts the swap; traffic never moved.
    after_switch    once the new build serves and the old one is drained (no request reaches it
                    any more), before the old one stops: the "contract" migration, a notification.
    after_failure   after a release failed and was cleaned up: a notification.

A hook is an argv (never a shell) with the app's placeholders ({port}, {build}, ... of the new
build), run in the new build's directory in its own process group, with BLUEGREEN_OLD_BUILD,
BLUEGREEN_NEW_BUILD, BLUEGREEN_OLD_PORT and BLUEGREEN_NEW_PORT in its environment. Each line it
prints goes to the daemon log and to the swap's client as an event; at hooks.timeout its whole
group is killed, and when it ends whatever it left running is stopped too, in its group or not
(a `setsid` helper: every process of the run carries BLUEGREEN_HOOK_RUN). A hook carries BLUEGREEN_HOOK_STATE_DIR, so that a daemon started after one was
killed finds a hook it left running (its swap is finished or undone without it) and stops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil

from ..config.host import interpreter_problem
from ..config.schema import expand
from ..errors import HookFailed
from ..processes import procs, slots
from ..aio import within

log = logging.getLogger("bluegreen")
MARKER = "BLUEGREEN_HOOK_STATE_DIR"
LINE_LIMIT = 1000  # characters of one output line kept (a hook printing a megabyte line cannot flood the client)
TAIL = 5  # last lines quoted in the error
OUTPUT_GRACE = 1.0  # seconds to read what a hook printed after it exited
SHOWN = 2000  # lines of a hook's output logged and streamed; the rest is counted
RUN_MARKER = "BLUEGREEN_HOOK_RUN"


async def run(name: str, argv: tuple[str, ...], context: Mapping[str, str], env: Mapping[str, str], cwd: Path,
              timeout: float, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run hook `name` to its end; its details, or HookFailed naming what went wrong and the fix."""
    args = [expand(a, context) for a in argv]
    run_id = secrets.token_hex(8)  # marks this run's processes, even those that leave its group (setsid)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=cwd if cwd.is_dir() else None,
            env={**os.environ, **env, "BLUEGREEN_HOOK": name, RUN_MARKER: run_id},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        why = "is not executable (chmod +x it)" if isinstance(e, PermissionError) else (e.strerror or str(e))
        bad = interpreter_problem(Path(args[0])) if isinstance(e, (FileNotFoundError, PermissionError)) else None
        if bad:
            why = bad
        raise HookFailed(f"hooks.{name}: cannot run {args[0]!r}: {why}", hook=name) from None
    began = time.monotonic()
    spawned: dict[int, float] = {}  # every descendant the hook was seen with: pid -> start time
    tail: list[str] = []

    shown = 0

    def line(text: str) -> None:
        """Each line to the log and the client, up to SHOWN of them (a hook printing a flood is
        not slowed to the pace of the daemon's log); the last ones are always kept for the error."""
        nonlocal shown
        text = text[:LINE_LIMIT]
        tail.append(text)
        del tail[:-TAIL]
        shown += 1
        if shown <= SHOWN:
            log.info("hook %s: %s", name, text)
            emit({"event": name, "status": "output", "line": text})

    def say(text: str) -> None:  # bluegreen's own word about the hook: always shown
        log.info("hook %s: %s", name, text)
        emit({"event": name, "status": "output", "line": text})

    def hidden() -> None:
        if shown > SHOWN:
            say(f"({shown - SHOWN} more line(s) of hooks.{name} not shown; its last: {' | '.join(tail)})")

    try:
        await within(_read_lines(proc, line, spawned), timeout)
    except asyncio.TimeoutError:
        await _kill_group(proc)
        raise HookFailed(f"hooks.{name} did not finish within hooks.timeout ({timeout:g}s) and was killed"
                         + _quoted(tail), hook=name) from None
    except BaseException:  # cancelled (bluegreen cancel, the daemon stopping): the hook goes too
        await _kill_group(proc)
        raise
    finally:
        hidden()
        _stop_escaped(name, run_id, say, spawned)
    if proc.returncode != 0:
        how = (f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode and proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise HookFailed(f"hooks.{name} ({args[0]}) {how}" + _quoted(tail), hook=name, exit=proc.returncode)
    return {"exit": 0, "seconds": round(time.monotonic() - began, 3), "lines": shown}


NOTE_EVERY = 0.02  # seconds between two looks at a running hook's descendants (a helper started and
# left in less time than this, with its environment cleared, can be missed: docs/failure-modes.md)


async def _read_lines(proc: asyncio.subprocess.Process, line: Callable[[str], None], spawned: dict[int, float]) -> None:
    """Every line the hook prints until it exits, then what is left for OUTPUT_GRACE: a helper it
    started and left running may hold its output open for ever (it is stopped after the hook).
    Meanwhile the hook's descendants are noted in `spawned` (what it leaves behind is stopped)."""
    reader = asyncio.ensure_future(_pump(proc, line))
    try:
        # (not proc.wait(): asyncio wakes it only once the output pipe closed too, which a helper
        # holding the pipe delays for ever; the exit status is set as soon as the hook exits)
        while proc.returncode is None and not reader.done():
            procs.note_descendants(proc.pid, spawned)
            await asyncio.wait({reader}, timeout=NOTE_EVERY)
        if proc.returncode is None:
            await proc.wait()  # the output closed: the hook is exiting
        await asyncio.wait({reader}, timeout=OUTPUT_GRACE)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def _stop_escaped(name: str, run_id: str, say: Callable[[str], None], spawned: dict[int, float]) -> None:
    """Kill what this hook run left running, its group's or not (a `setsid` helper, found by the
    run's marker; one that cleared its environment too, `env -i setsid`, found as the hook's
    descendant it was seen as, though an orphan now): a hook is a step of a release, and nothing
    of it outlives the step."""
    left = slots.marked(run_id, key=RUN_MARKER)
    left += [p for p in procs.still_running(spawned) if p.pid not in {q.pid for q in left}]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue
    if left:
        say(f"(bluegreen: hooks.{name} left {len(left)} process(es) running after it ended; stopped: "
             + ", ".join(f"pid {p.pid}" for p in left) + ")")
        log.warning("hooks.%s left process(es) running after it ended, stopped: %s", name,
                    ", ".join(str(p.pid) for p in left))


async def _pump(proc: asyncio.subprocess.Process, line: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    pending = b""
    while chunk := await proc.stdout.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line(raw.decode("utf-8", "replace").rstrip("\r"))
        if len(pending) > LINE_LIMIT * 4:  # no newline in sight: cut it here
            line(pending.decode("utf-8", "replace"))
            pending = b""
    if pending:
        line(pending.decode("utf-8", "replace"))


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the hook's whole group, then wait (at most 5 s) for the hook itself."""
    procs.killpg(proc.pid, signal.SIGKILL)
    try:
        await within(proc.wait(), 5)
    except asyncio.TimeoutError:
        pass


async def stop_leftovers(state_dir: Path, stopped: Callable[[str], None]) -> None:
    """Kill the process groups of hooks a killed daemon left running, saying each to `stopped`."""
    groups: dict[int, str] = {}
    for p in slots.marked(state_dir, key=MARKER):
        try:
            group = os.getpgid(p.pid)
            if group == p.pid:  # the hook itself (its children share its group)
                groups[group] = f"hooks.{p.environ().get('BLUEGREEN_HOOK', '?')} (pid {p.pid}: {' '.join(p.cmdline())})"
        except (OSError, psutil.Error):
            continue
    for group, what in groups.items():
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            continue
        log.error("%s was still running, left by a daemon that was killed; its swap was finished or undone "
                  "without it, so it was stopped: check what it had done", what)
        stopped(what)


def _quoted(tail: list[str]) -> str:
    return ("; its last output: " + " | ".join(tail)) if tail else "; it printed nothing"
