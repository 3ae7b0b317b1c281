"""Readiness: is the standby really serving? An HTTP check (2xx) or a TCP connect.

The probe races the process: if the app exits while we poll, we fail at once with its
exit status instead of waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from .config import ReadyConfig
from .errors import AppError
from .slots import AppProcess, describe_exit, log_tail

ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True)
class ReadyResult:
    checks: int
    seconds: float
    target: str


async def _http_ok(client: httpx.AsyncClient, url: str) -> tuple[bool, str]:
    try:
        r = await client.get(url)
    except httpx.HTTPError as e:
        return False, type(e).__name__
    return 200 <= r.status_code < 300, f"HTTP {r.status_code}"


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


async def wait_ready(app: AppProcess, ready: ReadyConfig, url: str | None) -> ReadyResult:
    """Poll until the check passes; raise AppError if the app exits or the timeout passes."""
    began = time.monotonic()
    deadline = began + ready.timeout
    target = url or f"tcp://127.0.0.1:{app.port}"
    checks = 0
    last = "no check ran"
    timeout = httpx.Timeout(min(ATTEMPT_TIMEOUT, ready.timeout))
    # trust_env=False: an HTTP_PROXY in the environment must never see loopback checks.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        exited = asyncio.ensure_future(app.wait())
        try:
            while True:
                if exited.done():
                    raise await _exited_error(app)
                checks += 1
                check = _http_ok(client, url) if url else _tcp_ok(app.port)
                ok, last = await check
                if ok:
                    return ReadyResult(checks, round(time.monotonic() - began, 4), target)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = await log_tail(app.log_path)
                    raise AppError(
                        f"the {app.slot} slot ({app.build}) was not ready after {ready.timeout:g}s: "
                        f"{target} last answered {last} after {checks} checks. Check that the app listens on "
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
        f"the {app.slot} slot ({app.build}) {status} before it was ready. "
        f"Last log lines ({app.log_path}):\n" + "\n".join(tail),
        code="app_exited",
        exit=status,
        log=tail,
    )
