"""Prometheus metrics (text format 0.0.4) on `daemon.metrics_listen`, off by default.

What a dashboard or an alert needs from a release tool: swaps by reason and outcome, how long
each phase took (a histogram), crash restarts, the build that serves (an info metric), the
daemon's status, and nginx's per-slot requests, 5xx answers, upstream errors (runtime switch:
counted inside nginx) and in-flight requests (both switches). Counters start at 0 with the
daemon, as Prometheus expects of a restarted process; nginx's start with its master.

The endpoint is a few lines of asyncio, not an HTTP framework: one GET, one answer, close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from . import drain
from .config import SLOTS
from .errors import BluegreenError, PortInUse
from .runtime_switch import RuntimeSwitch
from .state import DaemonStatus

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class Recorder:
    """What the daemon counts for the metrics, fed from the end of every swap."""

    def __init__(self, started_at: float) -> None:
        self.swaps: Counter[tuple[str, str]] = Counter()  # (reason, outcome)
        self.phases: dict[str, Histogram] = {}
        self.crash_restarts = 0
        self.started_at = started_at  # the daemon's

    def swap_ended(self, record: dict[str, Any]) -> None:
        reason, outcome = record["reason"], record["outcome"]
        self.swaps[(reason, outcome)] += 1
        if reason == "recover":
            self.crash_restarts += 1
        for phase, seconds in (record.get("durations") or {}).items():
            self.phases.setdefault(phase, Histogram()).observe(seconds)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}" if labels else ""


class Exposition:
    """The text format: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: Any) -> None:
        text = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{_labels(**labels)} {text}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def render(app: App, rec: Recorder) -> str:
    """The current metrics, as the text /metrics answers."""
    out = Exposition()
    out.family("bluegreen_up", "gauge", "1 while the bluegreen daemon runs.")
    out.sample("bluegreen_up", 1)
    out.family("bluegreen_daemon_status", "gauge", "The daemon's status: 1 for the current one (failed: it gave "
               "up restarting a crashing app).")
    for status in DaemonStatus:
        out.sample("bluegreen_daemon_status", int(app.status == status), status=status.value)
    out.family("bluegreen_daemon_start_time_seconds", "gauge", "When the daemon started (Unix time).")
    out.sample("bluegreen_daemon_start_time_seconds", round(rec.started_at, 3))
    out.family("bluegreen_swaps_total", "counter", "Swaps that ended, by reason (swap, rollback, restart, recover) "
               "and outcome (done, failed).")
    for (reason, outcome), n in sorted(rec.swaps.items()):
        out.sample("bluegreen_swaps_total", n, reason=reason, outcome=outcome)
    out.family("bluegreen_swap_in_progress", "gauge", "1 while a swap runs, labelled with its phase.")
    swap = app.swap if app.swapping() else None
    out.sample("bluegreen_swap_in_progress", int(swap is not None),
               **({"phase": swap.phase or "", "reason": swap.reason} if swap is not None else {}))
    out.family("bluegreen_swap_phase_duration_seconds", "histogram", "How long each swap phase took.")
    for phase, h in sorted(rec.phases.items()):
        for bound, n in zip(BUCKETS, h.counts):
            out.sample("bluegreen_swap_phase_duration_seconds_bucket", n, phase=phase, le=repr(bound))
        out.sample("bluegreen_swap_phase_duration_seconds_bucket", h.count, phase=phase, le="+Inf")
        out.sample("bluegreen_swap_phase_duration_seconds_sum", round(h.sum, 6), phase=phase)
        out.sample("bluegreen_swap_phase_duration_seconds_count", h.count, phase=phase)
    out.family("bluegreen_crash_restarts_total", "counter", "Restarts of a crashed or hung active app.")
    out.sample("bluegreen_crash_restarts_total", rec.crash_restarts)
    out.family("bluegreen_active_build_info", "gauge", "The build that serves: always 1, the build in the labels.")
    if app.active is not None:
        out.sample("bluegreen_active_build_info", 1, slot=app.active.slot, port=app.active.port,
                   build=app.active.build, build_name=app.active.build.name, pid=app.active.pid)
    await _nginx(app, out)
    return out.text()


async def _nginx(app: App, out: Exposition) -> None:
    ports = {slot: app.config.app.port(slot) for slot in SLOTS}
    try:
        app.master.master_pid()
        up = True
    except BluegreenError:
        up = False
    out.family("bluegreen_nginx_up", "gauge", "1 while the nginx master that routes the traffic runs.")
    out.sample("bluegreen_nginx_up", int(up))
    runtime = app.proxy if isinstance(app.proxy, RuntimeSwitch) else None
    stats = None
    if up and runtime is not None:
        try:
            stats = await runtime.stats(0)
        except BluegreenError:
            pass
    if stats is not None:
        for name, attr, what in (("requests", "requests", "Requests nginx sent to the slot's port"),
                                 ("responses_5xx", "http_5xx", "5xx answers the slot's app gave"),
                                 ("upstream_errors", "upstream_errors", "Requests the slot's app never answered "
                                  "(refused, reset, timed out)")):
            family = f"bluegreen_nginx_{name}_total"
            out.family(family, "counter", f"{what}, since the nginx master started (runtime switch only).")
            for slot, port in ports.items():
                c = stats.get(port)
                out.sample(family, getattr(c, attr) if c else 0, slot=slot, port=port)
    out.family("bluegreen_nginx_inflight", "gauge", "Requests in flight from nginx to the slot's port.")
    for slot, port in ports.items():
        n = 0
        if up:
            try:
                n = await runtime.inflight(port) if runtime is not None else drain.inflight(port)
            except (BluegreenError, OSError):
                n = 0
        out.sample("bluegreen_nginx_inflight", n, slot=slot, port=port)


class MetricsServer:
    """GET /metrics on daemon.metrics_listen."""

    def __init__(self, app: App, recorder: Recorder, address: tuple[str, int]) -> None:
        self.app, self.recorder, self.address = app, recorder, address
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = self.address
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        except OSError as e:
            where = f"{host}:{port}"
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"daemon.metrics_listen: {where} is already in use by {drain.port_holder(port)}; "
                                "choose another address, or stop that process", port=port) from None
            raise BluegreenError(f"daemon.metrics_listen: cannot listen on {where}: {e.strerror}; choose another "
                                 "address", code="config") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = (head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""])[:2]
            if method != "GET":
                status, body, kind = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif path.split("?")[0] == "/metrics":
                status, body, kind = "200 OK", await render(self.app, self.recorder), CONTENT_TYPE
            else:
                status, body, kind = "404 Not Found", "bluegreen metrics are at /metrics\n", "text/plain"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            await asyncio.wait_for(writer.drain(), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:  # a scrape must never take the daemon down
            log.exception("internal error serving /metrics")
        finally:
            writer.close()
