"""Readiness: is the standby really serving? An HTTP check (2xx) or a TCP connect.

The probe races the process: if the app exits while we poll, we fail at once with its
exit status instead of waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import httpx

from .config import ReadyConfig
from .errors import AppError
from .slots import AppProcess, describe_exit, exit_hint, log_tail

ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True)
class ReadyResult:
    checks: int
    seconds: float
    target: str
    log_line: str | None = None


async def _http_ok(client: httpx.AsyncClient, url: str, body: str | None) -> tuple[bool, str]:
    try:
        r = await client.get(url)
    except httpx.HTTPError as e:
        return False, type(e).__name__
    if not 200 <= r.status_code < 300:
        return False, f"HTTP {r.status_code}"
    if body is not None and body not in r.text:
        return False, f"HTTP {r.status_code} without {body!r} in the body"
    return True, f"HTTP {r.status_code}"


async def _tcp_ok(port: int) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), ATTEMPT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        return False, type(e).__name__
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True, "connected"


class LogWatch:
    """Finds a regex in the lines an app wrote to its log since it started (read incrementally)."""

    def __init__(self, path: Path, offset: int, pattern: re.Pattern[str]) -> None:
        self.path, self.offset, self.pattern = path, offset, pattern
        self.pending = ""
        self.matched: str | None = None

    async def check(self) -> bool:
        if self.matched is None:
            try:
                async with aiofiles.open(self.path, "rb") as f:
                    await f.seek(self.offset)
                    data = await f.read()
            except OSError:
                return False
            self.offset += len(data)
            lines = (self.pending + data.decode("utf-8", "replace")).split("\n")
            self.pending = lines.pop()[-4096:]  # an unfinished line is kept for the next read
            self.matched = next((ln for ln in lines if self.pattern.search(ln)), None)
        return self.matched is not None


async def wait_ready(app: AppProcess, ready: ReadyConfig, url: str | None) -> ReadyResult:
    """Poll until the checks pass; raise AppError if the app exits or the timeout passes.

    Ready means: the log pattern (if any) was seen, then the HTTP check (2xx, and the body
    string if any) or the TCP check passed `ready.passes` times in a row.
    """
    began = time.monotonic()
    deadline = began + ready.timeout
    target = url or f"tcp://127.0.0.1:{app.port}"
    watch = LogWatch(app.log_path, app.log_offset, ready.log) if ready.log else None
    checks = streak = 0
    last = "no check ran"
    timeout = httpx.Timeout(min(ATTEMPT_TIMEOUT, ready.timeout))
    # trust_env=False: an HTTP_PROXY in the environment must never see loopback checks.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        exited = asyncio.ensure_future(app.wait())
        try:
            while True:
                if exited.done():
                    raise await _exited_error(app)
                if watch is not None and not await watch.check():
                    last = f"no log line matching {watch.pattern.pattern!r} yet"
                    streak = 0
                else:
                    checks += 1
                    ok, last = await (_http_ok(client, url, ready.body) if url else _tcp_ok(app.port))
                    streak = streak + 1 if ok else 0
                    if streak >= ready.passes:
                        return ReadyResult(checks, round(time.monotonic() - began, 4), target,
                                           watch.matched.strip() if watch and watch.matched else None)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = await log_tail(app.log_path)
                    raise AppError(
                        f"the {app.slot} slot ({app.build}) was not ready after {ready.timeout:g}s: "
                        f"{target}: {last} (after {checks} checks). Check that the app listens on "
                        f"port {app.port} (it gets it via app.env/app.command placeholders), or raise "
                        f"app.ready.timeout. Last log lines ({app.log_path}):\n" + "\n".join(tail),
                        code="not_ready",
                        log=tail,
                    )
                await asyncio.wait({exited}, timeout=min(ready.interval, remaining))
        finally:
            exited.cancel()


async def _exited_error(app: AppProcess) -> AppError:
    status = describe_exit(app.returncode)
    tail = await log_tail(app.log_path)
    return AppError(
        f"the {app.slot} slot ({app.build}) {status} before it was ready.{exit_hint(app.returncode)} "
        f"Last log lines ({app.log_path}):\n" + "\n".join(tail),
        code="app_exited",
        exit=status,
        log=tail,
    )


async def alive(url: str, timeout: float) -> tuple[bool, str]:
    """One liveness check of a running app: 2xx within `timeout` (a hung process never answers)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False) as client:
        return await _http_ok(client, url, None)
