"""Readiness: is the standby really serving? An HTTP check (2xx) or a TCP connect. And the
smoke checks a release runs on the ready standby before anything routes to it.

The probe races the process: if the app exits while we poll, we fail at once with its
exit status instead of waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, Sequence

import aiofiles.os
import httpx

from ..config.schema import CheckConfig, ReadyConfig
from ..errors import AppError, ChecksFailed
from ..aio import within
from . import grpc_health, sockets
from .logs import Follower
from .slots import AppProcess, describe_exit, exit_hint, log_tail

ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True)
class ReadyResult:
    checks: int
    seconds: float
    target: str
    log_line: str | None = None


async def _http_ok(client: httpx.AsyncClient, url: str, body: str | None,
                   attempt: float = ATTEMPT_TIMEOUT) -> tuple[bool, str]:
    try:
        r = await client.get(url, timeout=attempt)
    except httpx.HTTPError as e:
        return False, type(e).__name__
    if not 200 <= r.status_code < 300:
        return False, f"HTTP {r.status_code}"
    if body is not None and body not in r.text:
        return False, f"HTTP {r.status_code} without {body!r} in the body"
    return True, f"HTTP {r.status_code}"


async def grpc_ok(port: int, service: str, attempt: float = ATTEMPT_TIMEOUT) -> tuple[bool, str]:
    """grpc.health.v1.Health/Check for `service`: ready when it answers SERVING."""
    try:
        answer = await grpc_health.check(port, service, attempt)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return False, type(e).__name__
    return answer == "SERVING", answer


async def tcp_ok(port: int, send: str | None = None, expect: str | None = None,
                 attempt: float = ATTEMPT_TIMEOUT) -> tuple[bool, str]:
    """A connect; with `send`, that request too, and with `expect`, a reply that contains it."""
    try:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", port), attempt)
    except (OSError, asyncio.TimeoutError) as e:
        return False, type(e).__name__
    try:
        if send is not None:
            return await within(_ask_tcp(reader, writer, send, expect), attempt)
    except (OSError, asyncio.TimeoutError) as e:
        return False, f"{type(e).__name__} after sending app.ready.send"
    finally:
        writer.close()
    return await _closed(writer)


async def _ask_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send: str,
                   expect: str | None) -> tuple[bool, str]:
    writer.write(send.encode())
    await writer.drain()
    want, got = (expect or "").encode(), b""
    while want not in got and len(got) < 65536:
        chunk = await reader.read(4096)
        if not chunk:
            return False, f"the connection closed after {got[:60]!r}" if got else "the connection closed unanswered"
        got += chunk
        if not want:
            break
    return (True, f"answered {got[:60]!r}") if want in got else (False, f"answered {got[:60]!r}")


async def _closed(writer: asyncio.StreamWriter) -> tuple[bool, str]:
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True, "connected"


class LogWatch:
    """Finds a regex in the lines an app wrote to its log since it started (read incrementally,
    across a rotation)."""

    def __init__(self, app: AppProcess, pattern: re.Pattern[str]) -> None:
        self.follower = Follower(app.log_path, app.log_offset, app.log_origin)
        self.pattern = pattern
        self.pending = ""
        self.matched: str | None = None

    async def check(self) -> bool:
        if self.matched is None:
            data = await _read(self.follower)
            lines = (self.pending + data.decode("utf-8", "replace")).split("\n")
            self.pending = lines.pop()[-4096:]  # an unfinished line is kept for the next read
            self.matched = next((ln for ln in lines if self.pattern.search(ln)), None)
            if self.matched is not None:
                self.follower.close()
        return self.matched is not None

    def close(self) -> None:
        self.follower.close()


_read = aiofiles.os.wrap(Follower.read)  # run in the loop's executor


async def wait_ready(app: AppProcess, ready: ReadyConfig, url: str | None) -> ReadyResult:
    """Poll until the checks pass; raise AppError if the app exits or the timeout passes.

    Ready means: the log pattern (if any) was seen, then the HTTP check (2xx, and the body
    string if any) or the TCP check passed `ready.passes` times in a row.
    """
    began = time.monotonic()
    deadline = began + ready.timeout
    grpc = ready.grpc_service
    target = (url or f"tcp://127.0.0.1:{app.port}" if grpc is None else
              f"grpc://127.0.0.1:{app.port} grpc.health.v1.Health/Check({grpc!r})")
    watch = LogWatch(app, ready.log) if ready.log else None
    checks = streak = 0
    last = "no check ran"
    timeout = httpx.Timeout(min(ATTEMPT_TIMEOUT, ready.timeout))
    # trust_env=False: an HTTP_PROXY in the environment must never see loopback checks.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, verify=_tls()) as client:
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
                    attempt = max(0.05, min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))  # never past the timeout
                    ok, last = await (grpc_ok(app.port, grpc, attempt) if grpc is not None else
                                      _http_ok(client, url, ready.body, attempt) if url else
                                      tcp_ok(app.port, ready.send, ready.expect, attempt))
                    streak = streak + 1 if ok else 0
                    if streak >= ready.passes:
                        return ReadyResult(checks, round(time.monotonic() - began, 4), target,
                                           watch.matched.strip() if watch and watch.matched else None)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = await log_tail(app.log_path)
                    raise AppError(
                        f"the {app.slot} slot ({app.build}) was not ready after {ready.timeout:g}s: "
                        f"{target}: {last} (after {checks} checks). {_where_it_listens(app.port)}"
                        f"Last log lines ({app.log_path}):\n" + "\n".join(tail),
                        code="not_ready",
                        log=tail,
                    )
                await asyncio.wait({exited}, timeout=min(ready.interval, remaining))
        finally:
            exited.cancel()
            if watch is not None:
                watch.close()


def _where_it_listens(port: int) -> str:
    """What to check when an app never answered on `port`: where it listens, if not where nginx connects."""
    addresses = sorted({c.local for c in sockets.listening(port)})
    if addresses and not set(addresses) & {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"}:
        return (f"The app listens on port {port} at {', '.join(addresses)} only, while nginx and this check connect "
                "to 127.0.0.1: make it listen on 127.0.0.1 (or on every address). ")
    return (f"Check that the app listens on 127.0.0.1 port {port} (it gets it via app.env/app.command "
            "placeholders), or raise app.ready.timeout. ")


async def _exited_error(app: AppProcess) -> AppError:
    status = describe_exit(app.returncode)
    await app.output_written()
    tail = await log_tail(app.log_path)
    return AppError(
        f"the {app.slot} slot ({app.build}) {status} before it was ready.{exit_hint(app.returncode)} "
        f"Last log lines ({app.log_path}):\n" + "\n".join(tail),
        code="app_exited",
        exit=status,
        log=tail,
    )


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every probe: httpx builds one per client (loading the CA bundle: 15 ms
    here), which a crash's switch to the spare would otherwise wait for."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


async def alive(url: str, timeout: float) -> tuple[bool, str]:
    """One liveness check of a running app: 2xx within `timeout` (a hung process never answers)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False, verify=_tls()) as client:
        return await _http_ok(client, url, None)


async def answers(port: int, ready: ReadyConfig, url: str | None,
                  timeout: float = ATTEMPT_TIMEOUT) -> tuple[bool, str]:
    """One readiness check, no wait, of an app about to take traffic at once (the warm build, the
    spare): its app.ready URL, else a connect (and app.ready.send/expect)."""
    return await (alive(url, timeout) if url else tcp_ok(port, ready.send, ready.expect, timeout))


async def run_checks(port: int, checks: Sequence[CheckConfig]) -> list[dict[str, Any]]:
    """Every smoke check against the app on `port` (not through nginx), in order; one result
    each: what it asked, what it got, and whether that was what it expected."""
    results = []
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=_tls()) as client:
        for check in checks:
            began = time.monotonic()
            result: dict[str, Any] = {"check": check.name, "expected": check.status}
            try:
                status, text = await within(_ask(client, port, check), check.timeout)
                result.update(status=status, got=_first(text))
                ok = status == check.status and (check.body is None or check.body in text)
                if status == check.status and not ok:
                    result["missing"] = check.body
            except (httpx.TimeoutException, asyncio.TimeoutError):
                result.update(status=None, got=f"no answer within {check.timeout:g}s")
                ok = False
            except httpx.HTTPError as e:
                result.update(status=None, got=f"{type(e).__name__}: {e}"[:120])
                ok = False
            result.update(ok=ok, ms=round((time.monotonic() - began) * 1000, 1))
            results.append(result)
    return results


CHECK_BODY_LIMIT = 65536  # a check reads this much of an answer at most (a huge page cannot fill the daemon)


async def _ask(client: httpx.AsyncClient, port: int, check: CheckConfig) -> tuple[int, str]:
    """One check's request; its status and the start of its body."""
    url = f"http://127.0.0.1:{port}{check.path}"
    async with client.stream(check.method, url, headers=dict(check.headers), timeout=check.timeout) as r:
        data = b""
        async for chunk in r.aiter_bytes():  # decoded (gzip), as a browser would read it
            data += chunk
            if len(data) >= CHECK_BODY_LIMIT:
                break
        return r.status_code, data[:CHECK_BODY_LIMIT].decode(r.encoding or "utf-8", "replace")


def _first(text: str, limit: int = 80) -> str:
    """The first bytes of an answer, on one line, for an error message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def checks_failed(results: list[dict[str, Any]]) -> ChecksFailed | None:
    """The error naming each failed check with what it got; None if all passed."""
    failed = [r for r in results if not r["ok"]]
    if not failed:
        return None
    parts = []
    for r in failed:
        got = f"HTTP {r['status']} {r['got']!r}" if r["status"] is not None else r["got"]
        want = f"HTTP {r['expected']}" + (f" containing {r['missing']!r}" if r.get("missing") else "")
        parts.append(f"{r['check']}: expected {want}, got {got}")
    return ChecksFailed(f"{len(failed)} of {len(results)} smoke check(s) failed on the standby, which was stopped; "
                        "traffic is unchanged: " + "; ".join(parts), results=results, traffic="unchanged")
