"""The swap as an explicit sequence of named phases, apart from the I/O that carries it out.

    prepare -> start -> ready -> [before_switch] -> [check] -> [paused] -> switch -> commit
            -> drain -> [watch] -> [after_switch] -> stop (or keep the old build warm)

A release (swap BUILD, rollback) runs the bracketed phases it is configured for: hooks, smoke
checks, a pause for preview (swap --pause). A rollback to a warm old build skips prepare, start
and ready: the build still runs, so the switch is the only change to traffic.

Until `commit`, every failure leaves traffic where it was: the standby is stopped and
nginx keeps (or gets back) the old upstream; if nginx cannot be switched back, the standby
serves and is kept (never stop what nginx points at). After `commit` the new build serves;
drain and stop only decide how gently the old one goes, unless the new build dies while the
old one drains: then traffic goes back to the old one and the swap fails.
The real I/O lives behind `SwapOps` (see daemon/process.py); tests inject fakes.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Protocol, TypeVar

from ..aio import shielded
from ..errors import AppDied, BluegreenError, HookFailed

Standby = TypeVar("Standby")
Old = TypeVar("Old")


class Phase(str, enum.Enum):
    PREPARE = "prepare"
    START = "start"
    READY = "ready"
    BEFORE_SWITCH = "before_switch"  # hooks.before_switch (the expand migration)
    CHECK = "check"  # smoke checks on the standby's own port: only when a release configures them
    PAUSED = "paused"  # swap --pause: preview requests reach the standby until promote or abort
    ROLLOUT = "rollout"  # swap --rollout: a growing share of users, watched, before everyone
    SWITCH = "switch"
    COMMIT = "commit"
    DRAIN = "drain"
    WATCH = "watch"  # release.watch_seconds: the new build watched, the old one still up to go back to
    AFTER_SWITCH = "after_switch"  # hooks.after_switch (the contract migration), old build drained
    STOP = "stop"

    def __str__(self) -> str:
        return self.value

    @property
    def cancellable(self) -> bool:
        """Before commit a swap can be undone without touching traffic (`bluegreen cancel`)."""
        return self in (Phase.PREPARE, Phase.START, Phase.READY, Phase.BEFORE_SWITCH, Phase.CHECK, Phase.PAUSED,
                        Phase.ROLLOUT, Phase.SWITCH)

    @property
    def persisted(self) -> bool:
        """It changes what a daemon killed mid-swap must finish or undo, so state.json records
        it: start (its slot at the begin, its process at the end), commit (by its own write),
        paused (a standby nobody promoted is never made active by the next daemon), after_switch
        (whether the contract step ran). Ready and switch leave the standby to stop or keep (the
        switch is redone either way); drain and stop follow a recorded commit."""
        return self in (Phase.START, Phase.PAUSED, Phase.COMMIT, Phase.AFTER_SWITCH)


ORDER = tuple(Phase)


@dataclass(frozen=True)
class Plan(Generic[Old]):
    """What a swap is asked to do: run `build` on `slot`/`port`, replacing `old` (None: the
    first start, with nothing to replace)."""

    build: Path
    slot: str
    port: int
    old: Old | None
    reason: str = "swap"  # swap | rollback (releases a user asked for) | restart | recover
    old_build: Path | None = None
    checks: bool = False  # run the smoke checks before the switch
    hooks: frozenset[str] = frozenset()  # the configured hooks this swap runs (releases only)
    pause: bool = False  # stop before the switch for a preview, until promote or abort
    warm: Old | None = None  # the build already runs there (kept warm, a spare): no start, no readiness wait
    keep_warm: float = 0.0  # seconds the old build keeps running after the switch (0: stop it)
    old_hung: bool = False  # the old build was found hung: no drain (its requests cannot finish), a stop
    rollback_on_hook: bool = False  # a failed after_switch sends traffic back to the old build
    rollout: tuple[int, ...] = ()  # shares of users (%) the new build gets step by step before everyone
    step_seconds: float = 60.0
    watch: float = 0.0  # seconds the new build is watched after the switch (old build kept to go back to)

    @property
    def is_release(self) -> bool:
        """Only a release of another build changes "previous" (what `rollback` goes back to):
        restarts and crash recoveries never do."""
        return self.reason in RELEASES and self.build != self.old_build


RELEASES = ("swap", "rollback")


@dataclass
class SwapRecord:
    """A swap's progress and outcome, as shown by `status` and kept in state.json."""

    build: str
    to_slot: str
    to_port: int
    from_slot: str | None
    reason: str
    started_at: float = field(default_factory=time.time)
    phase: str | None = None
    from_build: str | None = None
    by: dict[str, Any] | None = None  # who asked (the socket peer); None: the daemon itself
    decided: dict[str, Any] | None = None  # a paused swap or rollout: who promoted or aborted it, and when
    outcome: str = "running"  # running | done | failed
    # unchanged | moved | restored: where traffic went, and nothing else (None: not known, for a
    # swap a killed daemon left that the next one undid)
    traffic: str | None = "unchanged"
    committed: bool = False
    durations: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SwapOps(Protocol[Standby, Old]):
    """The I/O a swap drives. Each call returns details shown in its phase's event."""

    async def prepare(self, plan: Plan[Old]) -> dict[str, Any]: ...
    async def start(self, plan: Plan[Old]) -> tuple[Standby, dict[str, Any]]: ...
    async def wait_ready(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Raises HookFailed; `name` is before_switch or after_switch.
    async def hook(self, name: str, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Raises ChecksFailed naming every failed check; nothing routes to the standby yet.
    async def check(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Preview on, wait for promote (return) or abort / pause_timeout (raise Aborted), preview off.
    async def pause(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Each share in turn, watched; a failed verdict or an abort sends everyone back to the old
    # build and raises (RolloutAborted, Aborted). Returns with the last share still routed.
    async def rollout(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Must leave nginx on the old upstream if it raises.
    async def switch(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # True once nginx sends traffic to the old slot again; False if it could not be switched back.
    async def switch_back(self, plan: Plan[Old]) -> bool: ...
    async def commit(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Raises AppDied if the new build dies while the old one drains.
    async def drain(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Judge the new build for plan.watch seconds after the switch; raise RolloutAborted if it fails.
    async def watch(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    # Stops the old build, or keeps it warm for plan.keep_warm seconds.
    async def stop_old(self, plan: Plan[Old]) -> dict[str, Any]: ...
    async def discard(self, standby: Standby, *, drain: bool) -> None: ...
    # Nginx could not be switched back after the switch: the standby serves, so it stays.
    async def keep(self, plan: Plan[Old], standby: Standby) -> None: ...
    # After commit, send traffic back to the old one if it still runs, and drop the new one
    # (drained first if it still serves: a failed after_switch; not if it died).
    async def revert(self, plan: Plan[Old], standby: Standby, why: str) -> bool: ...
    # Returns once the new build has exited (whenever that is).
    async def exited(self, standby: Standby) -> None: ...
    # The error for a new build that died in `phase` (after its exit); `where` says what became of traffic.
    def died(self, standby: Standby, phase: Phase, where: str) -> AppDied: ...


Emit = Callable[[dict[str, Any]], None]
Hold = Callable[[str], Awaitable[None]]


async def run_swap(plan: Plan[Old], ops: SwapOps[Standby, Old], emit: Emit, record: SwapRecord,
                   hold: Hold | None = None) -> SwapRecord:
    """Carry out one swap, emitting a begin/end event per phase; raise BluegreenError on failure.
    `hold` (tests only: supervisor.faults) is awaited at each phase's begin.

    `record.traffic` always says where traffic went: "unchanged" (never switched), "moved" (the
    new build serves), "restored" (switched, then back to the old build).
    """
    phase = _phase_runner(record, emit, hold)
    try:
        standby = await _until_commit(phase, plan, ops, record)
        # Committed: the new build serves. From here on only the old one's exit is at stake,
        # unless the new one dies while the old one still runs: then traffic goes back to it.
        record.committed = True
        await _after_commit(phase, plan, ops, standby, record)
    except BluegreenError as e:
        e.details["traffic"] = record.traffic
        record.outcome = "failed"
        record.error = e.to_dict()
        raise
    except Exception as e:  # a bug or an unexpected OSError: still a clear, failed swap
        record.outcome = "failed"
        err = BluegreenError(f"unexpected error in phase {record.phase}: {e!r}", code="internal", phase=record.phase,
                             traffic=record.traffic)
        record.error = err.to_dict()
        raise err from e
    except asyncio.CancelledError:
        if record.committed:  # the daemon is stopping mid-drain: the swap itself is done
            record.outcome = "done"
            record.warnings.append(f"{record.phase}: interrupted, the daemon is stopping")
        else:
            record.outcome = "failed"
            record.error = {"code": "cancelled", "message": "cancelled (bluegreen cancel, or the daemon is stopping)",
                            "phase": record.phase, "traffic": record.traffic}
        raise
    finally:
        record.finished_at = time.time()
    record.outcome = "done"
    record.phase = None
    return record


PhaseRunner = Callable[[Phase, Callable[[], Any]], Any]


def _phase_runner(record: SwapRecord, emit: Emit, hold: Hold | None = None) -> PhaseRunner:
    """Run one phase: record it, emit its begin and done events, time it, keep its details."""
    clock = time.monotonic
    t0 = clock()

    async def phase(name: Phase, action: Callable[[], Any]) -> Any:
        record.phase = name.value
        began = clock()
        try:
            emit({"event": name.value, "status": "begin", "elapsed": round(began - t0, 4)})
            if hold is not None:
                await hold(name.value)
            began = clock()  # a phase's duration is its action's: not the state.json write at its begin
            out = await action()
        except BaseException as e:
            record.durations[name.value] = round(clock() - began, 4)
            if isinstance(e, BluegreenError):
                e.details.setdefault("phase", name.value)
            raise
        record.durations[name.value] = round(clock() - began, 4)
        details = dict((out[1] if isinstance(out, tuple) else out) or {})
        if details.get("warning"):
            record.warnings.append(f"{name.value}: {details['warning']}")
        record.details[name.value] = details
        emit({"event": name.value, "status": "done", "duration": record.durations[name.value],
              "elapsed": round(clock() - t0, 4), **details})
        return out

    return phase


async def _until_commit(phase: PhaseRunner, plan: Plan[Old], ops: SwapOps[Standby, Old],
                        record: SwapRecord) -> Standby:
    if plan.warm is not None:
        standby: Any = plan.warm
        record.details["spare" if plan.reason == "recover" else "warm"] = {"reused": True}
    else:
        await phase(Phase.PREPARE, lambda: ops.prepare(plan))
        standby, _ = await phase(Phase.START, lambda: ops.start(plan))
    try:
        if plan.warm is None:
            await phase(Phase.READY, lambda: ops.wait_ready(plan, standby))
        if "before_switch" in plan.hooks:
            await phase(Phase.BEFORE_SWITCH, lambda: ops.hook("before_switch", plan, standby))
        if plan.checks:
            await phase(Phase.CHECK, lambda: ops.check(plan, standby))
        if plan.pause:  # preview requests reach the new build: its death ends the pause at once
            await phase(Phase.PAUSED, lambda: _while_alive(ops, standby, Phase.PAUSED, lambda: ops.pause(plan, standby),
                                                           "the preview ended; traffic is unchanged"))
        if plan.rollout:
            try:
                await phase(Phase.ROLLOUT, lambda: _while_alive(
                    ops, standby, Phase.ROLLOUT, lambda: ops.rollout(plan, standby),
                    "everyone is back on the old build, which never stopped"))
            except BaseException:
                record.traffic = "restored"  # a share of users was on the new build: all are back
                raise
        await phase(Phase.SWITCH, lambda: ops.switch(plan, standby))
    except BaseException:
        # Nothing public reached the standby (switch restores the old upstream itself); preview
        # requests or a rollout's share may have, so then the standby is drained first.
        await shielded(ops.discard(standby, drain=plan.pause or bool(plan.rollout)))
        raise
    record.traffic = "moved"
    try:
        await phase(Phase.COMMIT, lambda: ops.commit(plan, standby))
    except BaseException:
        # nginx already points at the standby. Back to the old build if nginx lets us; if not,
        # the standby is what serves, and stopping it would take the site down.
        if await shielded(ops.switch_back(plan)):
            record.traffic = "restored"
            await shielded(ops.discard(standby, drain=True))
        else:
            await shielded(ops.keep(plan, standby))
        raise
    return standby  # type: ignore[no-any-return]


async def _after_commit(phase: PhaseRunner, plan: Plan[Old],
                        ops: SwapOps[Standby, Old], standby: Standby, record: SwapRecord) -> None:
    if plan.old is None:
        return  # the first start: nothing to drain or stop

    async def reverting(name: Phase, action: Callable[[], Any], error: type[BaseException] | tuple[type[BaseException], ...],
                        why: str) -> None:
        """A phase whose `error` sends traffic back to the old build (if it still runs), then fails
        the swap. If it cannot go back, the new build serves: the old one leaves as after any swap."""
        try:
            await phase(name, action)
        except error as e:
            if await shielded(ops.revert(plan, standby, why if not isinstance(e, AppDied) else "died")):
                record.traffic = "restored"
            else:
                await _stop_old(phase, plan, ops, record)
            raise

    try:
        await reverting(Phase.DRAIN, lambda: ops.drain(plan, standby), AppDied, "died")
    except AppDied:
        raise
    except Exception as e:  # nothing else may turn a committed swap into a failure
        record.warnings.append(f"drain: {_text(e)}")
    if plan.watch:  # any failure of the watch (a bad verdict, nginx's counters gone, the new build dead) goes back
        await reverting(Phase.WATCH, lambda: _while_alive(ops, standby, Phase.WATCH, lambda: ops.watch(plan, standby),
                                                          "traffic is back on the old build, which never stopped"),
                        Exception, "the watch failed")
    if "after_switch" in plan.hooks:
        async def back() -> None:  # the new build died while the contract step runs: the old one serves again
            if await shielded(ops.revert(plan, standby, "died")):
                record.traffic = "restored"

        try:
            await phase(Phase.AFTER_SWITCH, lambda: _while_alive(
                ops, standby, Phase.AFTER_SWITCH, lambda: ops.hook("after_switch", plan, standby),
                lambda: ("traffic went back to the old build at once, which never stopped; the hook ran to its end"
                         if record.traffic == "restored" else "the old build could not take traffic back"),
                finish=True, on_death=back))
        except AppDied:
            if record.traffic != "restored":
                await _stop_old(phase, plan, ops, record)
            raise
        except HookFailed as e:
            if not plan.rollback_on_hook:
                record.warnings.append(f"after_switch: {e.message}")
            elif await shielded(ops.revert(plan, standby, "after_switch failed")):
                record.traffic = "restored"
                e.message += ("; hooks.after_switch_failed = \"rollback\": traffic is back on the old build, "
                              "which never stopped, and the new build was drained and stopped")
                raise
            else:
                record.warnings.append(f"after_switch: {e.message}; the old build is gone, so the new one keeps "
                                       "serving (hooks.after_switch_failed = \"rollback\" could not go back)")
    await _stop_old(phase, plan, ops, record)


async def _stop_old(phase: PhaseRunner, plan: Plan[Old], ops: SwapOps[Standby, Old], record: SwapRecord) -> None:
    """The old build leaves (stopped, or kept warm): the swap's last phase, whatever came before."""
    try:
        await phase(Phase.STOP, lambda: ops.stop_old(plan))
    except Exception as e:
        record.warnings.append(f"stop: {_text(e)}")


async def _while_alive(ops: SwapOps[Standby, Old], standby: Standby, name: Phase, action: Callable[[], Any],
                       where: str | Callable[[], str], *, finish: bool = False,
                       on_death: Callable[[], Any] | None = None) -> Any:
    """Run a long phase's `action` while the new build is watched. If it dies first, `on_death`
    acts at once (one routing change back), then the action is cancelled (its own cleanup ends
    any preview or split) or, with `finish`, left to end (a hook is never cut short); AppDied."""
    work = asyncio.ensure_future(action())
    died = asyncio.ensure_future(ops.exited(standby))
    try:
        await asyncio.wait({work, died}, return_when=asyncio.FIRST_COMPLETED)
        if not died.done():
            return work.result()
        if on_death is not None:
            await shielded(on_death())
        if finish:
            await asyncio.gather(work, return_exceptions=True)
        else:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        raise ops.died(standby, name, where() if callable(where) else where)
    finally:
        died.cancel()
        if not work.done():  # the swap itself is being cancelled: so is its phase
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


def _text(e: Exception) -> str:
    return e.message if isinstance(e, BluegreenError) else f"unexpected error: {e!r}"
