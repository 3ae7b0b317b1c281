"""A crash costs no request that arrives after it: nginx holds what no build can answer (the
runtime switch's hold server), sends it on to the build that answers next, and counts what the
dead app took with it. Run on both nginx shapes, with real clients (httpx)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import HttpxClients, Load, running, wait_until
from shapes import app_build
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e


def restarted(run: Any, pid: int) -> dict[str, Any]:
    """The status once the crash restart of `pid` serves, with its `restarted` event."""
    def done() -> dict[str, Any] | None:
        st = run.status()
        ok = st and st["daemon"]["status"] == "serving" and st["active"]["pid"] != pid and st["active"]["alive"] \
            and any(e["event"] == "restarted" for e in st["events"])
        return st if ok else None
    return wait_until(done, 60, "the crash restart to serve", run.output)


def crash(run: Any) -> tuple[int, float]:
    """SIGKILL the active app and wait until it is gone, its port refusing: (its pid, when)."""
    active = run.status()["active"]
    os.kill(active["pid"], signal.SIGKILL)
    wait_until(lambda: not running(active["pid"]) and not sockets.listening(active["port"]), 10, "the app to die")
    return active["pid"], time.time()


def crash_under_load(run: Any) -> tuple[Counter[str], float, float, dict[str, Any], dict[str, Any]]:
    """Clients through a SIGKILL of the active app until the restart serves them: four on fresh
    connections, and two httpx clients on kept-alive ones (what users run); one request in five
    slow. (Every failure by kind, when the last failed one was sent, when the app died, the status
    then, the restart's `hold`.)"""
    with Load(run.listen_port, clients=4, slow_every=5, slow_ms=300) as load, \
            HttpxClients(run.listen_port, clients=2) as pooled:
        wait_until(lambda: load.ok >= 20 and pooled.ok >= 20, 30, "load to flow")
        pid, dead_at = crash(run)
        st = restarted(run, pid)
        after = load.total + pooled.ok
        wait_until(lambda: load.total + pooled.ok >= after + 20, 30, "requests after the restart")
    failures = load.failures + Counter({f"httpx {k}": n for k, n in pooled.failures.items()})
    return (failures, max(load.last_failure_at, pooled.last_failure_at), dead_at, st,
            next(e for e in st["events"] if e["event"] == "restarted")["hold"])


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def call() -> None:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 (said by the assertion that reads it)
            out.append(e)
    t = threading.Thread(target=call)
    t.start()
    return t, out


def test_a_crash_under_load_fails_only_the_requests_the_dead_app_had(shape: Any, releases: Path) -> None:
    """Clients without pause through a SIGKILL of the active app, its replacement booting for
    0.5 s: no request sent after the app died fails; those that failed are exactly the ones nginx
    counted lost (sent to the app before it died), and the restart's record says what was held."""
    run, _ = shape(build=app_build(releases, "v1", boot_ms=500))
    failures, last_failure_at, dead_at, _, hold = crash_under_load(run)
    assert last_failure_at <= dead_at, (dict(failures), last_failure_at, dead_at)
    assert sum(failures.values()) == hold["lost"], (dict(failures), hold)
    assert hold["held"] >= 4 and hold["hold_timeouts"] == 0 and hold["still_held"] == 0, hold  # a boot of 0.5 s
    assert hold["held_longest"] >= 0.4, hold
    entry = json.loads(run.cli("history", "--json").stdout.splitlines()[-1])
    assert entry["reason"] == "recover" and entry["held"] == hold, entry
    assert f"held {hold['held']} request(s)" in run.cli("history").stdout


def test_a_post_that_arrives_during_a_crash_reaches_the_next_build_with_its_body(shape: Any,
                                                                                 releases: Path) -> None:
    """A request the dead app never saw is retried whatever its method: a POST sent while the
    replacement boots is answered by it, its body intact."""
    run, _ = shape(build=app_build(releases, "v1", boot_ms=800))
    pid, _ = crash(run)
    r = httpx.post(f"http://127.0.0.1:{run.listen_port}/echo", content=b"order=42", timeout=30)
    assert (r.status_code, r.text) == (200, "v1 POST order=42\n")
    restarted(run, pid)


def test_a_request_held_past_hold_timeout_gets_503_with_retry_after(shape: Any, releases: Path) -> None:
    """A replacement that boots for longer than hold.timeout: a request held so long is told to
    come back (503, Retry-After) rather than left hanging, and counted; the next ones are served."""
    run, _ = shape("[hold]\ntimeout = 1\n", build=app_build(releases, "v1", boot_ms=3000))
    pid, _ = crash(run)
    t0 = time.monotonic()
    r = httpx.get(f"http://127.0.0.1:{run.listen_port}/api/x", timeout=30)  # (the Debian shape's /api/ keeps
    waited = time.monotonic() - t0                                          # nginx's own error pages out)
    assert r.status_code == 503 and r.headers.get("retry-after") == "5", (r.status_code, r.headers)
    assert 1 <= waited < 10, waited
    st = restarted(run, pid)
    hold = next(e for e in st["events"] if e["event"] == "restarted")["hold"]
    assert hold["hold_timeouts"] >= 1 and hold["held_longest"] >= 1, hold  # a timed-out wait is a wait too
    assert httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30).text == "hello from v1\n"


@pytest.mark.parametrize("retry", [False, True], ids=["by default", "retry_idempotent"])
def test_what_the_dead_app_had_is_lost_unless_idempotent_and_allowed(shape: Any, releases: Path,
                                                                     retry: bool) -> None:
    """A GET and a POST inside the app when it dies: the POST is lost (502, counted); the GET too,
    unless hold.retry_idempotent lets nginx send it again to the next build."""
    run, _ = shape("[hold]\nretry_idempotent = true\n" if retry else "", build=app_build(releases, "v1"))
    base = f"http://127.0.0.1:{run.listen_port}/slow?ms=3000"
    get, got = in_thread(lambda: httpx.get(base, timeout=30))
    post, posted = in_thread(lambda: httpx.post(base, content=b"x", timeout=30))
    port = run.status()["active"]["port"]
    wait_until(lambda: sockets.inflight(port) >= 2, 30, "both requests inside the app")
    pid, _ = crash(run)
    get.join(60)
    post.join(60)
    st = restarted(run, pid)
    assert posted[0].status_code == 502, posted
    assert got[0].status_code == (200 if retry else 502), got
    if retry:
        assert got[0].text == "v1 slow\n"
    hold = next(e for e in st["events"] if e["event"] == "restarted")["hold"]
    assert hold["lost"] == (1 if retry else 2), hold


def test_new_requests_wait_for_the_replacement_of_a_hung_app_instead_of_hanging_in_it(shape: Any,
                                                                                      releases: Path) -> None:
    """A frozen app (SIGSTOP) found hung by its liveness checks: from then on new requests are
    held for its replacement, not sent into the app that would never answer."""
    health = '[app.health]\nurl = "http://127.0.0.1:{port}/health"\ninterval = 0.2\ntimeout = 0.5\nfailures = 2\n'
    run, _ = shape(health, build=app_build(releases, "v1", boot_ms=500))
    pid = run.status()["active"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: any(e["event"] == "unhealthy" for e in run.status()["events"]), 30, "found hung")
        r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30)
        assert (r.status_code, r.text) == (200, "hello from v1\n")
        st = restarted(run, pid)
        assert st["active"]["pid"] != pid
    finally:
        if running(pid):
            os.kill(pid, signal.SIGCONT)


def test_a_pause_holds_every_new_request_until_resume_and_none_fails(shape: Any, releases: Path) -> None:
    """`pause` under load (a migration that needs no writes): no request reaches the app, none
    fails; `resume` lets every held one go to the app, and says what it held."""
    run, _ = shape(build=app_build(releases, "v1"))
    with Load(run.listen_port, clients=4, slow_every=1000) as load:
        wait_until(lambda: load.ok >= 20, 30, "load to flow")
        r = run.cli("pause")
        assert r.returncode == 0 and "paused" in r.stdout, r.stdout + r.stderr
        wait_until(lambda: run.status()["hold"]["holding"] == 4, 30, "every client's request to be held")
        st = run.status()
        assert st["hold"]["paused"]["hold"] == 10 and "PAUSED" in run.cli("status").stdout
        answered = load.ok
        r = run.cli("resume")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: load.ok >= answered + 20, 30, "requests after the resume")
    assert not load.failures, dict(load.failures)
    assert "resumed after" in r.stdout and "0 timed out" in r.stdout, r.stdout
    assert run.status()["hold"]["paused"] is None


def test_a_request_held_past_the_pause_s_hold_gets_503(make_daemon: Any, releases: Path) -> None:
    run = make_daemon(build=app_build(releases, "v1"))
    assert run.cli("pause", "--hold", "1").returncode == 0
    r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30)
    assert r.status_code == 503 and r.headers.get("retry-after") == "5", r
    r = run.cli("resume")
    assert "1 timed out" in r.stdout, r.stdout
    assert httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30).status_code == 200


def test_a_daemon_killed_while_paused_comes_back_resumed(shape: Any, releases: Path) -> None:
    """A pause nobody owns is an outage nobody watches: the next daemon resumes it, says so, and
    the requests held meanwhile are answered."""
    run, _ = shape(build=app_build(releases, "v1"))
    assert run.cli("pause", "--hold", "55").returncode == 0
    held, answer = in_thread(lambda: httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=90))
    wait_until(lambda: run.status()["hold"]["holding"] == 1, 30, "the request to be held")
    run.kill()
    run.start()
    held.join(60)
    assert answer[0].status_code == 200, answer
    st = run.status()
    assert st["hold"]["paused"] is None and any(e["event"] == "resumed" for e in st["events"]), st["events"]
    assert "resumed" in run.output()


def test_pause_is_refused_with_the_reload_switch_saying_why(make_daemon: Any, releases: Path) -> None:
    from helpers import free_ports, managed_nginx

    listen = free_ports(1)[0]
    run = make_daemon(build=app_build(releases, "v1"), listen=listen, nginx=managed_nginx(listen, "reload"))
    r = run.cli("pause")
    assert r.returncode != 0 and "the reload switch holds nothing" in r.stderr + r.stdout, r.stdout + r.stderr


def test_a_pause_survives_an_nginx_restart(shape: Any, releases: Path) -> None:
    """nginx restarted while paused (the managed master killed, your nginx stopped and started)
    comes back with an empty table: the daemon pauses it again, and a request is held."""
    run, user = shape(build=app_build(releases, "v1"))
    assert run.cli("pause", "--hold", "55").returncode == 0
    if user is None:
        master = run.status()["nginx"]["master_pid"]
        os.kill(master, signal.SIGKILL)
        wait_until(lambda: run.status()["nginx"].get("master_pid") not in (None, master), 60, "nginx restarted")
    else:
        user.stop()
        user.start()
    wait_until(lambda: (run.status()["hold"] or {}).get("nginx_paused"), 30, "the pause set again", run.output)
    assert "the pause" in json.dumps(run.status()["events"][-1]), run.status()["events"]
    held, answer = in_thread(lambda: httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=90))
    wait_until(lambda: run.status()["hold"]["holding"] == 1, 30, "the request to be held")
    assert run.cli("resume").returncode == 0
    held.join(60)
    assert answer[0].status_code == 200, answer


def test_past_hold_max_requests_one_more_is_told_to_come_back_at_once(make_daemon: Any, releases: Path) -> None:
    """Each held request takes about three of nginx's connections: past hold.max_requests held at
    once, the next one gets 503 at once (never a worker out of connections)."""
    run = make_daemon(build=app_build(releases, "v1"), extra="[hold]\nmax_requests = 3\n")
    assert run.cli("pause", "--hold", "30").returncode == 0
    threads = [in_thread(lambda: httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=60)) for _ in range(3)]
    wait_until(lambda: run.status()["hold"]["holding"] == 3, 30, "three requests held")
    r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=60)
    assert r.status_code == 503 and r.headers.get("retry-after") == "5", r
    hold = run.status()["hold"]  # turned away, not held until a timeout
    assert hold["turned_away"] == 1 and hold["hold_timeouts"] == 0 and hold["holding"] == 3, hold
    assert run.cli("resume").returncode == 0
    for thread, answer in threads:
        thread.join(30)
        assert answer[0].status_code == 200, answer


def test_two_crashes_in_a_row_count_each_outage_once(shape: Any, releases: Path) -> None:
    run, _ = shape(build=app_build(releases, "v1", boot_ms=300))
    with Load(run.listen_port, clients=4, slow_every=1000) as load:
        wait_until(lambda: load.ok >= 20, 30, "load to flow")
        first, _ = crash(run)
        restarted(run, first)
        second, _ = crash(run)  # at once: before the daemon looked at nginx's counters again
        wait_until(lambda: sum(e["event"] == "restarted" for e in run.status()["events"]) == 2, 60,
                   "the second restart", run.output)
    counts = [e["hold"] for e in run.status()["events"] if e["event"] == "restarted"]
    total = run.status()["hold"]
    assert sum(c["held"] for c in counts) == total["held"], (counts, total)
    assert sum(c["lost"] for c in counts) == total["lost"] == sum(load.failures.values()), (counts, total)


def test_a_crash_while_a_swap_gets_ready_is_said_at_once_and_its_requests_go_to_the_new_build(
        shape: Any, releases: Path) -> None:
    """The active build dies while the swap's new build boots: `crash` at once (not when the swap
    ends), requests meanwhile held, then answered by the new build; the swap counts them."""
    run, _ = shape(build=app_build(releases, "v1"))
    swap = run.cli_background("swap", str(app_build(releases, "v2", boot_ms=2000)))
    wait_until(lambda: run.phase() == "ready", 30, "the swap to wait for the new build")
    crash(run)
    wait_until(lambda: any(e["event"] == "crash" and e.get("during") == "swap" for e in run.status()["events"]), 10,
               "the crash to be said while the swap runs", run.output)
    assert run.phase() == "ready"
    r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30)
    assert (r.status_code, r.text) == (200, "hello from v2\n")
    out, err = swap.communicate(timeout=120)
    assert swap.returncode == 0, out + err
    entry = json.loads(run.cli("history", "--json").stdout.splitlines()[-1])
    assert entry["reason"] == "swap" and entry["held"]["held"] >= 1, entry


def test_a_hold_port_taken_by_another_process_is_changed_for_a_free_one(make_daemon: Any, releases: Path) -> None:
    """The hold server keeps its port across starts (in nginx's part); one that another process
    bound meanwhile is changed for a free one, and nginx starts."""
    import socket

    run = make_daemon(build=app_build(releases, "v1"), start=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: nginx's bind() fails on it all the same
        port = taken.getsockname()[1]
        part = run.dir / "run" / "nginx" / "upstream.conf"
        part.parent.mkdir(parents=True)
        part.write_text(f"server {{\n    listen 127.0.0.1:{port};\n}}\n")
        run.start()
        assert "the hold server's port" in run.output()
        pid, _ = crash(run)
        r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30)
        assert r.status_code == 200, r
        restarted(run, pid)


def test_what_nginx_sent_to_the_dying_app_unread_is_answered_by_the_next_build(shape: Any, releases: Path) -> None:
    """Requests nginx connected to the app's port that the app never read (queued while it was
    stopped, then it is killed; a dying app's listener does the same for its last milliseconds)
    are not reset by its death: the daemon holds a copy of the app's listener, hands those
    connections to the hold server, and the next build answers them; none is counted lost."""
    run, _ = shape(build=app_build(releases, "v1", boot_ms=300))
    active = run.status()["active"]
    port = active["port"]
    wait_until(lambda: run.proc.pid in sockets.listening_pids(port), 10, "the daemon to keep a copy of the listener")
    os.killpg(active["pid"], signal.SIGSTOP)
    asked = [in_thread(lambda: httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=90)) for _ in range(5)]
    wait_until(lambda: len(sockets.connections(port, frozenset({sockets.ESTABLISHED}))) >= 5, 30,
               "nginx's five connections queued, unread, at the stopped app's port")
    os.killpg(active["pid"], signal.SIGKILL)
    for thread, answer in asked:
        thread.join(90)
        assert [(a.status_code, a.text) for a in answer] == [(200, "hello from v1\n")], answer
    st = restarted(run, active["pid"])
    hold = next(e for e in st["events"] if e["event"] == "restarted")["hold"]
    assert hold["lost"] == 0 and hold["held"] >= 5, hold
    assert not sockets.listening(port) or run.proc.pid not in sockets.listening_pids(port)  # (the copy let go)


WARMING = """
const http = require('http');
const began = Date.now();  // listens at once, answers 503 for its first WARM_MS (a JVM warming up)
http.createServer((req, res) => {
  const warm = Date.now() - began >= WARM_MS;
  res.writeHead(warm ? 200 : 503, {'content-type': 'text/plain'});
  res.end(warm ? 'ready\\n' : 'warming up\\n');
}).listen(Number(process.env.PORT), '127.0.0.1');
"""


def test_a_daemon_killed_while_a_crash_restart_gets_ready_lets_no_request_reach_it_before_it_is(
        make_daemon: Any, releases: Path) -> None:
    """The daemon killed while its crash restart's new build is still getting ready (it listens,
    and answers 503 for 3 s): the next daemon finishes the restart only once that build passes
    app.ready; until then nginx holds requests, and none gets the warming-up answer."""
    from helpers import make_build

    run = make_daemon(build=make_build(releases, "v1", server_js=WARMING.replace("WARM_MS", "0")))
    warming = make_build(releases, "v2", server_js=WARMING.replace("WARM_MS", "3000"))
    r = run.cli("swap", str(warming))
    assert r.returncode == 0, r.stdout + r.stderr  # (its own readiness waited the 3 s)
    pid = run.status()["active"]["pid"]
    os.kill(pid, signal.SIGKILL)  # the crash restart starts v2 again: 3 s of warming up
    wait_until(lambda: run.phase() == "ready", 30, "the crash restart to wait for its build", run.output)
    run.kill()
    run.start(wait=False)
    answers = [httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30) for _ in range(5)]
    assert [(a.status_code, a.text) for a in answers] == [(200, "ready\n")] * 5, [(a.status_code, a.text)
                                                                                   for a in answers]
    wait_until(run.serving, 60, "the next daemon to serve", run.output)


def test_a_crash_as_the_managed_nginx_dies_too_says_its_counts_are_partial(make_daemon: Any, releases: Path) -> None:
    """nginx's counters live in its shared memory: when its master dies with the app, what the old
    workers held and lost is gone, and the restart's record says its counts are partial rather
    than claim none was lost."""
    run = make_daemon(build=app_build(releases, "v1"))
    st = run.status()
    os.kill(st["nginx"]["master_pid"], signal.SIGKILL)
    os.killpg(st["active"]["pid"], signal.SIGKILL)
    st = restarted(run, st["active"]["pid"])
    hold = next(e for e in st["events"] if e["event"] == "restarted")["hold"]
    assert hold.get("nginx_restarted") is True, hold
    assert "nginx restarted meanwhile" in run.cli("history").stdout
    assert httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=30).text == "hello from v1\n"
