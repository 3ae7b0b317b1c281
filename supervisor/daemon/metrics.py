"""Prometheus metrics (text format 0.0.4, written by prometheus_client) on `daemon.metrics_listen`, off by default.

What a dashboard or an alert needs from a release tool: swaps by reason and outcome, how long
each phase took (a histogram), crash restarts, the build that serves (an info metric), the
daemon's status, and nginx's per-slot requests, 5xx answers, upstream errors (runtime switch:
counted inside nginx) and in-flight requests (both switches). Counters start at 0 with the
daemon, as Prometheus expects of a restarted process; nginx's start with its master.

prometheus_client writes the text format (a custom collector and generate_latest, as exporters
do); the endpoint is a few lines of asyncio, not an HTTP framework: one GET, one answer, close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ..config.schema import SLOTS
from ..errors import BluegreenError, PortInUse
from ..processes import sockets
from ..proxy.counters import Hold
from ..release.phases import Phase
from ..state import DaemonStatus
from ..aio import within

if TYPE_CHECKING:
    from ..release.app import App

log = logging.getLogger("bluegreen")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192
REASONS = ("swap", "rollback", "restart", "recover")  # (a first start is no swap here)
# The long-lived kinds an app of each protocol can have (sockets.LONG_LIVED): no series that cannot move.
KINDS = {"http": ("websocket", "path"), "grpc": ("path",), "tcp": ("tcp",)}


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


@dataclass
class NginxSnapshot:
    """What nginx says at a scrape (asked before the families are built: the collector is sync)."""

    up: bool
    ports: dict[str, int]  # slot -> port
    stats: dict[int, Any] | None  # port -> counters (runtime switch), None otherwise
    inflight: dict[int, int]
    long_lived: dict[int, dict[str, int]]  # port -> kind -> connections open (the kernel's count)
    hold: Hold | None = None  # the hold server's counters (runtime switch, HTTP), None otherwise


class Collector:
    """prometheus_client's custom collector: the daemon's own numbers and nginx's snapshot, as
    metric families; prometheus_client writes the text format."""

    def __init__(self, app: App, rec: Recorder, nginx: NginxSnapshot) -> None:
        self.app, self.rec, self.nginx = app, rec, nginx

    def collect(self) -> Iterator[Any]:
        yield from self._daemon()
        yield from self._swaps()
        yield from self._nginx()

    def _daemon(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        app = self.app
        yield GaugeMetricFamily("bluegreen_up", "1 while the bluegreen daemon runs.", value=1)
        status = GaugeMetricFamily("bluegreen_daemon_status", "The daemon's status: 1 for the current one (failed: "
                                   "it gave up restarting a crashing app).", labels=["status"])
        for s in DaemonStatus:
            status.add_metric([s.value], int(app.status == s))
        yield status
        yield GaugeMetricFamily("bluegreen_daemon_start_time_seconds", "When the daemon started (Unix time).",
                                value=round(self.rec.started_at, 3))
        build = GaugeMetricFamily("bluegreen_active_build_info", "The build that serves: always 1, the build in "
                                  "the labels.", labels=["slot", "port", "build", "build_name", "pid"])
        if app.active is not None:
            a = app.active
            build.add_metric([a.slot, str(a.port), str(a.build), a.build.name, str(a.pid)], 1)
        yield build
        if app.config.app.spare:
            info = app.spare.info() or {}
            yield GaugeMetricFamily("bluegreen_spare_ready", "1 while a hot spare (app.spare) is ready: a crash is "
                                    "then one routing change.", value=int(info.get("state") == "ready"))

    def _swaps(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        swaps = CounterMetricFamily("bluegreen_swaps", "Swaps that ended, by reason (swap, rollback, restart, "
                                    "recover) and outcome (done, failed).", labels=["reason", "outcome"])
        for (reason, outcome), n in sorted(self.rec.swaps.items()):
            swaps.add_metric([reason, outcome], n)
        yield swaps
        swap = self.app.swap if self.app.swapping() else None
        # The same series at every scrape (a label that changes value would start a new one): 1 for
        # the running swap's reason and phase, 0 for the others.
        running = GaugeMetricFamily("bluegreen_swap_in_progress", "1 while a swap of this reason runs.",
                                    labels=["reason"])
        for reason in REASONS:
            running.add_metric([reason], int(swap is not None and swap.reason == reason))
        yield running
        phase = GaugeMetricFamily("bluegreen_swap_phase", "1 for the phase the running swap is in.", labels=["phase"])
        for p in Phase:
            phase.add_metric([p.value], int(swap is not None and swap.phase == p.value))
        yield phase
        phases = HistogramMetricFamily("bluegreen_swap_phase_duration_seconds", "How long each swap phase took.",
                                       labels=["phase"])
        for phase, h in sorted(self.rec.phases.items()):
            buckets = [(repr(b), n) for b, n in zip(BUCKETS, h.counts)] + [("+Inf", h.count)]
            phases.add_metric([phase], buckets, round(h.sum, 6))
        yield phases
        yield CounterMetricFamily("bluegreen_crash_restarts", "Restarts of a crashed or hung active app.",
                                  value=self.rec.crash_restarts)

    def _nginx(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        n = self.nginx
        yield GaugeMetricFamily("bluegreen_nginx_up", "1 while the nginx master that routes the traffic runs.",
                                value=int(n.up))
        if n.stats is not None:
            for name, attr, what in (("requests", "requests", "Requests nginx sent to the slot's port"),
                                     ("responses_5xx", "http_5xx", "5xx answers the slot's app gave"),
                                     ("upstream_errors", "upstream_errors", "Requests the slot's app never "
                                      "answered (refused, reset, timed out)")):
                family = CounterMetricFamily(f"bluegreen_nginx_{name}", f"{what}, since the nginx master started "
                                             "(runtime switch only).", labels=["slot", "port"])
                for slot, port in n.ports.items():
                    c = n.stats.get(port)
                    family.add_metric([slot, str(port)], getattr(c, attr) if c else 0)
                yield family
        inflight = GaugeMetricFamily("bluegreen_nginx_inflight", "Requests in flight from nginx to the slot's port.",
                                     labels=["slot", "port"])
        for slot, port in n.ports.items():
            inflight.add_metric([slot, str(port)], n.inflight.get(port, 0))
        yield inflight
        lived = GaugeMetricFamily("bluegreen_long_lived_connections", "Long-lived connections open to the slot's "
                                  "port, by kind (websocket, path: drain.long_lived_paths, tcp).",
                                  labels=["slot", "port", "kind"])
        for slot, port in n.ports.items():
            for kind in KINDS[self.app.config.app.protocol]:
                lived.add_metric([slot, str(port), kind], n.long_lived.get(port, {}).get(kind, 0))
        yield lived
        if n.hold is not None:
            h = n.hold
            for name, value, what in (
                    ("held_requests", h.held, "Requests nginx held while no build could answer"),
                    ("hold_timeouts", h.timed_out, "Held requests answered 503 at hold.timeout"),
                    ("hold_turned_away", h.full, "Requests answered 503 at once: hold.max_requests were held"),
                    ("lost_requests", h.lost, "Requests an app failed before answering (it died with them), "
                     "not retried")):
                yield CounterMetricFamily(f"bluegreen_nginx_{name}", f"{what}, since the nginx master started.",
                                          value=value)
            yield GaugeMetricFamily("bluegreen_nginx_holding", "Requests held in nginx now.", value=h.holding)
            yield GaugeMetricFamily("bluegreen_nginx_paused", "1 while nginx holds every new request (a pause).",
                                    value=int(h.paused > 0))


async def render(app: App, rec: Recorder) -> str:
    """The current metrics, as the text /metrics answers (prometheus_client is loaded at the first
    scrape: a daemon without metrics never pays for it)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(app, rec, await _nginx(app)))
    return generate_latest(registry).decode()


async def _nginx(app: App) -> NginxSnapshot:
    ports = {slot: app.config.app.port(slot) for slot in SLOTS}
    try:
        app.master.master_pid()
        up = True
    except BluegreenError:
        up = False
    runtime = app.proxy.traffic_split()
    stats = None
    if up and runtime is not None:
        try:
            stats = await runtime.stats(0)
        except BluegreenError:
            pass
    inflight = {}
    for port in ports.values():
        n = 0
        if up:
            try:
                n = await runtime.inflight(port) if runtime is not None else sockets.inflight(port)
            except (BluegreenError, OSError):
                n = 0
        inflight[port] = n
    long_lived = {port: sockets.long_lived(port) for port in ports.values()}
    hold = None
    if up:
        try:
            hold = await app.proxy.hold()
        except BluegreenError:
            pass
    return NginxSnapshot(up, ports, stats, inflight, long_lived, hold)


class MetricsServer:
    """GET /metrics on daemon.metrics_listen."""

    def __init__(self, app: App, recorder: Recorder, address: tuple[str, int]) -> None:
        self.app, self.recorder, self.address = app, recorder, address
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = self.address
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                     limit=MAX_REQUEST)  # a scrape's request head, at most
        except OSError as e:
            where = f"{host}:{port}"
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"daemon.metrics_listen: {where} is already in use by {sockets.port_holder(port)}; "
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
            head = await within(reader.readuntil(b"\r\n\r\n"), 5)
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
            await within(writer.drain(), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:  # a scrape must never take the daemon down
            log.exception("internal error serving /metrics")
        finally:
            writer.close()
