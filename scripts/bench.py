"""Benchmark: what a release costs and how many requests it loses, bluegreen vs the hand recipes.

One run drives the same example Node app (boot delay --boot-ms) under the same open-loop load
(--rate requests/s, half on fresh connections, half on keep-alive connections, 10% slow
requests of 1 s) through nginx, with --releases releases for each approach:

  bluegreen      `bluegreen swap` through the daemon and its managed nginx
  plain restart  stop the app (SIGTERM, graceful), start the new build on the same port
  nginx recipe   the seeds' recipe: two copies in one upstream; mark one `down`, reload,
                 restart it at once (waiting only until it answers), then the other; both up

Every non-2xx answer, reset, refused connection, early EOF and timeout is a failure.
Then the daemon's footprint (RSS, CPU) idle and during swaps. Separately:
  --soak N    N back-to-back swaps of a fast app: failures, daemon RSS and fds start/end
  --scale     cost of one in-flight count with 1k and 10k other TCP sockets on the host
Loopback only; every process started is stopped at the end. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "examples" / "live-app"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

import bench_rpc  # noqa: E402
from bench_live import live_release  # noqa: E402
from conftest import render_config  # noqa: E402
from helpers import DaemonRun, free_ports, http_get, kill_tree, make_build, misbehaving_build  # noqa: E402
from supervisor.processes import sockets
from supervisor.config.host import resolve_binary  # noqa: E402

SLOW_EVERY = 10  # one request in ten is slow
SLOW_MS = 1000
TIMEOUT = 15.0


# ---------------------------------------------------------------- load


@dataclass
class Result:
    start: float
    end: float
    client: str  # fresh | keepalive
    slow: bool
    kind: str  # ok | http_502 | reset | refused | eof | timeout | ...
    version: str = ""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body, and whether the server keeps the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read()
    keep = headers.get("connection", "").lower() != "close"
    return status, body, keep


class OpenLoopLoad:
    """Requests scheduled at a fixed rate whatever the server does (open loop)."""

    def __init__(self, port: int, rate: float, keepalive: bool = True, slow: bool = True, users: bool = False) -> None:
        self.port, self.rate, self.keepalive, self.slow = port, rate, keepalive, slow
        self.users = users  # each request from a new user (its own rollout cookie), for a split
        self.slow_path = f"/slow?ms={SLOW_MS}"  # (Tomcat's example: /slow.jsp)
        self.results: list[Result] = []
        self.pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.running = True

    async def run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while self.running:
            i += 1
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            client = "keepalive" if self.keepalive and i % 2 == 0 else "fresh"
            slow = self.slow and i % SLOW_EVERY == 0
            task = asyncio.ensure_future(self.one(client, slow))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        self.running = False
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=TIMEOUT + 5)
        for _, w in self.pool:
            w.close()

    async def one(self, client: str, slow: bool) -> None:
        path = self.slow_path if slow else "/"
        start = time.time()
        conn = None
        try:
            if client == "keepalive" and self.pool:
                conn = self.pool.pop()
            else:
                conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), TIMEOUT)
            reader, writer = conn
            hdr = "keep-alive" if client == "keepalive" else "close"
            cookie = f"Cookie: bluegreen_id=u{os.urandom(6).hex()}\r\n" if self.users else ""
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{cookie}Connection: {hdr}\r\n\r\n".encode())
            status, body, keep = await asyncio.wait_for(read_response(reader), TIMEOUT)
            words = body.decode(errors="replace").split()
            version = (words[0] if slow else words[-1]) if words else ""
            kind = "ok" if 200 <= status < 300 else f"http_{status}"
            if client == "keepalive" and keep and kind == "ok":
                self.pool.append(conn)
                conn = None
        except ConnectionRefusedError:
            kind, version = "refused", ""
        except (ConnectionResetError, BrokenPipeError):
            kind, version = "reset", ""
        except asyncio.IncompleteReadError:
            kind, version = "eof", ""
        except asyncio.TimeoutError:
            kind, version = "timeout", ""
        except (OSError, ValueError, IndexError) as e:
            kind, version = type(e).__name__, ""
        finally:
            if conn is not None:
                conn[1].close()
        self.results.append(Result(start, time.time(), client, slow, kind, version))


# ---------------------------------------------------------------- processes


class Procs:
    """Every process the bench starts, each in its own session; all killed at the end."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def start(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL
        p = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(p.pid)
        return p

    def cleanup(self) -> None:
        kill_tree(self.pids)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(32).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class BenchNginx:
    """A plain nginx for the baselines, shaped like bluegreen's managed one."""

    def __init__(self, procs: Procs, prefix: Path, listen: int, upstream: str) -> None:
        self.prefix = prefix
        self.binary = resolve_binary("nginx") or "nginx"
        (prefix / "temp").mkdir(parents=True)
        self.upstream = prefix / "upstream.conf"
        self.upstream.write_text(upstream)
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(f"{k}_temp_path {prefix}/temp/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(f"""{user} worker_processes 1; pid {prefix}/nginx.pid;
error_log {prefix}/error.log; events {{ worker_connections 4096; }}
http {{ access_log off; {temp} include {self.upstream};
  server {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass http://app; proxy_http_version 1.1;
  proxy_set_header Connection ""; }} }} }}
""")
        self.argv = [self.binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        self.proc = procs.start(self.argv + ["-g", "daemon off;"], prefix)
        wait_for(lambda: (prefix / "nginx.pid").exists(), 10, "the bench nginx")

    def reload(self, upstream: str) -> None:
        self.upstream.write_text(upstream)
        subprocess.run(self.argv + ["-s", "reload"], check=True, capture_output=True)


def upstream(servers: list[str]) -> str:
    return "upstream app {\n" + "".join(f"    server {s};\n" for s in servers) + "}\n"


def node_app(procs: Procs, build: Path, port: int, logs: Path) -> subprocess.Popen[bytes]:
    return procs.start(["node", "server.js"], build, {"PORT": str(port)}, logs / f"app-{port}.log")


def stop_app(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# ---------------------------------------------------------------- one approach


@dataclass
class Measured:
    name: str
    results: list[Result]
    windows: list[tuple[float, float]]
    releases: list[dict[str, Any]] = field(default_factory=list)
    versions: tuple[str, str] = ("v1", "v2")  # release i goes from versions[i % 2] to versions[(i + 1) % 2]
    nginx_rss_mb: float | None = None


async def measure(name: str, port: int, rate: float, releases: int, gap: float,
                  release: Callable[[int], Awaitable[dict[str, Any]]], keepalive: bool = True,
                  slow: bool = True, on_tick: Callable[[], None] | None = None, users: bool = False) -> Measured:
    load = OpenLoopLoad(port, rate, keepalive, slow, users)
    runner = asyncio.ensure_future(load.run())
    await asyncio.sleep(min(2.0, gap))
    windows, infos = [], []
    for i in range(releases):
        t0 = time.time()
        info = await release(i)
        windows.append((t0, time.time()))
        infos.append(info)
        if on_tick:
            on_tick()
        await asyncio.sleep(gap)
    load.running = False
    await runner
    await load.stop()
    print(f"  {name}: {len(load.results)} requests, {releases} releases", file=sys.stderr)
    return Measured(name, load.results, windows, infos)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def torn(m: Measured) -> tuple[int, float]:
    """Answers from the old build to requests sent after the first answer from the new build
    arrived (on any client), and the longest window from that first answer to the sending of
    such a request: how long a new request could still get the old build. A request sent
    before that moment may still answer from the old build: it was routed before."""
    count, window = 0, 0.0
    for i, (begin, _) in enumerate(m.windows):
        old, new = m.versions[i % 2], m.versions[(i + 1) % 2]
        until = m.windows[i + 1][0] if i + 1 < len(m.windows) else float("inf")
        first_new = min((r.end for r in m.results if r.version == new and r.start >= begin), default=None)
        if first_new is None:
            continue
        late = [r.start for r in m.results if r.version == old and first_new < r.start < until]
        count += len(late)
        window = max([window, *(sent - first_new for sent in late)])
    return count, window


def proc_rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def nginx_rss_mb(master: int) -> float | None:
    """nginx's memory: the master's and its workers' RSS."""
    try:
        p = psutil.Process(master)
        return sum(x.memory_info().rss for x in (p, *p.children())) / 2**20
    except psutil.Error:
        return None


def summarize(m: Measured) -> dict[str, Any]:
    def during(r: Result) -> bool:
        return any(r.start <= b and r.end >= a for a, b in m.windows)

    ok = [r for r in m.results if r.kind == "ok"]
    failed = [r for r in m.results if r.kind != "ok"]
    by_client: dict[str, dict[str, int]] = {}
    for client in ("fresh", "keepalive"):
        by_client[client] = dict(Counter(r.kind for r in failed if r.client == client))
    steady = [(r.end - r.start) * 1000 for r in ok if not during(r) and not r.slow]
    swapping = [(r.end - r.start) * 1000 for r in ok if during(r) and not r.slow]
    torn_count, torn_window = torn(m)
    return {
        "approach": m.name,
        "requests": len(m.results),
        "requests_fresh": sum(1 for r in m.results if r.client == "fresh"),
        "requests_keepalive": sum(1 for r in m.results if r.client == "keepalive"),
        "slow_requests": sum(1 for r in m.results if r.slow),
        "failed": len(failed),
        "failed_by_client": by_client,
        "latency_ms": {"steady_p50": pct(steady, 50), "steady_p99": pct(steady, 99),
                       "swap_p50": pct(swapping, 50), "swap_p99": pct(swapping, 99)},
        "release_s_mean": statistics.mean(b - a for a, b in m.windows) if m.windows else None,
        "torn": torn_count,
        "torn_window_s": torn_window,
        "nginx_rss_mb": m.nginx_rss_mb,
    }


def switch_ms(d: list[dict[str, float]], sw: list[dict[str, Any]]) -> dict[str, Any]:
    """The switch phase (from the decision to the switch confirmed), and its parts per mode."""
    mean = statistics.mean
    out: dict[str, Any] = {"total": mean(x["switch"] for x in d) * 1000,
                           "p95": pct([x["switch"] * 1000 for x in d], 95), "mode": sw[0].get("mode", "reload")}
    if out["mode"] == "runtime":  # route file written, table set and read back
        out.update(write=mean(y["write"] for y in sw) * 1000, set=mean(y["set"] for y in sw) * 1000)
    else:
        out.update(write=mean(x["switch"] - y["test"] - y["reload"] - y["confirm"] for x, y in zip(d, sw)) * 1000,
                   test=mean(y["test"] for y in sw) * 1000, reload=mean(y["reload"] for y in sw) * 1000,
                   confirm=mean(y["confirm"] for y in sw) * 1000)
    return out


def bluegreen_phases(m: Measured) -> dict[str, Any]:
    swaps = [info["swap"] for info in m.releases]
    d = [s["durations"] for s in swaps]
    sw = [s["details"]["switch"] for s in swaps]
    total = [s["finished_at"] - s["started_at"] for s in swaps]
    overhead = [t - x["ready"] - x["drain"] for t, x in zip(total, d)]
    lags = []
    for s, x in zip(swaps, d):
        drain_start = s["started_at"] + sum(x[p] for p in ("prepare", "start", "ready", "switch", "commit"))
        workers_gone = drain_start + s["details"]["drain"]["workers_wait"]
        old_version = Path(s["from_build"]).name if s.get("from_build") else None
        last_old = max((r.end for r in m.results if r.version and r.version == old_version
                        and r.end <= s["finished_at"] + 1), default=0.0)
        lags.append((s["finished_at"] - max(workers_gone, last_old)) * 1000)
    mean = statistics.mean
    return {
        "start_to_ready_s": mean(x["start"] + x["ready"] for x in d),
        "switch_ms": switch_ms(d, sw),
        "drain_s": mean(x["drain"] for x in d),
        "stop_ms": mean(x["stop"] for x in d) * 1000,
        "release_s": mean(total),
        "overhead_ms_median": statistics.median(overhead) * 1000,
        "overhead_ms_all": [round(o * 1000, 1) for o in overhead],
        "drain_lag_ms_p95": pct(lags, 95),
        "drain_lag_ms_all": [round(x, 1) for x in lags],
    }


# ---------------------------------------------------------------- the three approaches


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="bg-bench-"))
        self.procs = Procs()
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        releases = self.dir / "releases"
        self.builds = [make_build(releases, v, boot_delay_ms=args.boot_ms) for v in ("v1", "v2")]
        self.fast = [make_build(self.dir / "fast", v) for v in ("v1", "v2")]
        self.daemon: DaemonRun | None = None

    def cleanup(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self.procs.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start_daemon(self, builds: list[Path], name: str, switch: str = "reload", extra: str = "",
                     daemon: str = "", drain_timeout: float = 30, nginx: str = "", **config: str) -> DaemonRun:
        listen, blue, green = free_ports(3)
        d = self.dir / name
        d.mkdir()
        cfg = d / "bluegreen.toml"
        cfg.write_text(render_config(d, build=builds[0], ports=(blue, green), listen=listen, drain_timeout=drain_timeout,
                                     nginx=f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 1\n'
                                           f'switch = "{switch}"\n{nginx}', extra=extra, daemon=daemon, **config))
        self.daemon = DaemonRun(dir=d, config=cfg, listen_port=listen, ports=(blue, green)).start()
        return self.daemon

    async def swap(self, run: DaemonRun, build: Path) -> dict[str, Any]:
        result = await self.command(run, "swap", str(build))
        result["swap"]["from_build"] = str(self.builds[0] if build == self.builds[1] else self.builds[1])
        return result

    async def command(self, run: DaemonRun, *args: str, fail_ok: bool = False) -> dict[str, Any]:
        """One CLI call, as an operator makes it; its result (its error, with fail_ok), with its wall-clock time."""
        t0 = time.monotonic()
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "supervisor", *args[:1], "--json", "--socket",
                                                 str(run.socket), *args[1:], stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        out, err = await p.communicate()
        final = json.loads(out.decode().splitlines()[-1])
        if fail_ok and not final.get("ok"):
            return {"error": final["error"], "cli_s": time.monotonic() - t0}
        if not final.get("ok"):
            raise RuntimeError(f"{args[0]} failed: {final}")
        final["result"]["cli_s"] = time.monotonic() - t0
        return final["result"]  # type: ignore[no-any-return]

    async def reverts(self, rounds: int = 3, step: float = 10.0) -> dict[str, Any]:
        """Roll out a build that answers 500 to 30 % of its requests (10 %, then 100 % of users,
        steps of `step` s) under load from many users: from its first bad answer to the revert,
        how long, and how many requests it served."""
        bad = misbehaving_build(self.dir / "bad", "bad", fail=30)
        run = self.start_daemon(self.fast, "revert", "runtime", extra="[rollout]\nmin_requests = 20")

        async def bad_rollout(i: int) -> dict[str, Any]:
            out = await self.command(run, "swap", str(bad), "--rollout", "10,100", "--step", f"{step:g}", fail_ok=True)
            out["last_swap"] = (run.status() or {}).get("last_swap") or {}
            return out

        m = await measure("revert", run.listen_port, self.args.rate, rounds, self.args.gap, bad_rollout, users=True,
                          slow=False)
        run.stop()
        self.daemon = None
        rows = []
        for (t0, t1), info in zip(m.windows, m.releases):
            last = info["last_swap"]
            d = last.get("durations", {})
            revert_at = last["started_at"] + sum(d.get(p, 0) for p in ("prepare", "start", "ready", "rollout"))
            bad_answers = [r for r in m.results if t0 <= r.start <= t1 and (r.version == "bad" or r.kind == "http_500")]
            first_bad = min((r.end for r in bad_answers if r.kind == "http_500"), default=None)
            rows.append({"code": info.get("error", {}).get("code"), "served": sum(1 for r in bad_answers
                                                                                   if r.start < revert_at),
                         "failed": sum(1 for r in bad_answers if r.kind == "http_500"),
                         "first_bad_to_revert_s": None if first_bad is None else revert_at - first_bad})
        s = summarize(m)
        return {"step_s": step, "rounds": rows, "requests": s["requests"],
                "other_failures": s["failed"] - sum(r["failed"] for r in rows)}

    async def cli_startup(self, runs: int = 20) -> dict[str, Any]:
        """How long the `bluegreen` command takes, beside a bare start of the same interpreter (same
        venv): medians of `runs` calls, taken in turns so that any load hits all of them alike."""
        run = self.start_daemon(self.fast, "cli", "runtime")
        bluegreen = Path(sys.executable).parent / "bluegreen"
        cmds = {"python -c pass": [sys.executable, "-c", "pass"], "bluegreen --version": [str(bluegreen), "--version"],
                "bluegreen status": [str(bluegreen), "status", "-c", str(run.config)]}
        times: dict[str, list[float]] = {k: [] for k in cmds}

        def timed(argv: list[str]) -> float:
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            return time.perf_counter() - t

        for _ in range(runs):
            for name, argv in cmds.items():
                times[name].append(await asyncio.to_thread(timed, argv))
        run.stop()
        self.daemon = None
        bare = statistics.median(times["python -c pass"])
        return {name: {"ms": statistics.median(t) * 1000, "ratio": statistics.median(t) / bare}
                for name, t in times.items()}

    async def ops_footprint(self, ops: bool, scrape_every: float = 15.0) -> dict[str, Any]:
        """The daemon idle (one swap done, no load), with the ops features on (metrics scraped every
        `scrape_every` s, logs rotated at 64 KiB after traffic filled them) or off: RSS and CPU, and
        the log pumps'."""
        extra = "[logs]\nmax_bytes = 65536\nbackups = 3\n" if ops else ""
        metrics = free_ports(1)[0]
        run = self.start_daemon(self.builds, f"ops-{'on' if ops else 'off'}-{scrape_every:g}", "runtime", extra=extra,
                                daemon=f'metrics_listen = "127.0.0.1:{metrics}"' if ops else "")
        await self.swap(run, self.builds[1])
        for _ in range(2000):  # ~200 kB of access log: rotated several times when ops is on
            await asyncio.to_thread(http_get, run.listen_port, "/")
        await asyncio.sleep(2)  # the rotation tick, then quiet
        proc = psutil.Process(run.proc.pid)
        scrapes, t_end = 0, time.monotonic() + self.args.idle
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        while time.monotonic() < t_end:
            if ops:
                await asyncio.to_thread(http_get, metrics, "/metrics")
                scrapes += 1
            await asyncio.sleep(min(scrape_every, max(0.0, t_end - time.monotonic())))
        cpu1, t1 = proc.cpu_times(), time.monotonic()
        pumps = [c for c in proc.children() if "logpump.py" in " ".join(c.cmdline())]
        result = {"ops": ops, "scrape_every": scrape_every, "idle_seconds": round(t1 - t0, 1), "scrapes": scrapes, "rss_mb": proc_rss_mb(proc),
                  "cpu_percent": 100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0),
                  "pumps": len(pumps), "pump_rss_mb": max((c.memory_info().rss for c in pumps), default=0) / 2**20,
                  "access_logs": sorted(p.name for p in (run.dir / "run" / "nginx").glob("access.log*"))}
        run.stop()
        self.daemon = None
        return result

    async def rollbacks(self, keep_warm: float) -> dict[str, Any]:
        """Release v2, then roll back to v1, under load; with keep_warm the rollback reuses the
        still-running v1 (one routing change), without it v1 starts afresh (boot, readiness)."""
        run = self.start_daemon(self.builds, f"rollback-{keep_warm:g}", "runtime",
                                extra=f"[release]\nkeep_warm = {keep_warm:g}")

        async def release_and_back(i: int) -> dict[str, Any]:
            await self.swap(run, self.builds[1])
            return await self.command(run, "rollback")

        m = await measure(f"rollback (keep_warm {keep_warm:g})", run.listen_port, self.args.rate, self.args.releases,
                          self.args.gap, release_and_back)
        run.stop()
        self.daemon = None
        swaps = [info["swap"] for info in m.releases]
        total = [(x["finished_at"] - x["started_at"]) * 1000 for x in swaps]
        drain = [x["durations"]["drain"] * 1000 for x in swaps]
        s = summarize(m)
        return {"keep_warm": keep_warm, "warm_used": sum(1 for x in swaps if x["details"].get("warm")),
                "rollbacks": len(swaps), "requests": s["requests"], "failed": s["failed"],
                "rollback_ms_mean": statistics.mean(total), "cli_ms_mean": statistics.mean(r["cli_s"] * 1000
                                                                                          for r in m.releases),
                "switch_ms_mean": statistics.mean(x["durations"]["switch"] * 1000 for x in swaps),
                "drain_ms_mean": statistics.mean(drain),
                "without_drain_ms_mean": statistics.mean(t - d for t, d in zip(total, drain)),
                "without_drain_ms_max": max(t - d for t, d in zip(total, drain))}

    async def live(self, switch: str, clients: int = 500, releases: int = 10) -> dict[str, Any]:
        """`clients` reconnecting WebSocket clients of examples/live-app through `releases` releases
        under the HTTP load (drain.timeout 5 s: the long-lived grace)."""
        builds = [LIVE / "v1", LIVE / "v2"]
        run = self.start_daemon(builds, f"live-{switch}", switch, drain_timeout=5, nginx="worker_connections = 4096")

        def http_load(release: Callable[[int], Awaitable[dict[str, Any]]]) -> Awaitable[Measured]:
            return measure(f"bluegreen ({switch}), {clients} WebSocket clients", run.listen_port, self.args.rate,
                           releases, self.args.gap, release)

        result = await live_release(run.listen_port, clients, releases, self.args.gap,
                                    lambda i: self.swap(run, builds[(i + 1) % 2]), http_load)
        run.stop()
        self.daemon = None
        m = result.pop("measured")
        s = summarize(m)
        return {"switch": switch, "releases": releases, **result, "requests": s["requests"], "failed": s["failed"],
                "failed_by_kind": {**s["failed_by_client"]["fresh"], **s["failed_by_client"]["keepalive"]}}

    async def throughput(self, seconds: float, repeats: int = 3) -> list[dict[str, Any]]:
        """Requests per second at saturation (`wrk -t2 -c50`, keep-alive clients) through the
        runtime switch, with nothing held (hold.timeout = 0) and with the hold: the cost of the
        hold's logic on a normal request. One daemon each, measured alternately, `repeats` times."""
        wrk = shutil.which("wrk")
        if wrk is None:
            return [{"error": "wrk is not installed (apt-get install wrk; scripts/bootstrap --test does)"}]
        runs = {label: self.start_daemon(self.builds, f"wrk-{n}", "runtime", extra=f"[hold]\ntimeout = {t}\n")
                for n, (label, t) in enumerate((("hold off (hold.timeout = 0)", 0), ("hold on (hold.timeout = 10)", 10)))}
        self.daemon = None
        rates: dict[str, list[float]] = {label: [] for label in runs}
        try:
            for _ in range(repeats):
                for label, run in runs.items():
                    out = await asyncio.to_thread(subprocess.run, [wrk, "-t2", "-c50", f"-d{seconds:g}s",
                                                                   f"http://127.0.0.1:{run.listen_port}/"],
                                                  capture_output=True, text=True)
                    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("Requests/sec:")), "")
                    errors = next((ln for ln in out.stdout.splitlines() if "Non-2xx" in ln or "Socket errors" in ln), "")
                    if not line or errors:
                        raise RuntimeError(f"wrk against {label}: {out.stdout[-500:]}{out.stderr[-300:]}")
                    rates[label].append(float(line.split()[1]))
        finally:
            for run in runs.values():
                run.stop()
        base = statistics.median(rates["hold off (hold.timeout = 0)"])
        return [{"label": label, "rates": r, "median": statistics.median(r),
                 "vs_off": statistics.median(r) / base - 1} for label, r in rates.items()]

    async def rpc(self, service: str, approach: str, clients: int = 8) -> dict[str, Any]:
        """`clients` RPC clients (bench_rpc.py) through the releases: bluegreen with a switch
        ("runtime" or "reload"), or "plain restart"."""
        s = bench_rpc.SERVICES[service]
        builds = [s["builds"] / "v1", s["builds"] / "v2"]
        os.environ["BOOT_MS"] = str(self.args.boot_ms)  # the same slow start as the HTTP app's (inherited)
        if approach == "plain restart":
            direct = bench_rpc.Direct(s["argv"], builds[0], free_ports(1)[0], s["ready"])
            try:
                result = await asyncio.to_thread(bench_rpc.clients_through, bench_rpc.client_maker(service, direct.port),
                                                 clients, self.args.releases, self.args.gap,
                                                 lambda i: direct.restart(builds[(i + 1) % 2]))
            finally:
                direct.stop()
        else:
            # A TCP service's pooled connections that never rest are cut at the grace: 5 s, as the
            # redis example's config says (the RPC clients here call back to back).
            run = self.start_daemon(builds, f"{service}-{approach}", approach, drain_timeout=5 if service == "tcp" else 10,
                                    command=json.dumps(s["argv"]), **s["config"])

            drains: list[dict[str, Any]] = []

            def release(i: int) -> float:
                r = subprocess.run([sys.executable, "-m", "supervisor", "swap", "--socket", str(run.socket),
                                    str(builds[(i + 1) % 2])], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(r.stdout + r.stderr)
                last = (run.status() or {})["last_swap"]
                drains.append(last["details"].get("drain") or {})
                return last["finished_at"] - last["started_at"]

            result = await asyncio.to_thread(bench_rpc.clients_through, bench_rpc.client_maker(service, run.listen_port),
                                             clients, self.args.releases, self.args.gap, release)
            result["reported_cut"] = sum(d.get("calls_cut", 0) for d in drains)
            run.stop()
            self.daemon = None
        return {"service": service, "approach": approach if approach == "plain restart" else f"bluegreen ({approach})",
                "clients": clients, **result}

    async def redis(self, layout: str, approach: str) -> dict[str, Any]:
        """redis-py callers (bench_rpc.redis_through) through the releases: bluegreen (reload:
        nginx's stream module) or a plain restart; what failed beside what the drain reported."""
        s = bench_rpc.SERVICES["redis"]
        builds = [s["builds"] / "v1", s["builds"] / "v2"]
        os.environ["BOOT_MS"] = str(self.args.boot_ms)
        if approach == "plain restart":
            direct = bench_rpc.Direct(s["argv"], builds[0], free_ports(1)[0], s["ready"])
            try:
                result = await asyncio.to_thread(bench_rpc.redis_through, direct.port, self.args.releases,
                                                 self.args.gap, layout,
                                                 lambda i: (direct.restart(builds[(i + 1) % 2]), None))
            finally:
                direct.stop()
        else:
            run = self.start_daemon(builds, f"redis-{layout}", approach, drain_timeout=5, command=json.dumps(s["argv"]),
                                    **s["config"])

            def release(i: int) -> tuple[float, dict[str, Any] | None]:
                r = subprocess.run([sys.executable, "-m", "supervisor", "swap", "--socket", str(run.socket),
                                    str(builds[(i + 1) % 2])], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(r.stdout + r.stderr)
                last = (run.status() or {})["last_swap"]
                return last["finished_at"] - last["started_at"], last["details"].get("drain")

            result = await asyncio.to_thread(bench_rpc.redis_through, run.listen_port, self.args.releases,
                                             self.args.gap, layout, release)
            run.stop()
            self.daemon = None
        return {"layout": layout, "approach": approach if approach == "plain restart" else f"bluegreen ({approach})",
                **result}

    async def bluegreen(self, switch: str = "reload") -> tuple[Measured, dict[str, Any]]:
        run = self.start_daemon(self.builds, f"bluegreen-{switch}", switch)
        proc = psutil.Process(run.proc.pid)
        samples: list[int] = []
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        m = await measure(f"bluegreen ({switch})", run.listen_port, self.args.rate, self.args.releases, self.args.gap,
                          lambda i: self.swap(run, self.builds[(i + 1) % 2]),
                          on_tick=lambda: samples.append(proc.memory_info().rss))
        m.nginx_rss_mb = nginx_rss_mb((run.status() or {}).get("nginx", {}).get("master_pid") or 0)
        cpu1, t1 = proc.cpu_times(), time.monotonic()
        footprint = {"swaps_cpu_percent": 100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0),
                     "swaps_rss_mb_max": max(samples) / 2**20}
        # Idle: no load, no swap.
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        await asyncio.sleep(self.args.idle)
        cpu1, t1 = proc.cpu_times(), time.monotonic()
        footprint.update(idle_seconds=self.args.idle, idle_rss_mb=proc.memory_info().rss / 2**20,
                         idle_cpu_percent=100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0))
        run.stop()
        self.daemon = None
        return m, footprint

    async def plain_restart(self) -> Measured:
        listen, port = free_ports(2)
        nginx = BenchNginx(self.procs, self.dir / "nginx-restart", listen, upstream([f"127.0.0.1:{port}"]))
        app = [node_app(self.procs, self.builds[0], port, self.logs)]
        wait_for(lambda: answers(port), 30, "the app")

        async def release(i: int) -> dict[str, Any]:
            await asyncio.to_thread(stop_app, app[0])
            app[0] = node_app(self.procs, self.builds[(i + 1) % 2], port, self.logs)
            await asyncio.to_thread(wait_for, lambda: answers(port), 60, "the restarted app")
            return {}

        m = await measure("plain restart", listen, self.args.rate, self.args.releases, self.args.gap, release)
        m.nginx_rss_mb = nginx_rss_mb(nginx.proc.pid)
        stop_app(app[0])
        nginx.proc.send_signal(signal.SIGQUIT)
        return m

    async def nginx_recipe(self) -> Measured:
        listen, p1, p2 = free_ports(3)
        nginx = BenchNginx(self.procs, self.dir / "nginx-recipe", listen, upstream([f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]))
        apps = {p1: node_app(self.procs, self.builds[0], p1, self.logs), p2: node_app(self.procs, self.builds[0], p2, self.logs)}
        wait_for(lambda: answers(p1) and answers(p2), 30, "both apps")

        def redeploy(port: int, build: Path, other: int) -> None:
            # Mark it down, reload, restart it at once (no wait for its in-flight requests).
            nginx.reload(upstream([f"127.0.0.1:{port} down", f"127.0.0.1:{other}"]))
            stop_app(apps[port])
            apps[port] = node_app(self.procs, build, port, self.logs)
            wait_for(lambda: answers(port), 60, "the restarted copy")

        async def release(i: int) -> dict[str, Any]:
            build = self.builds[(i + 1) % 2]
            await asyncio.to_thread(redeploy, p1, build, p2)
            await asyncio.to_thread(redeploy, p2, build, p1)
            await asyncio.to_thread(nginx.reload, upstream([f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]))
            return {}

        m = await measure("nginx recipe", listen, self.args.rate, self.args.releases, self.args.gap, release)
        m.nginx_rss_mb = nginx_rss_mb(nginx.proc.pid)
        for p in apps.values():
            stop_app(p)
        nginx.proc.send_signal(signal.SIGQUIT)
        return m

    async def soak(self) -> dict[str, Any]:
        run = self.start_daemon(self.fast, "soak", switch="auto")  # what a default config gets
        proc = psutil.Process(run.proc.pid)
        start = {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds()}
        m = await measure("soak", run.listen_port, 50, self.args.soak, 0.0,
                          lambda i: self.swap(run, self.fast[(i + 1) % 2]), keepalive=False, slow=False)
        end = {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds()}
        run.stop()
        self.daemon = None
        s = summarize(m)
        swaps = [info["swap"] for info in m.releases]
        switch = [x["durations"]["switch"] * 1000 for x in swaps]
        overhead = [(x["finished_at"] - x["started_at"] - x["durations"]["ready"] - x["durations"]["drain"]) * 1000
                    for x in swaps]
        return {"swaps": self.args.soak, "requests": s["requests"], "failed": s["failed"],
                "switch_mode": swaps[0]["details"]["switch"].get("mode", "reload") if swaps else None,
                "switch_ms_p50": pct(switch, 50), "switch_ms_p95": pct(switch, 95),
                "overhead_ms_p50": pct(overhead, 50), "overhead_ms_p95": pct(overhead, 95),
                "failed_by_kind": s["failed_by_client"]["fresh"], "start": start, "end": end,
                "rss_growth_mb": end["rss_mb"] - start["rss_mb"], "fd_growth": end["fds"] - start["fds"]}


# ---------------------------------------------------------------- drain-check scale


def scale() -> dict[str, Any]:
    """Time one in-flight count for a port with N other established TCP sockets on the host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 10_000 + 1000
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
        except (ValueError, OSError):
            return {"error": f"RLIMIT_NOFILE is {soft}/{hard}; need {want} to open 10k sockets"}
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen()
    port = target.getsockname()[1]
    mine = socket.create_connection(("127.0.0.1", port))
    accepted = target.accept()[0]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4096)
    oport = other.getsockname()[1]
    socks: list[socket.socket] = []
    out: dict[str, Any] = {}

    def timed(fn: Callable[[], Any], n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    try:
        for n in (0, 1000, 10_000):  # n other sockets: n/2 established connections, both ends local
            while len(socks) < n:
                c = socket.create_connection(("127.0.0.1", oport))
                socks += [c, other.accept()[0]]
            assert sockets.inflight(port) == 1
            out[str(n)] = {
                "sock_diag_ms": timed(lambda: sockets.inflight(port), 50),
                "proc_net_tcp_ms": timed(lambda: sockets._proc_scan(port, sockets.INFLIGHT_STATES), 10),
                "psutil_net_connections_ms": timed(
                    lambda: [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port], 5),
            }
            print(f"  scale: {n} other sockets: {out[str(n)]}", file=sys.stderr)
    finally:
        for s in [*socks, mine, accepted, target, other]:
            s.close()
    return out


# ---------------------------------------------------------------- output


def fmt(x: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def kinds(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "0"


def print_throughput(rows: list[dict[str, Any]]) -> None:
    if "error" in rows[0]:
        print(f"\nthroughput: {rows[0]['error']}")
        return
    print(f"\n| runtime switch, wrk -t2 -c50 (keep-alive), example Node app, 1 nginx worker | requests/s, "
          f"{len(rows[0]['rates'])} runs (alternating) | median | vs hold off |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {' / '.join(f'{x:,.0f}' for x in r['rates'])} | {r['median']:,.0f} | "
              f"{r['vs_off'] * 100:+.1f} % |")


def print_live(rows: list[dict[str, Any]]) -> None:
    print(f"\n| {rows[0]['clients']} WebSocket clients (examples/live-app), {rows[0]['releases']} releases under load, "
          "drain.timeout 5 s | reconnections | to the new build | reconnect p50 / p95 / max | messages lost "
          "| closed by the drain | how clients saw the close | failed HTTP requests | mean release |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| bluegreen ({r['switch']} switch) | {r['reconnections']} | {r['to_the_new_build']} "
              f"| {fmt(r['reconnect_s_p50'], ' s', 2)} / {fmt(r['reconnect_s_p95'], ' s', 2)} / "
              f"{fmt(r['reconnect_s_max'], ' s', 2)} | {r['messages_lost']} of {r['messages']} "
              f"| {kinds(r['cut_by_the_drain'])} | {kinds(r['closes'])} | {r['failed']} of {r['requests']} "
              f"{kinds(r['failed_by_kind']) if r['failed'] else ''} | {fmt(r['release_s_mean'], ' s', 2)} |")


def print_rpc(rows: list[dict[str, Any]], releases: int) -> None:
    print(f"\n| RPC service, {rows[0]['clients']} clients keeping their connections, {releases} releases | calls "
          "| failed | calls the drain reported cut | longest call | pooled reconnections | mean release |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['service']}: {r['approach']} | {r['calls']} | {r['failed']} "
              f"{kinds(r['failed_by_kind']) if r['failed'] else ''} | {r.get('reported_cut', '-')} "
              f"| {r['slowest_call_s'] * 1000:.0f} ms "
              f"| {r['reconnects'] if r['service'] == 'tcp' else '-'} | {fmt(r['release_s_mean'], ' s', 2)} |")


def print_redis(rows: list[dict[str, Any]], releases: int) -> None:
    print(f"\n| redis-py, no retries, {releases} releases | calls (5 ms apart / back to back / slow) | failed (5 ms "
          "apart / back to back / slow) | reported cut by the drain | longest call | mean release |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c, f = r["calls"], r["failed"]
        reported = "-" if r["reported_cut"] is None else (
            f"{r['reported_cut']}" + (f" (+{r['reported_unknown']} may have been)" if r["reported_unknown"] else ""))
        print(f"| {r['approach']}, {'one pool' if r['layout'] == 'shared' else 'a connection per caller'} "
              f"| {c.get('spaced', 0)} / {c.get('back-to-back', 0)} / {c.get('slow', 0)} "
              f"| {f['spaced']} / {f['back-to-back']} / {f['slow']} | {reported} | {r['slowest_call_s'] * 1000:.0f} ms "
              f"| {fmt(r['release_s_mean'], ' s', 2)} |")


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nbluegreen bench: {m['cpus']} cores, {m['python']}, {m['nginx']}, node {m['node']}; "
          f"load {report['args']['rate']:g} req/s open loop (half fresh connections, half keep-alive), "
          f"10% slow ({SLOW_MS} ms), app boot {report['args']['boot_ms']} ms, "
          f"{report['args']['releases']} releases each\n")
    rows = report.get("approaches", [])
    if rows:
        print("| approach | requests | failed (fresh) | failed (keep-alive) | torn (window) | p50/p99 steady "
              "| p50/p99 during release | mean release | nginx RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lat = r["latency_ms"]
            print(f"| {r['approach']} | {r['requests']} | {kinds(r['failed_by_client']['fresh'])} "
                  f"| {kinds(r['failed_by_client']['keepalive'])} | {r['torn']} ({r['torn_window_s'] * 1000:.0f} ms) "
                  f"| {fmt(lat['steady_p50'], ' ms', 1)} / {fmt(lat['steady_p99'], ' ms', 1)} "
                  f"| {fmt(lat['swap_p50'], ' ms', 1)} / {fmt(lat['swap_p99'], ' ms', 1)} "
                  f"| {fmt(r['release_s_mean'], ' s', 2)} | {fmt(r['nginx_rss_mb'], ' MB', 1)} |")
    cli = report.get("cli")
    if cli:
        print("\n| command (same venv, median of 20) | time | × a bare interpreter start |")
        print("|---|---|---|")
        for name, c in cli.items():
            print(f"| `{name}` | {c['ms']:.1f} ms | {c['ratio']:.2f} × |")
        print("  target: `bluegreen --version` and `bluegreen status` within 2.5 × `python -c pass`")
        recipe = next((r for r in rows if r["approach"] == "nginx recipe"), None)
        if recipe and recipe["release_s_mean"]:
            ours = ", ".join(f"{r['approach']} {r['release_s_mean']:.2f} s ({r['release_s_mean'] / recipe['release_s_mean']:.2f} ×)"
                             for r in rows if r["approach"].startswith("bluegreen"))
            print(f"  a release as the user waits for it (the `bluegreen swap` call, CLI start included): {ours}; "
                  f"the hand recipe {recipe['release_s_mean']:.2f} s")
    for key, name, target in (("bluegreen_phases", "bluegreen (reload)", 100), ("bluegreen_runtime_phases",
                                                                               "bluegreen (runtime)", 20)):
        p = report.get(key)
        if not p:
            continue
        s = p["switch_ms"]
        parts = (f"write {s['write']:.2f} + set {s['set']:.2f}" if s["mode"] == "runtime" else
                 f"write {s['write']:.1f} + test {s['test']:.1f} + reload {s['reload']:.1f} + confirm {s['confirm']:.1f}")
        print(f"\n{name} phases (mean): start->ready {p['start_to_ready_s']:.3f} s | switch {s['total']:.1f} ms, "
              f"p95 {fmt(s['p95'], ' ms', 1)} ({parts}) | drain {p['drain_s']:.3f} s | stop {p['stop_ms']:.1f} ms "
              f"| release {p['release_s']:.3f} s")
        print(f"  overhead = release - ready wait - drain wait: median {p['overhead_ms_median']:.1f} ms "
              f"(target <= {target} ms) {p['overhead_ms_all']}")
        print(f"  old app stopped after its last request and after nginx let go: p95 "
              f"{fmt(p['drain_lag_ms_p95'], ' ms', 1)} (target <= 100 ms) {p['drain_lag_ms_all']}")
    for key, name in (("footprint", "reload"), ("footprint_runtime", "runtime")):
        f = report.get(key)
        if not f:
            continue
        print(f"daemon footprint ({name}): idle {f['idle_seconds']:g} s: RSS {f['idle_rss_mb']:.1f} MB, CPU {f['idle_cpu_percent']:.2f}% "
              f"(targets 40 MB, 0.5%) | during swaps under load: RSS max {f['swaps_rss_mb_max']:.1f} MB, "
              f"CPU {f['swaps_cpu_percent']:.1f}%")
    rb = report.get("rollback")
    if rb:
        print("\n| rollback (runtime switch, under load) | used the warm build | failed | rollback | without the drain "
              "(mean / max) | switch | drain | CLI call |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rb:
            name = f"warm (keep_warm = {r['keep_warm']:g})" if r["keep_warm"] else "cold (keep_warm = 0)"
            print(f"| {name} | {r['warm_used']} of {r['rollbacks']} | {r['failed']} of {r['requests']} "
                  f"| {r['rollback_ms_mean']:.0f} ms | {r['without_drain_ms_mean']:.1f} / {r['without_drain_ms_max']:.1f} ms "
                  f"| {r['switch_ms_mean']:.2f} ms | {r['drain_ms_mean']:.0f} ms | {r['cli_ms_mean']:.0f} ms |")
        print("  target: a warm rollback <= 50 ms plus the drain")
    rv = report.get("revert")
    if rv:
        print(f"\n| automatic revert (rollout 10 % then 100 %, step {rv['step_s']:g} s, new build answers 500 to 30 %) "
              "| outcome | bad build's requests before the revert | of which failed | first bad answer -> revert |")
        print("|---|---|---|---|---|")
        for i, r in enumerate(rv["rounds"], 1):
            print(f"| round {i} | {r['code']} | {r['served']} | {r['failed']} | {fmt(r['first_bad_to_revert_s'], ' s', 2)} |")
        print(f"  {rv['requests']} requests in all; failures other than the bad build's own 500s: {rv['other_failures']}")
    ops = report.get("ops")
    if ops:
        print("\n| daemon, idle after a swap | scrapes of /metrics | daemon RSS | daemon CPU | log pumps (RSS each) | "
              "nginx access logs |")
        print("|---|---|---|---|---|---|")
        for o in ops:
            what = (f"metrics scraped every {o['scrape_every']:g} s, logs rotated at 64 KiB" if o["ops"]
                    else "baseline: metrics off, default logs")
            print(f"| {what} | {o['scrapes']} in {o['idle_seconds']:.0f} s | {o['rss_mb']:.1f} MB | "
                  f"{o['cpu_percent']:.2f} % | {o['pumps']} ({o['pump_rss_mb']:.1f} MB) | {', '.join(o['access_logs'])} |")
    if report.get("throughput"):
        print_throughput(report["throughput"])
    if report.get("live"):
        print_live(report["live"])
    if report.get("rpc"):
        print_rpc(report["rpc"], report["args"]["releases"])
    if report.get("redis"):
        print_redis(report["redis"], report["args"]["releases"])
    s = report.get("soak")
    if s:
        print(f"soak ({s['switch_mode']} switch): {s['swaps']} swaps, {s['requests']} requests, {s['failed']} failed "
              f"{kinds(s['failed_by_kind'])}; switch p50/p95 {fmt(s['switch_ms_p50'], ' ms', 2)} / "
              f"{fmt(s['switch_ms_p95'], ' ms', 2)}, overhead p50/p95 {fmt(s['overhead_ms_p50'], ' ms', 1)} / "
              f"{fmt(s['overhead_ms_p95'], ' ms', 1)}; "
              f"daemon RSS {s['start']['rss_mb']:.1f} -> {s['end']['rss_mb']:.1f} MB ({s['rss_growth_mb']:+.1f}, target <= 5), "
              f"fds {s['start']['fds']} -> {s['end']['fds']} ({s['fd_growth']:+d}, target 0)")
    sc = report.get("scale")
    if sc:
        if "error" in sc:
            print(f"scale: {sc['error']}")
        else:
            print("\n| other TCP sockets on the host | sock_diag (bluegreen) | /proc/net/tcp scan | psutil.net_connections |")
            print("|---|---|---|---|")
            for n, v in sc.items():
                print(f"| {n} | {v['sock_diag_ms']:.2f} ms | {v['proc_net_tcp_ms']:.2f} ms | {v['psutil_net_connections_ms']:.1f} ms |")


def machine() -> dict[str, Any]:
    nginx = subprocess.run([resolve_binary("nginx") or "nginx", "-v"], capture_output=True, text=True).stderr.strip()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "nginx": nginx.replace("nginx version: ", ""),
            "node": node, "kernel": platform.release()}


ONLY = ("soak", "scale", "rollback", "ops", "live", "rpc", "throughput")  # the --only-X flags


def wanted(args: argparse.Namespace, section: str) -> bool:
    """Whether a section runs: the one an --only-X flag names, else every one ("compare" is the
    approaches' table and the CLI's start, which no flag names alone)."""
    chosen = [o for o in ONLY if getattr(args, f"only_{o}")]
    return section in chosen if chosen else True


async def compare(bench: Bench, report: dict[str, Any]) -> None:
    """The CLI's start, then the same release under the same load by every approach."""
    print("bench: the CLI's start...", file=sys.stderr)
    report["cli"] = await bench.cli_startup()
    print("bench: bluegreen...", file=sys.stderr)
    m, footprint = await bench.bluegreen()
    rows = [summarize(m)]
    report["bluegreen_phases"] = bluegreen_phases(m)
    report["footprint"] = footprint
    print("bench: bluegreen runtime...", file=sys.stderr)
    m, report["footprint_runtime"] = await bench.bluegreen("runtime")
    rows.append(summarize(m))
    report["bluegreen_runtime_phases"] = bluegreen_phases(m)
    print("bench: plain restart...", file=sys.stderr)
    rows.append(summarize(await bench.plain_restart()))
    print("bench: nginx recipe...", file=sys.stderr)
    rows.append(summarize(await bench.nginx_recipe()))
    report["approaches"] = rows


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    bench = Bench(args)
    try:
        if wanted(args, "ops"):
            print("bench: idle footprint with metrics and log rotation, off then on...", file=sys.stderr)
            report["ops"] = [await bench.ops_footprint(False), await bench.ops_footprint(True, 15.0),
                             await bench.ops_footprint(True, 1.0)]
        if wanted(args, "compare"):
            await compare(bench, report)
        if wanted(args, "rollback"):
            print("bench: rollback, warm and cold...", file=sys.stderr)
            report["rollback"] = [await bench.rollbacks(600), await bench.rollbacks(0)]
            print("bench: automatic revert of a bad rollout...", file=sys.stderr)
            report["revert"] = await bench.reverts()
        if wanted(args, "live"):
            print("bench: WebSocket clients through releases, runtime then reload switch...", file=sys.stderr)
            report["live"] = [await bench.live(switch, args.ws_clients, args.live_releases)
                              for switch in ("runtime", "reload")]
        if wanted(args, "rpc"):
            print("bench: RPC services (TCP, gRPC) through releases, beside a plain restart...", file=sys.stderr)
            report["rpc"] = [await bench.rpc(service, approach) for service, approach in (
                ("tcp", "reload"), ("tcp", "plain restart"), ("grpc", "runtime"), ("grpc", "reload"),
                ("grpc", "plain restart"))]
            print("bench: redis-py callers through releases, beside a plain restart...", file=sys.stderr)
            report["redis"] = [await bench.redis(layout, approach) for layout in ("shared", "per-caller")
                               for approach in ("reload", "plain restart")]
        if wanted(args, "throughput"):
            print("bench: requests/s at saturation (wrk), the runtime switch with the hold off and on...",
                  file=sys.stderr)
            report["throughput"] = await bench.throughput(args.wrk_seconds, args.wrk_runs)
        if args.soak:
            print(f"bench: soak ({args.soak} swaps)...", file=sys.stderr)
            report["soak"] = await bench.soak()
        if args.scale:
            print("bench: drain-check scale...", file=sys.stderr)
            report["scale"] = await asyncio.to_thread(scale)
    finally:
        bench.cleanup()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=6, help="releases per approach (default 6)")
    parser.add_argument("--rate", type=float, default=100, help="requests per second, open loop (default 100)")
    parser.add_argument("--boot-ms", type=int, default=1000, help="the app's boot delay in ms (default 1000)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds of load between two releases (default 3)")
    parser.add_argument("--idle", type=float, default=60, help="seconds of idle footprint measurement (default 60)")
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="also run N back-to-back swaps (e.g. 200)")
    parser.add_argument("--scale", action="store_true", help="also time the in-flight count with 1k/10k sockets")
    parser.add_argument("--only-soak", action="store_true", help="skip the comparison (with --soak)")
    parser.add_argument("--only-scale", action="store_true", help="skip the comparison (with --scale)")
    parser.add_argument("--only-rollback", action="store_true", help="only the warm vs cold rollback comparison")
    parser.add_argument("--only-ops", action="store_true", help="only the idle footprint with metrics and rotation on/off")
    parser.add_argument("--only-live", action="store_true", help="only the WebSocket clients through releases")
    parser.add_argument("--only-rpc", action="store_true", help="only the TCP and gRPC services through releases")
    parser.add_argument("--only-throughput", action="store_true",
                        help="only requests/s at saturation (wrk) through the runtime switch, hold off and on")
    parser.add_argument("--wrk-seconds", type=float, default=8, help="seconds of each wrk run (default 8)")
    parser.add_argument("--wrk-runs", type=int, default=5, help="wrk runs of each variant, alternating (default 5)")
    parser.add_argument("--ws-clients", type=int, default=500, help="WebSocket clients in the live case (default 500)")
    parser.add_argument("--live-releases", type=int, default=10, help="releases in the live case (default 10)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 2 releases, 3 s idle")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    if args.quick:  # a short run; an explicit --releases still counts
        args.releases = args.releases if "--releases" in sys.argv else 2
        args.idle, args.gap, args.rate = 3.0, 1.5, 40
        args.ws_clients = args.ws_clients if "--ws-clients" in sys.argv else 20
        args.live_releases = args.live_releases if "--live-releases" in sys.argv else args.releases
        args.wrk_seconds = args.wrk_seconds if "--wrk-seconds" in sys.argv else 1
    report = asyncio.run(amain(args))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
