"""TCP services (app.protocol = "tcp"): examples/tcp-app, a framed RPC server whose clients keep
their connections open (a pool), behind the managed nginx's stream module, under load.

After the switch (a tested, confirmed reload of the stream upstream), each pooled connection
to the old build is closed as soon as it is between two calls; a call in flight finishes first."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from clients import Pooled, call
from helpers import ROOT, free_ports, nginx_rewriting, refused_before_start, wait_until

pytestmark = pytest.mark.e2e
TCP = ROOT / "examples" / "tcp-app"
REDIS = ROOT / "examples" / "redis-app"


def tcp_daemon(make_daemon: Any, **kw: Any) -> Any:
    listen = free_ports(1)[0]
    return make_daemon(build=TCP / "v1", listen=listen, command='["python3", "server.py"]', app='protocol = "tcp"',
                       ready='send = "\\u0000\\u0000\\u0000\\u0004PING"\nexpect = "PONG"\ntimeout = 30',
                       nginx=f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 2', **kw)


def drains_of(r: Any) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, r.stdout.splitlines()) if e.get("event") == "drain" and e.get("status") == "done"]


def through_releases(run: Any, builds: tuple[Path, ...], on: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Swap to each build in turn; after each, wait until `on(build name)`. The drains' events."""
    drains = []
    for build in builds:
        r = run.cli("swap", str(build), "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        drains += drains_of(r)
        wait_until(lambda b=build.name: on(b), 60, f"every caller on {build.name}")
    return drains


def test_pooled_connections_move_between_calls_and_a_call_in_flight_is_never_cut(make_daemon: Any) -> None:
    """Pooled clients calling back to back (tests/clients.Pooled: a connection closed before
    any byte of its answer is opened again and the call made again, once, as pools do) and one
    slow call in flight at the switch: the slow call finishes on the old build; every pooled
    connection is moved, and each call a close cost is counted."""
    run = tcp_daemon(make_daemon, drain_timeout=3, stop_timeout=60)
    assert run.status()["nginx"]["switch"] == "reload"
    pool = [Pooled(run.listen_port) for _ in range(8)]
    slow: dict[str, Any] = {}

    def slow_call() -> None:
        with socket.create_connection(("127.0.0.1", run.listen_port), timeout=60) as conn:
            slow["answer"] = call(conn, b"sleep 2000")

    for p in pool:
        p.start()
    try:
        wait_until(lambda: sum(sum(p.versions.values()) for p in pool) >= 100, 60, "calls to flow")
        t = threading.Thread(target=slow_call)
        t.start()
        drains = through_releases(run, (TCP / "v2", TCP / "v1", TCP / "v2"),
                                  lambda b: all(p.versions[b] for p in pool))
        t.join(60)
    finally:
        for p in pool:
            p.close()
    assert slow["answer"] == b"v1 sleep 2000"  # the call in flight finished on the old build
    failures = sum((p.failures for p in pool), Counter())
    assert not failures, failures
    assert all(d["long_lived_left"] == 0 and d["calls_unknown"] == 0 for d in drains), drains
    # every pooled connection was moved: between two calls, or cut at the grace (its call retried)
    assert all(d["closed_between_calls"] + d["calls_cut"] >= len(pool) for d in drains), drains
    # Pooled checks no connection before it sends: each close met its next call, which reached the
    # app (nginx passes it on) and was counted cut; the client opened a connection and called again
    assert sum(d["calls_cut"] for d in drains) == sum(p.reconnects for p in pool), (drains, [p.reconnects for p in pool])
    last = run.status()["last_swap"]
    assert not [w for w in last.get("warnings", []) if w.startswith("stop:")], last  # exited on SIGTERM


@pytest.mark.serial
def test_redis_py_callers_with_their_own_connections_lose_nothing_but_what_never_rests(make_daemon: Any) -> None:
    """The real redis-py, no retries, a connection per caller (its pool lends it, checking it
    first): callers 10 ms apart and slow calls (1.5 s) lose nothing through 3 releases; a caller
    that calls back to back never rests, so its connection is cut at the grace and may lose the
    one call it carried then; and every call that failed is one the drain reported cut."""
    from clients import RedisCallers

    run = make_daemon(example=REDIS / "bluegreen.toml")
    with RedisCallers(run.listen_port, spaced_ms=10, layout="per-caller") as callers:
        wait_until(lambda: callers.all_on("v1") and callers.calls["slow"] >= 2, 60, "every caller on v1")
        drains = through_releases(run, (REDIS / "v2", REDIS / "v1", REDIS / "v2"), callers.all_on)
    print(f"\nredis-py, a connection each: calls {dict(callers.calls)}, failed {dict(callers.failures)}, "
          f"drains {[(d['closed_between_calls'], d['calls_cut'], d['calls_unknown']) for d in drains]}")
    assert callers.failed("spaced", "slow") == 0, (callers.failures, callers.examples)
    assert callers.failed("back-to-back") <= 2 * len(drains), callers.failures  # one per connection, at most
    assert callers.failed() == sum(d["calls_cut"] for d in drains), (callers.failures, drains)
    assert all(d["calls_unknown"] == 0 and d["long_lived_left"] == 0 for d in drains), drains


def test_redis_py_callers_on_one_pool_lose_only_calls_the_drain_reports_cut(make_daemon: Any) -> None:
    """One redis-py ConnectionPool for every caller, as one web app has: its busiest connections
    never rest and are cut at the grace. Whatever fails, the drain reported, call for call."""
    from clients import RedisCallers

    run = make_daemon(example=REDIS / "bluegreen.toml")
    with RedisCallers(run.listen_port, layout="shared") as callers:
        wait_until(lambda: callers.all_on("v1"), 60, "every caller on v1")
        drains = through_releases(run, (REDIS / "v2", REDIS / "v1"), callers.all_on)
    print(f"\nredis-py, one pool: calls {dict(callers.calls)}, failed {dict(callers.failures)}, "
          f"drains {[(d['closed_between_calls'], d['calls_cut'], d['calls_unknown']) for d in drains]}")
    cut = sum(d["calls_cut"] for d in drains)
    assert cut <= callers.failed() <= cut + sum(d["calls_unknown"] for d in drains), (callers.failures, drains)
    r = run.cli("history", "--json")
    swaps = [json.loads(line) for line in r.stdout.splitlines()][-len(drains):]
    for d, swap in zip(drains, swaps):  # history says it too, call for call
        said = [w for w in swap.get("warnings", []) if f"CUT {d['calls_cut']} call(s)" in w]
        assert bool(said) == bool(d["calls_cut"]), swap


def test_a_tcp_service_has_no_preview_and_no_rollout(make_daemon: Any) -> None:
    run = tcp_daemon(make_daemon)
    for args in (["--pause"], ["--rollout", "50,100"]):
        r = run.cli("swap", str(TCP / "v2"), *args)
        assert r.returncode == 2 or r.returncode == 1, r.stdout + r.stderr
        assert "no preview and no rollout" in r.stderr, r.stderr
    assert run.status()["active"]["build"].endswith("/v1")


def test_check_config_names_a_missing_stream_module_before_anything_starts(short_tmp: Path) -> None:
    """An nginx that cannot load Debian's stream module (here the real nginx, given a copy of the
    config whose module path is a file that is no shared object): check-config and the daemon
    name it and what to install."""
    from supervisor.config.host import STREAM_MODULE

    broken = short_tmp / "broken.so"
    broken.write_text("not a shared object\n")
    wrapper = nginx_rewriting(short_tmp, f"s#{STREAM_MODULE}#{broken}#")
    cfg = short_tmp / "tcp.toml"
    cfg.write_text(f'[app]\nprotocol = "tcp"\ncommand = ["python3", "server.py"]\nports = {free_ports(2)}\n'
                   f'build = "{TCP / "v1"}"\n[nginx]\nlisten = "127.0.0.1:{free_ports(1)[0]}"\nbinary = "{wrapper}"\n')
    for err in refused_before_start(cfg):
        assert 'app.protocol: "tcp":' in err and "libnginx-mod-stream" in err, err


def test_a_tcp_service_behind_your_own_nginx_s_stream_block(make_daemon: Any, short_tmp: Path) -> None:
    """External mode, as docs/nginx.md shows it: your nginx's stream {} block includes the
    upstream file bluegreen rewrites, connects from the TCP kind's address, and passes a client's
    bytes on after the app's side closed (proxy_half_close). redis-py callers through two
    releases: those whose connection rests lose nothing; what fails, the drain reported."""
    from clients import RedisCallers
    from helpers import stop_all
    from shapes import stream_nginx

    listen, blue, green = free_ports(3)
    user = stream_nginx(short_tmp, listen, blue, user="root")
    prefix = user.prefix
    try:
        run = make_daemon(build=REDIS / "v1", ports=(blue, green), listen=listen, command='["python3", "../server.py"]',
                          app='protocol = "tcp"', ready='send = "PING\\r\\n"\nexpect = "+PONG"\ntimeout = 30',
                          drain_timeout=3, nginx="\n".join(user.external(prefix / "conf.d" / "myapp.conf", "myapp")))
        with RedisCallers(listen, spaced=2, back_to_back=1, spaced_ms=10, layout="per-caller") as callers:
            wait_until(lambda: callers.all_on("v1"), 60, "every caller on v1")
            drains = through_releases(run, (REDIS / "v2", REDIS / "v1"), callers.all_on)
        assert callers.failed("spaced", "slow") == 0, (callers.failures, callers.examples)
        assert callers.failed() == sum(d["calls_cut"] for d in drains), (callers.failures, drains)
        # the resting ones, each release (most: under load one may still be mid-call at its grace)
        assert sum(d["closed_between_calls"] for d in drains) >= 2 * 2, drains
        stop_all([run])
    finally:
        user.close()


def test_a_call_still_running_at_drain_timeout_is_said_to_be_cut(make_daemon: Any) -> None:
    """A client that sends big calls and reads no answer is never between two calls: at
    drain.timeout its connection is cut with a call in flight, and the drain and the swap's
    record say so."""
    import struct

    run = tcp_daemon(make_daemon, drain_timeout=1, stop_timeout=60)
    conn = socket.create_connection(("127.0.0.1", run.listen_port), timeout=30)
    try:
        payload = b"x" * 1_000_000
        conn.settimeout(0.5)
        for _ in range(20):  # until the answers nobody reads fill every buffer on the way back
            try:
                conn.sendall(struct.pack("!I", len(payload)) + payload)
            except socket.timeout:
                break
        wait_until(lambda: run.status()["active"]["long_lived"] == {"tcp": 1}, 30, "the connection, counted")
        r = run.cli("swap", str(TCP / "v2"), "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        drain = drains_of(r)[0]
        assert drain["calls_cut_in_flight"] == 1 and drain["closed_between_calls"] == 0, drain
        assert "CUT 1 call(s)" in run.status()["last_swap"]["warnings"][0], run.status()["last_swap"]
    finally:
        conn.close()


CLUSTER_JS = r"""
// A line-protocol service under Node's cluster module: the primary holds the listening socket
// and hands each connection to a worker, which alone holds it from then on.
const cluster = require('cluster'), net = require('net');
const version = 'VERSION';
if (cluster.isPrimary) {
  for (let i = 0; i < 2; i++) cluster.fork();
  process.on('SIGTERM', () => { for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM'); });
  cluster.on('exit', () => { if (!Object.keys(cluster.workers).length) process.exit(0); });
} else {
  const server = net.createServer((sock) => {
    let buf = '';
    sock.on('error', () => {});
    sock.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 1);
        sock.write(line === 'PING' ? 'PONG\n' : `${version} ${line}\n`);
      }
    });
  }).listen(Number(process.env.PORT), '127.0.0.1');
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}
"""


class LineCaller(threading.Thread):
    """A caller with its own connection, checked before each call as a pool does, 10 ms apart."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.versions: Counter[str] = Counter()
        self.failed = 0

    def run(self) -> None:
        conn, n = socket.create_connection(("127.0.0.1", self.port), timeout=30), 0
        while not self.stopped.wait(0.01):
            if select.select([conn], [], [], 0)[0] and conn.recv(1, socket.MSG_PEEK) == b"":
                conn.close()  # closed by the server while in the pool: a new one
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            n += 1
            try:
                conn.sendall(f"call {n}\n".encode())
                answer = conn.makefile("rb").readline()
                if not answer:
                    raise ConnectionError("closed mid-call")
                self.versions[answer.split()[0].decode()] += 1
            except OSError:
                self.failed += 1
                conn.close()
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        conn.close()


@pytest.mark.serial  # callers 10 ms apart lose nothing only if the close reaches them within that: not on a loaded machine
def test_a_node_cluster_s_connections_are_found_through_its_workers(make_daemon: Any, short_tmp: Path) -> None:
    """Node's cluster module: the workers hold the connections, not the listening socket. The drain
    finds them by the slot's markers, closes each between two calls, and no call fails."""
    builds = []
    for name in ("v1", "v2"):
        d = short_tmp / "cluster" / name
        d.mkdir(parents=True)
        (d / "cluster.js").write_text(CLUSTER_JS.replace("VERSION", name))
        builds.append(d)
    listen = free_ports(1)[0]
    run = make_daemon(build=builds[0], listen=listen, command='["node", "cluster.js"]', app='protocol = "tcp"',
                      ready='send = "PING\\n"\nexpect = "PONG"\ntimeout = 30', drain_timeout=10,
                      nginx=f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 2')
    callers = [LineCaller(listen) for _ in range(3)]
    for c in callers:
        c.start()
    try:
        wait_until(lambda: all(c.versions["v1"] for c in callers), 60, "every caller on v1")
        drains = through_releases(run, (builds[1],), lambda b: all(c.versions[b] for c in callers))
    finally:
        for c in callers:
            c.stopped.set()
            c.join(30)
    d = drains[0]
    assert d["closed_between_calls"] >= 3 and d["long_lived_left"] == 0 and not d["cut_error"], d
    assert sum(c.failed for c in callers) == 0, ([c.failed for c in callers], d)


def test_pipelined_clients_are_never_said_to_lose_nothing(make_daemon: Any) -> None:
    """drain.tcp_calls = "pipelined": redis-py pipelines of a GET and a slow call (the GET's answer
    looks like a rest while the slow call still runs). No connection is closed in a rest; each
    is closed at the grace, and what may have been lost is said: never fewer than what failed."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    listen = free_ports(1)[0]
    run = make_daemon(example=REDIS / "bluegreen.toml", listen=listen, start=False)
    run.config.write_text(run.config.read_text().replace("[drain]\n", '[drain]\ntcp_calls = "pipelined"\n'))
    run.start()
    stop, failed, done = threading.Event(), Counter(), Counter()

    def pipelines() -> None:
        r = redis.Redis(host="127.0.0.1", port=listen, protocol=2, socket_timeout=30, retry=Retry(NoBackoff(), 0))
        while not stop.wait(0.01):
            try:
                p = r.pipeline(transaction=False)
                p.get("release").execute_command("DEBUG", "SLEEP", "0.2")
                version = p.execute()[0].decode()
                done[version] += 1
            except redis.RedisError as e:
                failed[type(e).__name__] += 1

    threads = [threading.Thread(target=pipelines, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: done["v1"] >= 6, 60, "pipelines on v1")
        drains = through_releases(run, (REDIS / "v2",), lambda b: done[b] >= 6)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    d = drains[0]
    assert d["closed_between_calls"] == 0, d  # no rest is proven: none is called clean
    assert sum(failed.values()) <= d["calls_cut"] + d["calls_unknown"] + d["closed_unconfirmed"], (failed, d)
    assert d["calls_unknown"] + d["calls_cut"] >= 1, d


def test_a_drain_the_daemon_was_killed_in_is_finished_from_the_switch_and_its_cuts_recorded(make_daemon: Any) -> None:
    """The daemon is killed (-9) as its TCP drain begins, callers back to back still on the old
    build. The next daemon finishes the drain within what was left of the grace since the switch
    (before nginx's own backstop, worker_shutdown_timeout, cuts the old workers' sessions, which
    no one would count), and history records what it cut: every failed call."""
    from clients import RedisCallers
    from test_faults import swap_and_kill_daemon_at

    run = make_daemon(example=REDIS / "bluegreen.toml")
    with RedisCallers(run.listen_port, spaced=0, back_to_back=2, slow=0, layout="per-caller") as callers:
        wait_until(lambda: callers.all_on("v1"), 60, "every caller on v1")
        saved = swap_and_kill_daemon_at(run, REDIS / "v2", "drain")
        assert saved["swap"]["switched_at"] > 0, saved["swap"]
        run.start()
        wait_until(lambda: callers.all_on("v2"), 60, "every caller on v2")
        wait_until(lambda: (run.status() or {}).get("retiring") is None, 60, "the old build drained and stopped")
    r = run.cli("history", "--json")
    swap = [json.loads(line) for line in r.stdout.splitlines()][-1]
    assert "the next daemon finished it" in " ".join(swap["warnings"]), swap
    said = [w for w in swap["warnings"] if "CUT" in w]
    assert callers.failed() == (int(said[0].split("CUT ")[1].split()[0]) if said else 0), (callers.failures, swap)
