"""Every phase meets every fault (the README's failure matrix, tests/failure_matrix.py): a real
daemon on each nginx shape is held in one phase of a swap, the fault is put there, the phase is
let go, and the test checks what users get once things settled: which build answers every
request, the swap's exit code, what status says, and (at teardown) that nothing is left running.

How a phase is held:
- prepare, start, ready, check, switch, commit: the daemon's test-only hold (supervisor/faults.py,
  BLUEGREEN_FAULT_HOLD): the phase has begun, its action waits for a gate file;
- before_switch, after_switch: a hook that waits for the gate;
- paused: `swap --pause` (let go: `promote`); rollout step: `--rollout 50,100` with a verdict that
  never comes (let go: `promote`); watch: `release.watch_seconds`;
- drain: a request in flight to the old build, answered once the gate opens;
- stop: an old build whose SIGTERM waits for the gate;
- warm window: `release.keep_warm`, after a swap; idle: no swap; spare: no swap, `app.spare` on
  and its spare ready (the "new build" columns kill or freeze the spare).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from failure_matrix import DRAIN_ROWS, FAULTS, NO_SWAP, ONLY_ON, OUTCOMES, SETTLED, UNTIL_COMMIT, Outcome
from helpers import DaemonRun, EventStream, answering, describe, free_ports, http_get, running, wait_until
from shapes import SHAPES, UserNginx, app_build
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e

HELD_BY_THE_DAEMON = ("prepare", "start", "ready", "check", "switch", "commit")
STATUS_PHASE = {"rollout step": "rollout"}  # the matrix's row name -> the phase status reports
COMMON = """
[app.health]
url = "http://127.0.0.1:{port}/health"
interval = 0.5
timeout = 0.5
failures = 3
[app.restart]
backoff = 0.2
"""


def cells() -> list[Any]:
    """The swap's phases (the drain's own rows are tests/test_drain_faults.py's)."""
    return [pytest.param(phase, fault, shape, id=f"{phase.replace(' ', '_')}-{fault}-{shape}")
            for (phase, fault) in OUTCOMES if phase not in DRAIN_ROWS
            for shape in SHAPES if ONLY_ON.get(fault, shape) == shape]


@dataclass
class Held:
    """One phase held: the daemon, the user's nginx (debian shape), the swap's client, the pids."""

    run: DaemonRun
    user: UserNginx | None
    gate: Path
    phase: str
    old: int
    old_port: int = 0
    swap: subprocess.Popen[str] | None = None
    victim: int = 0  # the build killed or frozen
    in_flight: list[Any] = field(default_factory=list)
    copy: str = ""  # what a copied config's daemon said
    stream: EventStream | None = None  # the long-lived column's client

    def new(self) -> int:
        """The new build's pid: the standby until the commit, the active build after it."""
        st = self.run.status()
        assert st is not None
        if self.phase == "spare":
            return int(st["spare"]["pid"])
        for key in ("standby", "active", "warm"):
            if st.get(key) and st[key]["build"].endswith("/v2"):
                return int(st[key]["pid"])
        raise AssertionError(f"no new build in {st}")

    def master(self) -> int:
        if self.user is not None:
            assert self.user.master is not None
            return self.user.master.pid
        st = self.run.status()
        assert st is not None
        return int(st["nginx"]["master_pid"])


def hold(shape: Callable[..., Any], releases: Path, gate: Path, phase: str,
         before_swap: Callable[[DaemonRun], None] = lambda run: None) -> Held:
    """Start a daemon (v1) on this shape, call `before_swap`, and bring a swap to v2 into `phase`,
    held there."""
    extra, env, args = COMMON, {}, []
    hook = gate.parent / "hook.sh"
    hook.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n")
    hook.chmod(0o755)
    if phase in HELD_BY_THE_DAEMON:
        env["BLUEGREEN_FAULT_HOLD"] = f"{phase}:{gate}"
    if phase == "check":
        extra += '[[release.checks]]\npath = "/health"\ntimeout = 2\n'
    if phase in ("before_switch", "after_switch"):
        extra += f'[hooks]\n{phase} = ["{hook}"]\n'
    if phase == "paused":
        args = ["--pause"]
    if phase == "rollout step":
        extra += "[rollout]\nmin_requests = 100000\n"
        args = ["--rollout", "50,100", "--step", "600"]
    if phase == "watch":
        extra += "[release]\nwatch_seconds = 8\n[rollout]\nmin_requests = 100000\n"
    if phase == "warm window":
        extra += "[release]\nkeep_warm = 600\n"
    drain = 12 if phase == "drain" else 5  # the drain hold: time to put the fault, a frozen old build waited out
    build = app_build(releases, "v1", gate=gate, stop_gate=phase == "stop")
    run, user = shape(extra, build=build, env=env, drain_timeout=drain, stop_timeout=15 if phase == "stop" else 5,
                      ready=READY, drain='long_lived_paths = ["/events"]',  # the long-lived column's stream
                      app="spare = true" if phase == "spare" else "")
    st = run.status()
    held = Held(run, user, gate, phase, old=st["active"]["pid"], old_port=st["active"]["port"])
    before_swap(run)
    if phase == "holding":  # `pause`, a request held in nginx (answered once `resume`d, in let_go)
        r = run.cli("pause", "--hold", "55")
        assert r.returncode == 0, r.stdout + r.stderr
        threading.Thread(target=lambda: held.in_flight.append(http_get(run.listen_port, "/", timeout=180)),
                         daemon=True).start()
        wait_until(lambda: (run.status()["hold"] or {}).get("holding") == 1, 30, "a request held")
        return held
    if phase == "spare":
        spare_ready(run)
    if phase in ("idle", "spare"):
        return held
    if phase == "drain":  # a request the old build answers once the gate opens
        t = threading.Thread(target=lambda: held.in_flight.append(http_get(run.listen_port, "/gate", timeout=120)),
                             daemon=True)
        t.start()
        wait_until(lambda: gate.with_suffix(".v1").exists(), 30, "the old build to have the request")
    v2 = app_build(releases, "v2", gate=gate)
    if phase == "paused":
        r = run.cli("swap", str(v2), "--pause")
        assert r.returncode == 0, r.stdout + r.stderr
        return held
    held.swap = run.cli_background("swap", str(v2), *args)
    if phase == "warm window":
        out, err = held.swap.communicate(timeout=120)
        assert held.swap.returncode == 0, out + err
        held.swap = None
        assert run.status()["warm"]["pid"] == held.old
        return held
    want = STATUS_PHASE.get(phase, phase)
    wait_until(lambda: run.phase() == want, 60, f"the swap to reach {phase}", run.output)
    if phase == "rollout step":
        wait_until(lambda: (st := run.status()) and st["rollout"] and st["rollout"]["share"] == 50, 30, "step 1")
    return held


READY = 'url = "http://127.0.0.1:{port}/health"\ntimeout = 5\ninterval = 0.05'


def spare_ready(run: DaemonRun, not_pid: int = 0) -> int:
    """Wait until the spare (another process than `not_pid`) is ready and the daemon serves: its pid."""
    def ready() -> int | None:
        st = run.status()
        sp = st and st.get("spare")
        ok = sp and sp["state"] == "ready" and sp["alive"] and sp["pid"] != not_pid and st["daemon"]["status"] == "serving"
        return int(sp["pid"]) if ok else None
    return wait_until(ready, 90, "the spare to be ready", run.output)


def group(pid: int, sig: signal.Signals) -> None:
    os.killpg(os.getpgid(pid), sig)


def put(held: Held, fault: str) -> None:
    """The fault, as it happens on a real host."""
    run = held.run
    if fault == "kill9":
        run.kill()
    elif fault == "sigterm":
        assert run.proc is not None
        run.proc.send_signal(signal.SIGTERM)
    elif fault == "master":
        master = held.master()
        os.kill(master, signal.SIGKILL)
        wait_until(lambda: (st := run.status()) and st["nginx"].get("master_pid") not in (None, master), 60,
                   "the daemon to restart its nginx", run.output)
    elif fault == "worker":  # one that serves (not an old one still shutting down after a reload)
        master = held.master()
        before = serving_workers(master)
        os.kill(min(before), signal.SIGKILL)
        wait_until(lambda: serving_workers(master) - before, 30, "the master to fork another")
    elif fault == "reload":
        master = held.master()
        before = {c.pid for c in psutil.Process(master).children()}
        os.kill(master, signal.SIGHUP)
        wait_until(lambda: {c.pid for c in psutil.Process(master).children()} - before, 30, "new workers")
    elif fault == "restart":
        assert held.user is not None
        held.user.stop()
        time.sleep(0.5)  # the scenario: nginx down for a moment (a restart that takes its time)
        held.user.start()
    elif fault == "disk_full":  # the state_dir's disk: state.json, logs, the managed nginx's files
        r = subprocess.run(["dd", "if=/dev/zero", f"of={held.run.dir / 'run' / 'filler'}", "bs=4k"],
                           capture_output=True, text=True)
        assert "No space left on device" in r.stderr, r.stderr
    elif fault == "logs_removed":
        shutil.rmtree(run.dir / "run" / "logs")
    elif fault == "state_damaged":  # cut short in place (same file), and a pasted line with no end
        (run.dir / "run" / "state.json").write_bytes(b'{"version": 1, "active": {"slot": "blu')
        with open(run.dir / "run" / "history.jsonl", "ab") as f:
            f.write(b"pasted by mistake")
    elif fault == "second_daemon":
        held.copy = copied_daemon(run)
    elif fault == "long_lived":  # opened before the swap; until the drain it stays on the old build
        assert held.stream is not None
        if held.phase in UNTIL_COMMIT:
            at = len(held.stream.events)
            wait_until(lambda: len(held.stream.events) > at + 2, 30, "events while the phase is held")
            assert {v for v, _ in held.stream.events} == {"v1"}, held.stream.events[-3:]
    elif fault in ("active_killed", "active_frozen", "new_killed", "new_frozen"):
        held.victim = held.old if fault.startswith("active") else held.new()
        group(held.victim, signal.SIGKILL if fault.endswith("killed") else signal.SIGSTOP)
    else:
        raise AssertionError(fault)


# The phases where the active build's crash leaves nothing to answer until the swap (or the crash
# restart) switches: a request that arrives meanwhile is held by nginx, not refused.
HELD_AFTER_A_CRASH = ("prepare", "start", "ready", "before_switch", "check", "paused", "rollout step", "idle", "spare")


def asked_after_the_crash(held: Held) -> tuple[threading.Thread, list[tuple[int, str]]]:
    """A request sent once the killed build is gone (its port refuses: its pid may be gone a moment
    before all of its group), answered in a thread: (the thread, its answer)."""
    wait_until(lambda: not sockets.listening(held.old_port), 10, "the killed build's port to close")
    answer: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: answer.append(http_get(held.run.listen_port, "/", timeout=90)))
    thread.start()
    return thread, answer


def copied_daemon(run: DaemonRun) -> str:
    """A second daemon on a copy of this config (its own state_dir and app ports, the same nginx),
    as a colleague starts one for another app; what it said, once refused."""
    copy = run.dir / "copy"
    copy.mkdir()
    ports = free_ports(2)
    (copy / "bluegreen.toml").write_text(re.sub(r"^ports = \[\d+, \d+\]$", "ports = [{}, {}]".format(*ports),
                                                run.config.read_text(), flags=re.M))
    other = DaemonRun(dir=copy, config=copy / "bluegreen.toml", listen_port=run.listen_port, ports=(ports[0], ports[1]))
    other.start(wait=False)
    assert other.proc is not None
    try:
        code = other.proc.wait(60)
    finally:
        if other.proc.poll() is None:
            other.kill()
    assert code == 1, other.output()
    assert "starting" not in other.output() and other.leftovers() == [], other.output()  # it started nothing
    return other.output()


def serving_workers(master: int) -> set[int]:
    """The workers of the current generation: titled as serving, the same set over 0.3 s (for
    nginx's first moments after a reload both generations are titled alike)."""
    from supervisor.processes.procs import title

    def now() -> set[int]:
        return {c.pid for c in psutil.Process(master).children() if "shutting down" not in (title(c.pid) or "")}

    def stable() -> set[int] | None:
        first = now()
        time.sleep(0.3)
        return first if first and now() == first else None

    return wait_until(stable, 30, "nginx's serving workers")


def let_go(held: Held, fault: str) -> int | None:
    """Open the gate, and promote a rollout, or a paused swap (unless the old build's fault ends the
    pause first: nobody decides while it is found dead or hung); the swap's exit code, if a client waits."""
    code = None
    if held.phase == "drain" and fault == "new_killed" and held.swap is not None:
        # Back to the old build at once: not once the request the drain waits for has ended.
        held.swap.communicate(timeout=180)
        code, held.swap = held.swap.returncode, None
    held.gate.touch()
    if held.phase == "holding" and fault not in ("kill9", "sigterm"):  # (the next daemon resumes; a stop does)
        r = held.run.cli("resume")
        assert r.returncode == 0, r.stdout + r.stderr
    ends_itself = ("kill9", "sigterm") + (("active_killed", "active_frozen") if held.phase == "paused" else ())
    if held.phase in ("paused", "rollout step") and fault not in ends_itself:
        r = held.run.cli("promote")
        code = r.returncode if held.phase == "paused" else None
    if held.swap is not None:
        held.swap.communicate(timeout=180)
        code = held.swap.returncode
    return code


def nothing_left(run: DaemonRun) -> None:
    """After the daemon's own shutdown: no app, no hook, no managed nginx (the user's nginx stays)."""
    assert run.proc is not None
    assert run.proc.wait(90) == 0, run.output()
    run.seen |= {c.pid for c in run.children()}
    wait_until(lambda: not [p for p in {*run.seen, *run.leftovers()} - run.not_ours if running(p)], 15,
               "every process of the daemon to end",
               lambda: "; ".join(f"{p} {describe(p)}" for p in {*run.seen, *run.leftovers()} if running(p)))


def operations_checked(held: Held, fault: str) -> None:
    """The operations columns: what comes back, what is refused."""
    run, state = held.run, held.run.dir / "run"
    if fault == "logs_removed":  # a line after the removal (SIGHUP logs one) lands in a daemon.log again
        assert run.proc is not None
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP" in read(state / "logs" / "daemon.log"), 30, "daemon.log to come back")
    elif fault == "state_damaged":
        from supervisor.state import State

        def whole() -> bool:
            try:
                return State.from_json((state / "state.json").read_bytes()).active is not None
            except (OSError, ValueError, TypeError, KeyError):
                return False

        wait_until(whole, 30, "state.json to be written again", run.output)
        r = run.cli("history", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        if held.phase not in NO_SWAP:  # the swap's own line is whole, not glued to the pasted one
            assert json.loads(r.stdout.splitlines()[-1])["to"].endswith("/v2"), r.stdout
        if held.phase in SETTLED:  # nothing else wrote it: the daemon saw the damage
            assert "written again" in read(state / "logs" / "daemon.log"), run.output()
    elif fault == "second_daemon":
        owner = "upstream" if held.user is not None else str(run.listen_port)
        assert owner in held.copy, held.copy


def stream_checked(held: Held, serves: str) -> None:
    """The long-lived column: the stream goes on from the build that serves, and lost no event;
    the old build, if the swap stopped it, exited on its stop signal (the drain closed the stream)."""
    stream = held.stream
    assert stream is not None
    wait_until(lambda: stream.events and stream.events[-1][0] == serves, 60, f"the stream to get events from {serves}")
    stream.close()
    assert stream.lost() == [], stream.lost()[:10]
    last = held.run.status()["last_swap"]
    assert not [w for w in (last or {}).get("warnings", []) if w.startswith("stop:")], last  # no SIGKILL


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def state_disk(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Path]:
    """For the disk-full column: the daemon's state_dir on its own small tmpfs (set up before the
    daemon, unmounted after it stopped)."""
    mnt = short_tmp / "run"
    if request.node.callspec.params.get("fault") != "disk_full":
        yield mnt
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("phase, fault, shape", cells(), indirect=["shape"])
def test_a_phase_meets_a_fault(phase: str, fault: str, state_disk: Path, shape, releases: Path,
                               short_tmp: Path) -> None:
    want: Outcome = OUTCOMES[phase, fault]
    stream: list[EventStream] = []

    def open_stream(run: DaemonRun) -> None:
        stream.append(EventStream(run.listen_port))
        stream[0].start()
        wait_until(lambda: len(stream[0].events) >= 3, 30, "the stream to flow")

    held = hold(shape, releases, short_tmp / "gate", phase, open_stream if fault == "long_lived" else lambda run: None)
    held.stream = stream[0] if stream else None
    put(held, fault)
    after_the_crash = asked_after_the_crash(held) if fault == "active_killed" and phase in HELD_AFTER_A_CRASH else None
    code = let_go(held, fault)
    if fault == "sigterm":
        nothing_left(held.run)
    elif fault == "kill9":
        held.run.start()  # the next daemon
    (state_disk / "filler").unlink(missing_ok=True)  # the disk-full column: space again, once the swap ended
    if want.exit is not None:
        assert code == want.exit, f"{FAULTS[fault]} in {phase}: exit {code}\n{held.run.output()}"
    if want.serves is None:
        return
    run = held.run
    operations_checked(held, fault)
    if fault == "new_frozen" or (fault == "active_frozen" and phase != "warm window"):  # found hung, or left: killed
        wait_until(lambda: not running(held.victim), 120, "the frozen build to be killed", run.output)

    def settled() -> bool:
        """No swap or recovery runs, the daemon serves `want`, and so does every request (a build
        killed a moment ago may not be noticed yet: then this is not true yet)."""
        st = run.status()
        return bool(st and st["daemon"]["status"] == "serving" and not (st.get("swap") or {}).get("phase")
                    and st["active"]["alive"] and st["active"]["pid"] != held.victim
                    and st["active"]["build"].endswith(f"/{want.serves}")
                    and answering(run.listen_port, {want.serves: 4}))

    wait_until(settled, 120, f"the daemon to serve {want.serves} to every request, no swap running", run.output)
    if phase == "holding" and fault not in ("master", "worker", "restart"):  # (those end their own connections)
        wait_until(lambda: held.in_flight, 60, "the held request to be answered")
        # (active_frozen: resumed into the hung app's queue, unread; handed to the hold server once found hung)
        assert held.in_flight == [(200, f"hello from {want.serves}\n")], held.in_flight
    if after_the_crash is not None:  # held in nginx, then answered by the build that serves next
        after_the_crash[0].join(60)
        assert after_the_crash[1] == [(200, f"hello from {want.serves}\n")], after_the_crash[1]
    if held.stream is not None:
        stream_checked(held, want.serves)
    if phase == "spare":  # whatever happened, a spare is ready again (not the build killed or frozen)
        spare_ready(run, not_pid=held.victim)
    if phase == "drain" and fault in ("sigterm", "reload", "new_killed", "new_frozen"):
        wait_until(lambda: held.in_flight, 60, "the request in flight to be answered")
        assert held.in_flight == [(200, "v1 gate\n")], held.in_flight  # the drain lost nothing
    if phase == "warm window":  # whatever happened to the warm build, rollback brings the old build back
        r = run.cli("rollback")
        assert r.returncode == 0, r.stdout + r.stderr
        assert answering(run.listen_port, {"v1": 4}), run.output()
