"""Gradual rollout with automatic revert (issue 12), end to end through a real nginx (runtime
switch), the CLI and Node builds that misbehave only on the main path (/health stays fine),
under load from many users, each known by its rollout cookie."""

from __future__ import annotations

import json

import random
import zlib
from collections import Counter
from pathlib import Path

import psutil
import pytest

from helpers import ClientThreads, http_get, make_build, managed_nginx, misbehaving_build, wait_until
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e

class Users(ClientThreads):
    """Many users: each request comes from a new user (a fresh random cookie), on a fresh
    connection; every answer is counted by status and build."""

    def __init__(self, port: int, clients: int = 4) -> None:
        super().__init__(clients)
        self.port = port
        self.answers: Counter[str] = Counter()  # "v1", "v2", "http_500", "reset", ...
        self.seen: list[tuple[int, str]] = []  # (the user's bucket, what it got), per request

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            user = f"u{rng.getrandbits(48):x}"
            try:
                status, body = http_get(self.port, "/", timeout=30, headers={"Cookie": f"bluegreen_id={user}"})
                kind = body.split()[-1] if status == 200 else f"http_{status}"
            except OSError as e:
                kind = type(e).__name__
            with self.lock:
                self.answers[kind] += 1
                self.seen.append((zlib.crc32(user.encode()) % 100, kind))  # nginx's ngx.crc32_short

    @property
    def failures(self) -> dict[str, int]:
        return {k: n for k, n in self.answers.items() if k not in ("v1", "v2")}


@pytest.fixture
def rollout_daemon(make_daemon, releases: Path):
    def start(extra: str = "", **kw):  # type: ignore[no-untyped-def]
        return make_daemon(build=misbehaving_build(releases, "v1"), extra=extra, **kw)
    return start


def test_a_good_build_goes_through_every_step_to_everyone_with_no_failed_request(rollout_daemon,
                                                                                releases: Path) -> None:
    run = rollout_daemon("[rollout]\nmin_requests = 10")
    with Users(run.listen_port) as users:
        r = run.cli("swap", str(misbehaving_build(releases, "v2")), "--rollout", "10,50,100", "--step", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 1: 10 % of users" in r.stdout and "step 2: 50 % of users" in r.stdout, r.stdout
    assert "2 step(s) passed" in r.stdout
    assert not users.failures, users.answers
    assert users.answers["v2"] > 0 and users.answers["v1"] > 0
    assert http_get(run.listen_port, "/", headers={"Cookie": "bluegreen_id=anyone"}) == (200, "hello from v2\n")
    last = run.status()["last_swap"]
    assert [s["share"] for s in last["details"]["rollout"]["steps"]] == [10, 50]
    assert [v["share"] for v in run.status()["history"][-1]["verdicts"]] == [10, 50]
    assert not sockets.listening(run.ports[0])


def test_a_build_failing_30_percent_is_reverted_in_the_first_step_and_only_its_share_sees_errors(
        rollout_daemon, releases: Path) -> None:
    run = rollout_daemon("[rollout]\nmin_requests = 20")
    with Users(run.listen_port) as users:
        r = run.cli("swap", str(misbehaving_build(releases, "v2", fail=30)), "--rollout", "20,100", "--step", "120")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[rollout_aborted]" in r.stderr and "step 1 (20 % of users)" in r.stderr, r.stderr
    assert "requests failed (" in r.stderr and "old: 0 of " in r.stderr  # the numbers that decided it
    assert "traffic is back on the old build" in r.stderr
    assert set(users.failures) <= {"http_500"}, users.answers  # only the new build's own 500s
    # Per user: those outside the 20 % share never met the new build, its errors included; inside
    # it, some did (before the revert sent them back).
    outside = Counter(kind for bucket, kind in users.seen if bucket >= 20)
    inside = Counter(kind for bucket, kind in users.seen if bucket < 20)
    assert set(outside) == {"v1"}, outside
    assert inside["v2"] + inside["http_500"] > 0 and set(inside) <= {"v1", "v2", "http_500"}, inside
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["last_swap"]["traffic"] == "restored"
    assert st["last_swap"]["error"]["code"] == "rollout_aborted" and st["last_swap"]["error"]["share"] == 20
    assert "requests failed (" in st["last_swap"]["error"]["verdict"]  # kept with the numbers that decided it
    assert st["history"][-1]["error"] == "rollout_aborted" and st["history"][-1]["verdicts"][0]["share"] == 20
    audit = json.loads(run.cli("history", "-n", "1", "--json").stdout)  # the audit trail says it was reverted
    assert (audit["outcome"], audit["error"]["code"], audit["to"]) == ("reverted", "rollout_aborted", str(releases / "v2"))
    assert "requests failed (" in audit["verdict"]
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the bad build to stop")
    assert {http_get(run.listen_port, "/", headers={"Cookie": f"bluegreen_id={i}"})[1] for i in range(30)} \
        == {"hello from v1\n"}


def test_a_slow_build_is_reverted_when_latency_ratio_is_set(rollout_daemon, releases: Path) -> None:
    run = rollout_daemon("[rollout]\nmin_requests = 20\nlatency_ratio = 3")
    with Users(run.listen_port) as users:
        # 300 ms against the old build's few: far above 3 x its p99 even on a loaded machine
        r = run.cli("swap", str(misbehaving_build(releases, "v2", delay_ms=300)), "--rollout", "30,100", "--step", "120")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[rollout_aborted]" in r.stderr and "p99 new" in r.stderr and "rollout.latency_ratio 3" in r.stderr
    assert not users.failures, users.answers
    assert run.status()["active"]["slot"] == "blue"


def in_rollout(run) -> bool:  # type: ignore[no-untyped-def]
    st = run.status()
    return bool(st and st.get("rollout") and st["rollout"]["step"] >= 1)


def test_a_user_keeping_its_cookie_sees_exactly_one_build_during_the_rollout_then_promote(
        rollout_daemon, releases: Path) -> None:
    run = rollout_daemon()
    swap = run.cli_background("swap", str(misbehaving_build(releases, "v2")), "--rollout", "50,100", "--step", "300")
    try:
        wait_until(lambda: in_rollout(run), 60, "the rollout's first step")
        seen = {}
        for i in range(24):
            cookie = {"Cookie": f"bluegreen_id=sticky{i}"}
            seen[i] = {http_get(run.listen_port, "/", headers=cookie)[1] for _ in range(15)}
        assert all(len(s) == 1 for s in seen.values()), seen
        sides = Counter(next(iter(s)) for s in seen.values())
        assert set(sides) == {"hello from v1\n", "hello from v2\n"}, sides  # both sides have users
        assert "rollout  step 1 of 1: 50 % of users" in run.cli("status").stdout
        p = run.cli("promote")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "promoted at 50 % of users" in p.stdout, p.stdout
        out, err = swap.communicate(timeout=120)
        assert swap.returncode == 0, out + err
    finally:
        if swap.poll() is None:
            swap.kill()
    assert http_get(run.listen_port, "/", headers={"Cookie": "bluegreen_id=sticky0"}) == (200, "hello from v2\n")


def test_abort_during_a_rollout_sends_everyone_back_and_stops_the_new_build(rollout_daemon, releases: Path) -> None:
    run = rollout_daemon()
    swap = run.cli_background("swap", str(misbehaving_build(releases, "v2")), "--rollout", "50,100", "--step", "300")
    try:
        wait_until(lambda: in_rollout(run), 60, "the rollout's first step")
        a = run.cli("abort")
        assert a.returncode == 0, a.stdout + a.stderr
        assert "everyone is back on the old build" in a.stdout, a.stdout
        out, err = swap.communicate(timeout=120)
        assert swap.returncode == 1 and "[aborted]" in err and "at 50 % of users" in err, out + err
    finally:
        if swap.poll() is None:
            swap.kill()
    assert {http_get(run.listen_port, "/", headers={"Cookie": f"bluegreen_id={i}"})[1] for i in range(30)} \
        == {"hello from v1\n"}
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the new build to stop")


def test_a_daemon_killed_mid_rollout_comes_back_on_the_old_build_with_nothing_left(rollout_daemon,
                                                                                  releases: Path) -> None:
    run = rollout_daemon()
    swap = run.cli_background("swap", str(misbehaving_build(releases, "v2")), "--rollout", "50,100", "--step", "300")
    try:
        wait_until(lambda: in_rollout(run), 60, "the rollout's first step")
        new = run.status()["standby"]["pid"]
        run.kill()
        swap.communicate(timeout=60)
    finally:
        if swap.poll() is None:
            swap.kill()
    run.start()
    wait_until(lambda: not psutil.pid_exists(new) or psutil.Process(new).status() == psutil.STATUS_ZOMBIE, 60,
               "the half-rolled-out build to be stopped")
    assert run.status()["active"]["slot"] == "blue"
    assert {http_get(run.listen_port, "/", headers={"Cookie": f"bluegreen_id={i}"})[1] for i in range(30)} \
        == {"hello from v1\n"}


def test_bad_rollouts_are_refused_with_traffic_unchanged(make_daemon, releases: Path) -> None:
    from helpers import free_ports

    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, "reload"))
    v2 = str(make_build(releases, "v2"))
    r = run.cli("swap", v2, "--rollout", "50,25")
    assert r.returncode == 2 and "shares must rise" in r.stderr, r.stderr
    r = run.cli("swap", v2, "--rollout", "5,150")
    assert r.returncode == 2 and "1-100; got 150" in r.stderr, r.stderr
    r = run.cli("swap", v2, "--rollout", "5,100")
    assert r.returncode == 1 and "[rollout_unavailable]" in r.stderr and "runtime switch" in r.stderr, r.stderr
    assert "traffic is unchanged" in r.stderr
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    assert not sockets.listening(run.ports[1])


def test_a_watched_plain_swap_goes_back_on_its_own_when_the_new_build_fails(rollout_daemon, releases: Path) -> None:
    run = rollout_daemon("[release]\nwatch_seconds = 60\n[rollout]\nmin_requests = 20")
    old = run.status()["active"]["pid"]
    with Users(run.listen_port) as users:
        r = run.cli("swap", str(misbehaving_build(releases, "v2", fail=30)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[rollout_aborted]" in r.stderr and "the watch after the switch" in r.stderr, r.stderr
    assert "traffic is back on the old build" in r.stderr
    assert set(users.failures) <= {"http_500"}, users.answers  # the bad build's own answers, nothing else
    st = run.status()
    assert st["active"]["pid"] == old and st["last_swap"]["traffic"] == "restored"  # the old build never stopped
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the bad build to stop")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")


def test_a_watched_plain_swap_of_a_good_build_keeps_it(rollout_daemon, releases: Path) -> None:
    run = rollout_daemon("[release]\nwatch_seconds = 2\n[rollout]\nmin_requests = 5")
    with Users(run.listen_port) as users:
        r = run.cli("swap", str(misbehaving_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not users.failures, users.answers
    last = run.status()["last_swap"]
    assert last["details"]["watch"]["seconds"] >= 2 and "new: 0 of" in last["details"]["watch"]["verdict"]
    assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
