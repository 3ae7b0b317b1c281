"""The drain's own rows of the failure matrix (tests/failure_matrix.py DRAIN_ROWS): connections of
one kind open to the old build (WebSockets, event streams on a listed path, a TCP service's
pooled connections, gRPC streams on a listed path) while a swap drains, each fault put there.

The swap is held as its drain begins (the daemon's test-only hold, BLUEGREEN_FAULT_HOLD), with
the kind's clients on the old build; the fault is put, the drain let go; then what users get once
things settled (which build serves, the swap's exit code), that the kind's clients came back to
it, and, for a TCP service, that no call failed that the drain did not report.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from clients import RedisCallers
from failure_matrix import DRAIN_ROWS, FAULTS, ONLY_ON, OUTCOMES, Outcome
from helpers import (ROOT, DaemonRun, EventStream, WebSocketClient, answering, free_ports, managed_nginx, running,
                     wait_until)
from shapes import SHAPES, UserNginx, app_build, start_on, stop_with_nginx, stream_nginx
from test_phase_faults import COMMON, READY, Held, let_go, nothing_left, operations_checked, put, state_disk  # noqa: F401

pytestmark = pytest.mark.e2e
REDIS = ROOT / "examples" / "redis-app"
GRPC = ROOT / "examples" / "grpc-app"
GRACE = 2  # drain.timeout: the grace the kind's connections get


@dataclass
class Clients:
    """The kind's clients on one daemon: `on(build)` says whether they all get answers from it."""

    on: Callable[[str], bool]
    close: Callable[[], None]
    checked: Callable[[str], None] = lambda build: None  # the kind's own check, once things settled
    extra: dict[str, Any] = field(default_factory=dict)


# --- each row's service, clients and shapes

def http_service(row: str) -> Callable[..., tuple[DaemonRun, UserNginx | None]]:
    def start(shape: str, make_daemon: Any, d: Path, releases: Path, env: dict[str, str]) -> Any:
        return start_on(shape, make_daemon, d, app_build(releases, "v1"), COMMON, env=env, drain_timeout=GRACE,
                        stop_timeout=5, ready=READY, drain='long_lived_paths = ["/events"]')
    return start


def websocket_clients(run: DaemonRun) -> Clients:
    sock = WebSocketClient(run.listen_port)
    sock.start()

    def checked(build: str) -> None:
        assert sock.lost() == [], sock.lost()[:10]  # no message lost within a connection

    return Clients(lambda b: bool(sock.messages) and sock.messages[-1][1] == b, sock.close, checked)


def event_clients(run: DaemonRun) -> Clients:
    stream = EventStream(run.listen_port)
    stream.start()

    def checked(build: str) -> None:
        assert stream.lost() == [], stream.lost()[:10]  # no event lost across the reconnections

    return Clients(lambda b: bool(stream.events) and stream.events[-1][0] == b, stream.close, checked)


def tcp_service(shape: str, make_daemon: Any, d: Path, releases: Path, env: dict[str, str]) -> Any:
    """examples/redis-app, as its own config says it (the grace shortened), behind the managed
    nginx's stream module, or your own nginx's stream block (shape "debian")."""
    listen, blue, green = free_ports(3)
    user = stream_nginx(d, listen, blue) if shape == "debian" else None
    nginx = ("\n".join(user.external(user.prefix / "conf.d" / "myapp.conf", "myapp")) if user is not None
             else f'listen = "127.0.0.1:{listen}"')
    run = make_daemon(start=False, ports=(blue, green), listen=listen, build=REDIS / "v1", app='protocol = "tcp"',
                      command='["python3", "../server.py"]', ready='send = "PING\\r\\n"\nexpect = "+PONG"\ntimeout = 30',
                      drain_timeout=GRACE, stop_timeout=5, nginx=nginx)
    try:
        return run.start(env={**env, "BOOT_MS": "200"}), user
    except BaseException:
        if user is not None:
            user.close()
        raise


def tcp_clients(run: DaemonRun) -> Clients:
    callers = RedisCallers(run.listen_port, spaced=2, back_to_back=1, slow=0, spaced_ms=10, layout="per-caller")
    callers.__enter__()
    return Clients(callers.all_on, callers.close, extra={"callers": callers})


def grpc_service(shape: str, make_daemon: Any, d: Path, releases: Path, env: dict[str, str]) -> Any:
    listen = free_ports(1)[0]
    run = make_daemon(start=False, build=GRPC / "v1", listen=listen, nginx=managed_nginx(listen, "runtime"),
                      command=f'["{sys.executable}", "server.py"]', app='protocol = "grpc"',
                      ready='grpc_service = ""\ntimeout = 30', drain_timeout=GRACE, stop_timeout=5,
                      drain='long_lived_paths = ["/example.Echo/Ticks"]')
    return run.start(env=env), None


TICKS = """
import sys, time, grpc
while True:
    try:
        with grpc.insecure_channel(sys.argv[1]) as channel:
            for m in channel.unary_stream("/example.Echo/Ticks")(b"", timeout=300):
                print(m.decode().split()[0], flush=True)
    except grpc.RpcError:
        time.sleep(0.1)  # a client calls again a moment later
"""


def grpc_clients(run: DaemonRun) -> Clients:
    """A streaming caller that calls again when its stream ends, in a process of its own (a test
    that forks the CLI must not hold grpcio's threads)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", TICKS, f"127.0.0.1:{run.listen_port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    got: list[str] = []

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            got.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def close() -> None:
        os.killpg(proc.pid, 9)
        proc.wait(30)
        reader.join(30)

    return Clients(lambda b: bool(got) and got[-1] == b, close)


@dataclass(frozen=True)
class Row:
    start: Callable[..., tuple[DaemonRun, UserNginx | None]]
    clients: Callable[[DaemonRun], Clients]
    shapes: tuple[str, ...]
    builds: Callable[[Path], tuple[Path, Path]]


ROWS = {
    "drain: WebSocket": Row(http_service("ws"), websocket_clients, SHAPES,
                            lambda releases: (releases / "v1", app_build(releases, "v2"))),
    "drain: event stream": Row(http_service("events"), event_clients, SHAPES,
                               lambda releases: (releases / "v1", app_build(releases, "v2"))),
    "drain: TCP pool": Row(tcp_service, tcp_clients, SHAPES, lambda releases: (REDIS / "v1", REDIS / "v2")),
    "drain: gRPC stream": Row(grpc_service, grpc_clients, ("managed",), lambda releases: (GRPC / "v1", GRPC / "v2")),
}
assert set(ROWS) == set(DRAIN_ROWS)


def cells() -> list[Any]:
    return [pytest.param(row, fault, shape, id=f"{row.split(': ')[1].replace(' ', '_')}-{fault}-{shape}")
            for (row, fault) in OUTCOMES if row in ROWS
            for shape in ROWS[row].shapes if ONLY_ON.get(fault, shape) == shape]


@pytest.fixture
def daemons(make_daemon: Any) -> Iterator[list[tuple[DaemonRun, UserNginx | None]]]:
    started: list[tuple[DaemonRun, UserNginx | None]] = []
    yield started
    stop_with_nginx(started)


@pytest.mark.parametrize("row, fault, shape", cells())
def test_a_drain_meets_a_fault(row: str, fault: str, shape: str, state_disk: Path, make_daemon: Any,
                               daemons: list[Any], releases: Path, short_tmp: Path) -> None:
    want: Outcome = OUTCOMES[row, fault]
    spec = ROWS[row]
    gate = short_tmp / "gate"
    run, user = spec.start(shape, make_daemon, short_tmp, releases, {"BLUEGREEN_FAULT_HOLD": f"drain:{gate}"})
    daemons.append((run, user))
    clients = spec.clients(run)
    try:
        wait_until(lambda: clients.on("v1"), 60, "the clients on v1", run.output)
        held = Held(run, user, gate, row, old=run.status()["active"]["pid"])
        held.swap = run.cli_background("swap", str(spec.builds(releases)[1]))
        wait_until(lambda: run.phase() == "drain", 60, "the swap to reach its drain",
                   lambda: run.output() + ("" if held.swap.poll() is None else "\nswap: " + held.swap.communicate()[0]))
        put(held, fault)
        code = let_go(held, fault)
        if fault == "sigterm":
            nothing_left(run)
        elif fault == "kill9":
            run.start(env={"BOOT_MS": "200"})  # the next daemon
        (state_disk / "filler").unlink(missing_ok=True)
        if want.exit is not None:
            assert code == want.exit, f"{FAULTS[fault]} in {row}: exit {code}\n{run.output()}"
        if want.serves is None:
            return
        operations_checked(held, fault)
        if fault in ("new_frozen", "active_frozen"):  # found hung (and replaced), or stopped: killed either way
            wait_until(lambda: not running(held.victim), 120, "the frozen build to be killed", run.output)

        def settled() -> bool:
            st = run.status()
            return bool(st and st["daemon"]["status"] == "serving" and not (st.get("swap") or {}).get("phase")
                        and st["active"]["alive"] and st["active"]["pid"] != held.victim
                        and Path(st["active"]["build"]).name == want.serves
                        and (row not in ("drain: WebSocket", "drain: event stream")
                             or answering(run.listen_port, {want.serves: 4})))

        wait_until(settled, 120, f"the daemon to serve {want.serves}, no swap running", run.output)
        wait_until(lambda: clients.on(want.serves), 120, f"the clients back on {want.serves}", run.output)
        clients.checked(want.serves)
        if "callers" in clients.extra:
            tcp_checked(run, clients.extra["callers"], fault)
    finally:
        clients.close()


# Faults that touch nothing on the connections' way: every call a TCP client lost there is one
# the drain reported (cut, or said to be possibly lost).
QUIET = ("kill9", "reload", "disk_full", "logs_removed", "state_damaged", "second_daemon", "active_frozen")


def tcp_checked(run: DaemonRun, callers: RedisCallers, fault: str) -> None:
    if fault not in QUIET:
        return
    drain = (run.status()["last_swap"].get("details") or {}).get("drain") or {}
    said = drain.get("calls_cut", 0) + drain.get("calls_unknown", 0) + drain.get("closed_unconfirmed", 0)
    if fault == "kill9" and drain.get("uncounted_before_the_kill"):  # its closes died with its counts: said so
        warnings = run.status()["last_swap"].get("warnings") or []
        assert any("not in these counts" in w for w in warnings), warnings
        return
    assert callers.failed() <= said, (callers.failures, drain)
