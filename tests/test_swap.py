"""The swap's phase sequence, driven with fakes: the order, and what each failure leaves behind."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import Aborted, AppDied, AppError, BluegreenError, ChecksFailed, HookFailed, NginxError, StateError
from supervisor.release.phases import ORDER, Phase, Plan, SwapRecord, run_swap


class FakeOps:
    """Records every call; `fail` makes one phase raise; `block` makes one phase wait on an event."""

    def __init__(self, fail: dict[str, BaseException] | None = None, block: str | None = None,
                 can_switch_back: bool = True, old_alive: bool = True) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}
        self.block = block
        self.can_switch_back = can_switch_back
        self.old_alive = old_alive
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()
        self.new_died = asyncio.Event()  # set: the new build exits
        self.upstream = "old"

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.block:
            self.blocked.set()
            await self.release.wait()
        if name in self.fail:
            raise self.fail[name]

    async def prepare(self, plan: Plan[str]) -> dict[str, Any]:
        await self._step("prepare")
        return {"port": plan.port}

    async def start(self, plan: Plan[str]) -> tuple[str, dict[str, Any]]:
        await self._step("start")
        return "standby", {"pid": 42}

    async def wait_ready(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("ready")
        return {}

    async def check(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("check")
        return {"checks": []}

    async def hook(self, name: str, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step(name)
        return {"exit": 0}

    async def pause(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("paused")
        return {"paused_for": 1.0}

    async def rollout(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("rollout")
        return {"steps": []}

    async def watch(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("watch")
        return {"seconds": 1.0}

    async def switch(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("switch")
        self.upstream = "new"
        return {}

    async def switch_back(self, plan: Plan[str]) -> bool:
        self.calls.append("switch_back")
        if self.can_switch_back:
            self.upstream = "old"
        return self.can_switch_back

    async def commit(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("commit")
        return {}

    async def drain(self, plan: Plan[str], standby: str) -> dict[str, Any]:
        await self._step("drain")
        return {"still_open": 0}

    async def stop_old(self, plan: Plan[str]) -> dict[str, Any]:
        await self._step("stop")
        return {"how": "exited with code 0 after SIGTERM"}

    async def discard(self, standby: str, *, drain: bool) -> None:
        self.calls.append(f"discard(drain={drain})")

    async def keep(self, plan: Plan[str], standby: str) -> None:
        self.calls.append("keep")

    async def revert(self, plan: Plan[str], standby: str, why: str) -> bool:
        self.calls.append(f"revert({why})")
        if self.old_alive and await self.switch_back(plan):
            return True
        return False

    async def exited(self, standby: str) -> None:
        await self.new_died.wait()

    def died(self, standby: str, phase: Phase, where: str) -> AppDied:
        self.calls.append(f"died({phase})")
        return AppDied(f"the new build died during the {phase}; {where}")


PLAN: Plan[str] = Plan(build=Path("/b/2"), slot="green", port=8002, old="old-app")


def record() -> SwapRecord:
    return SwapRecord(build="/b/2", to_slot="green", to_port=8002, from_slot="blue", reason="swap")


def run(ops: FakeOps, events: list[dict[str, Any]] | None = None, plan: Plan[str] = PLAN) -> SwapRecord:
    rec = record()
    asyncio.run(run_swap(plan, ops, (events if events is not None else []).append, rec))
    return rec


def run_failing(ops: FakeOps, plan: Plan[str] = PLAN) -> tuple[SwapRecord, BluegreenError]:
    rec = record()
    with pytest.raises(BluegreenError) as e:
        asyncio.run(run_swap(plan, ops, lambda _: None, rec))
    return rec, e.value


OPTIONAL = (Phase.CHECK, Phase.BEFORE_SWITCH, Phase.PAUSED, Phase.ROLLOUT, Phase.WATCH, Phase.AFTER_SWITCH)
WITHOUT_CHECKS = [p for p in ORDER if p not in OPTIONAL]


def test_phases_run_in_order_and_each_emits_begin_and_done() -> None:
    ops, events = FakeOps(), []
    rec = run(ops, events)
    assert ops.calls == [p.value for p in WITHOUT_CHECKS]  # no smoke checks configured: no check phase
    assert [(e["event"], e["status"]) for e in events] == [(p.value, s) for p in WITHOUT_CHECKS
                                                           for s in ("begin", "done")]
    assert rec.outcome == "done" and rec.error is None
    assert list(rec.durations) == [p.value for p in WITHOUT_CHECKS]
    assert events[1]["port"] == 8002  # details of a phase ride on its done event


@pytest.mark.parametrize("phase", ["ready", "switch"])
def test_failure_before_the_switch_stops_the_standby_and_keeps_traffic(phase: str) -> None:
    ops = FakeOps(fail={phase: AppError("boom")})
    rec, err = run_failing(ops)
    assert ops.calls[-1] == "discard(drain=False)"
    assert "commit" not in ops.calls and "stop" not in ops.calls
    assert ops.upstream == "old"
    assert rec.outcome == "failed" and rec.error["phase"] == phase and err.details["phase"] == phase


def test_failure_in_prepare_starts_nothing() -> None:
    ops = FakeOps(fail={"prepare": BluegreenError("port taken", code="port_in_use")})
    rec, err = run_failing(ops)
    assert ops.calls == ["prepare"]
    assert err.code == "port_in_use" and rec.error["code"] == "port_in_use"


def test_failed_commit_switches_back_then_drains_and_stops_the_standby() -> None:
    ops = FakeOps(fail={"commit": StateError("disk full")})
    rec, err = run_failing(ops)
    assert ops.calls[-3:] == ["commit", "switch_back", "discard(drain=True)"]
    assert ops.upstream == "old" and "stop" not in ops.calls
    assert err.code == "state_write_failed"
    assert rec.traffic == "restored" and err.details["traffic"] == "restored"


def test_failed_commit_with_no_way_back_keeps_the_standby_that_nginx_points_at() -> None:
    ops = FakeOps(fail={"commit": StateError("disk full")}, can_switch_back=False)
    rec, err = run_failing(ops)
    assert ops.calls[-3:] == ["commit", "switch_back", "keep"]
    assert not any(c.startswith("discard") for c in ops.calls)  # never stop what nginx points at
    assert rec.traffic == "moved" and err.details["traffic"] == "moved"


def test_new_build_dying_during_the_drain_sends_traffic_back_to_the_old_one() -> None:
    ops = FakeOps(fail={"drain": AppDied("the new build died")})
    rec, err = run_failing(ops)
    assert ops.calls[-3:] == ["drain", "revert(died)", "switch_back"] and "stop" not in ops.calls
    assert err.code == "app_exited" and rec.traffic == "restored" and ops.upstream == "old"


def test_new_build_dying_when_the_old_one_is_gone_too_reports_traffic_moved() -> None:
    ops = FakeOps(fail={"drain": AppDied("the new build died")}, old_alive=False)
    rec, err = run_failing(ops)
    # No way back: the old build leaves as after any swap (nothing stays "retiring")
    assert ops.calls[-3:] == ["drain", "revert(died)", "stop"]
    assert rec.traffic == "moved" and err.details["traffic"] == "moved"


@pytest.mark.parametrize("phase", ["prepare", "start", "ready", "switch"])
def test_every_failure_before_the_switch_says_traffic_is_unchanged(phase: str) -> None:
    rec, err = run_failing(FakeOps(fail={phase: BluegreenError("no")}))
    assert rec.traffic == "unchanged" and err.details["traffic"] == "unchanged"


def test_after_commit_an_unexpected_error_is_still_only_a_warning() -> None:
    ops = FakeOps(fail={"stop": ProcessLookupError("the child exited between two calls")})
    rec = run(ops)
    assert rec.outcome == "done" and rec.traffic == "moved"
    assert rec.warnings and "unexpected error" in rec.warnings[0]


def test_a_phase_may_add_a_warning_with_its_details() -> None:
    class CutOps(FakeOps):
        async def drain(self, plan: Plan[str], standby: str) -> dict[str, Any]:
            await self._step("drain")
            return {"still_open": 2, "warning": "2 connection(s) still open"}

    rec = run(CutOps())
    assert rec.warnings == ["drain: 2 connection(s) still open"]


def test_after_commit_a_drain_problem_is_a_warning_not_a_failed_swap() -> None:
    ops = FakeOps(fail={"drain": BluegreenError("drain timed out")})
    rec = run(ops)
    assert rec.outcome == "done"
    assert ops.calls[-1] == "stop"  # the old one is stopped anyway
    assert rec.warnings == ["drain: drain timed out"]


def test_unexpected_exception_becomes_an_internal_error_and_still_cleans_up() -> None:
    ops = FakeOps(fail={"ready": RuntimeError("bug")})
    rec, err = run_failing(ops)
    assert err.code == "internal" and "bug" in err.message
    assert "discard(drain=False)" in ops.calls


def test_cancelled_while_waiting_for_ready_discards_the_standby() -> None:
    async def scenario() -> tuple[FakeOps, SwapRecord]:
        ops, rec = FakeOps(block="ready"), record()
        task = asyncio.ensure_future(run_swap(PLAN, ops, lambda _: None, rec))
        await ops.blocked.wait()
        assert rec.phase == Phase.READY.value  # status can show where a swap is
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ops, rec

    ops, rec = asyncio.run(scenario())
    assert ops.calls == ["prepare", "start", "ready", "discard(drain=False)"]
    assert rec.outcome == "failed" and rec.error["code"] == "cancelled"


def test_nginx_error_keeps_its_code() -> None:
    ops = FakeOps(fail={"switch": NginxError("nginx -t failed", code="nginx_test_failed")})
    _, err = run_failing(ops)
    assert err.code == "nginx_test_failed"


def test_each_phase_says_whether_it_can_be_cancelled_and_is_persisted() -> None:
    # cancellable up to the switch; from the commit on, traffic has moved
    assert [p.value for p in ORDER if p.cancellable] == ["prepare", "start", "ready", "before_switch", "check", "paused",
                                                            "rollout", "switch"]
    assert [p.value for p in ORDER if p.persisted] == ["start", "paused", "commit", "after_switch"]


def test_smoke_checks_run_between_ready_and_switch() -> None:
    ops = FakeOps()
    rec = SwapRecord(build="/b/2", to_slot="green", to_port=8002, from_slot="blue", reason="swap")
    asyncio.run(run_swap(replace(PLAN, checks=True), ops, lambda _: None, rec))
    assert ops.calls == ["prepare", "start", "ready", "check", "switch", "commit", "drain", "stop"]
    assert "check" in rec.durations


def test_a_failed_smoke_check_stops_the_standby_before_any_switch() -> None:
    ops = FakeOps(fail={"check": ChecksFailed("1 of 1 smoke check(s) failed")})
    rec = SwapRecord(build="/b/2", to_slot="green", to_port=8002, from_slot="blue", reason="swap")
    with pytest.raises(ChecksFailed) as e:
        asyncio.run(run_swap(replace(PLAN, checks=True), ops, lambda _: None, rec))
    assert ops.calls == ["prepare", "start", "ready", "check", "discard(drain=False)"]
    assert ops.upstream == "old" and rec.traffic == "unchanged" and e.value.details["traffic"] == "unchanged"
    assert rec.error is not None and rec.error["code"] == "checks_failed" and rec.error["phase"] == "check"


# ---- releases: hooks, the pause for preview, the warm old build (issue 11)

FULL: Plan[str] = Plan(build=Path("/b/2"), slot="green", port=8002, old="old-app", checks=True, pause=True,
                       hooks=frozenset({"before_switch", "after_switch"}))


def test_a_release_runs_its_hooks_checks_and_pause_in_order() -> None:
    ops = FakeOps()
    rec = run(ops, plan=FULL)
    assert ops.calls == ["prepare", "start", "ready", "before_switch", "check", "paused", "switch", "commit", "drain",
                         "after_switch", "stop"]
    assert rec.outcome == "done" and rec.traffic == "moved"


def test_a_failing_before_switch_hook_stops_the_standby_and_never_moves_traffic() -> None:
    ops = FakeOps(fail={"before_switch": HookFailed("hooks.before_switch exited with status 3")})
    rec, e = run_failing(ops, FULL)
    assert ops.calls[-2:] == ["before_switch", "discard(drain=True)"]  # paused swaps drain preview requests
    assert "switch" not in ops.calls and ops.upstream == "old"
    assert e.code == "hook_failed" and rec.traffic == "unchanged" and e.details["phase"] == "before_switch"


def test_an_aborted_pause_drains_preview_requests_off_the_standby_then_stops_it() -> None:
    ops = FakeOps(fail={"paused": Aborted("aborted by `bluegreen abort`")})
    rec, e = run_failing(ops, FULL)
    assert ops.calls[-2:] == ["paused", "discard(drain=True)"] and "switch" not in ops.calls
    assert e.code == "aborted" and rec.traffic == "unchanged"


def test_a_failing_after_switch_hook_only_warns_by_default() -> None:
    ops = FakeOps(fail={"after_switch": HookFailed("hooks.after_switch exited with status 1")})
    rec = run(ops, plan=FULL)
    assert rec.outcome == "done" and rec.traffic == "moved" and ops.calls[-1] == "stop"
    assert rec.warnings == ["after_switch: hooks.after_switch exited with status 1"]


def test_a_failing_after_switch_hook_can_send_traffic_back_to_the_old_build() -> None:
    plan = replace(FULL, rollback_on_hook=True)
    ops = FakeOps(fail={"after_switch": HookFailed("hooks.after_switch exited with status 1")})
    rec, e = run_failing(ops, plan)
    assert ops.calls[-3:] == ["after_switch", "revert(after_switch failed)", "switch_back"]
    assert "stop" not in ops.calls and ops.upstream == "old"
    assert e.code == "hook_failed" and rec.traffic == "restored" and "traffic is back on the old build" in e.message


def test_after_switch_rollback_with_the_old_build_gone_keeps_the_new_one_serving() -> None:
    plan = replace(FULL, rollback_on_hook=True)
    ops = FakeOps(fail={"after_switch": HookFailed("exited with status 1")}, old_alive=False)
    rec = run(ops, plan=plan)
    assert rec.outcome == "done" and rec.traffic == "moved" and ops.upstream == "new"
    assert "could not go back" in rec.warnings[0]


def test_a_warm_rollback_is_a_switch_with_no_start_and_no_readiness_wait() -> None:
    ops = FakeOps()
    rec = run(ops, plan=replace(PLAN, warm="warm-app", reason="rollback"))
    assert ops.calls == ["switch", "commit", "drain", "stop"]
    assert rec.details["warm"] == {"reused": True} and rec.traffic == "moved"


def test_a_rollout_runs_between_the_pause_and_the_switch() -> None:
    ops = FakeOps()
    run(ops, plan=replace(FULL, rollout=(10, 50, 100)))
    assert ops.calls[ops.calls.index("paused"):ops.calls.index("commit")] == ["paused", "rollout", "switch"]


def test_a_failed_rollout_says_traffic_was_restored_and_drains_the_new_build() -> None:
    from supervisor.errors import RolloutAborted

    ops = FakeOps(fail={"rollout": RolloutAborted("step 1 (5 % of users): new: 31 of 102 requests failed")})
    rec, e = run_failing(ops, replace(PLAN, rollout=(5, 100)))
    assert ops.calls[-2:] == ["rollout", "discard(drain=True)"] and "switch" not in ops.calls
    assert e.code == "rollout_aborted" and rec.traffic == "restored" and e.details["traffic"] == "restored"


def test_a_watched_swap_that_fails_its_watch_goes_back_to_the_still_running_old_build() -> None:
    from supervisor.errors import RolloutAborted

    plan = replace(FULL, watch=30.0)
    assert run(FakeOps(), plan=plan).outcome == "done"
    ops = FakeOps(fail={"watch": RolloutAborted("the watch after the switch: new: 9 of 30 requests failed")})
    rec, e = run_failing(ops, plan)
    assert ops.calls[-4:] == ["drain", "watch", "revert(the watch failed)", "switch_back"]
    assert "after_switch" not in ops.calls and "stop" not in ops.calls  # no contract step on a bad build
    assert e.code == "rollout_aborted" and rec.traffic == "restored"


async def _dies_during(phase: str, plan: Plan[str], **kw: Any) -> tuple[FakeOps, SwapRecord, BaseException]:
    """Run a swap whose new build dies while `phase` waits (a pause, a rollout step, a watch, a hook)."""
    ops, rec = FakeOps(block=phase, **kw), record()
    task = asyncio.ensure_future(run_swap(plan, ops, lambda e: None, rec))
    await ops.blocked.wait()
    ops.new_died.set()
    if phase == "after_switch":  # a hook is never cut short: it ends on its own, after traffic went back
        while "switch_back" not in ops.calls:
            await asyncio.sleep(0)
        ops.release.set()
    with pytest.raises(BluegreenError) as e:
        await asyncio.wait_for(task, 5)
    return ops, rec, e.value


@pytest.mark.parametrize("phase,plan,traffic", [
    ("paused", replace(PLAN, pause=True), "unchanged"),
    ("rollout", replace(PLAN, rollout=(10, 100)), "restored"),
], ids=["paused", "rollout"])
def test_a_new_build_dying_before_the_commit_ends_the_swap_at_once(phase: str, plan: Plan[str],
                                                                         traffic: str) -> None:
    ops, rec, e = asyncio.run(_dies_during(phase, plan))
    assert isinstance(e, AppDied) and e.details["traffic"] == traffic
    assert ops.calls[-2:] == [f"died({phase})", "discard(drain=True)"]
    assert "switch" not in ops.calls and "commit" not in ops.calls


def test_a_new_build_dying_during_the_watch_goes_back_at_once() -> None:
    ops, rec, e = asyncio.run(_dies_during("watch", replace(PLAN, watch=60.0)))
    assert isinstance(e, AppDied) and rec.traffic == "restored"
    assert ops.calls[-2:] == ["revert(died)", "switch_back"]
    assert "stop" not in ops.calls  # the old build serves again


def test_a_new_build_dying_during_after_switch_goes_back_before_the_hook_ends() -> None:
    plan = replace(PLAN, hooks=frozenset({"after_switch"}))
    ops, rec, e = asyncio.run(_dies_during("after_switch", plan))
    assert isinstance(e, AppDied) and rec.traffic == "restored"
    assert "went back to the old build at once" in e.message
    # back first, then the hook was let finish: nothing after it
    assert ops.calls[ops.calls.index("after_switch"):] == ["after_switch", "revert(died)", "switch_back",
                                                          "died(after_switch)"]


def test_a_watch_that_fails_for_any_reason_goes_back_or_stops_the_old_build() -> None:
    ops, rec = FakeOps(fail={"watch": NginxError("nginx's counters are gone", code="nginx_down")}), record()
    with pytest.raises(NginxError):
        asyncio.run(run_swap(replace(PLAN, watch=60.0), ops, lambda e: None, rec))
    assert rec.traffic == "restored" and ops.calls[-2:] == ["revert(the watch failed)", "switch_back"]
    # it cannot go back (the old build died meanwhile): the old build leaves as after any swap
    ops, rec = FakeOps(fail={"watch": NginxError("gone", code="nginx_down")}, old_alive=False), record()
    with pytest.raises(NginxError):
        asyncio.run(run_swap(replace(PLAN, watch=60.0), ops, lambda e: None, rec))
    assert rec.traffic == "moved" and ops.calls[-1] == "stop"
