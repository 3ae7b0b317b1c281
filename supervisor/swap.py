"""The swap as an explicit sequence of named phases, apart from the I/O that carries it out.

    prepare -> start -> ready -> switch -> commit -> drain -> stop

Until `commit`, every failure leaves traffic where it was: the standby is stopped and
nginx keeps (or gets back) the old upstream. After `commit` the new build serves and
the swap can no longer fail; drain and stop only decide how gently the old one goes.
The real I/O lives behind `SwapOps` (see daemon.py); tests inject fakes.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Protocol, TypeVar

from .errors import BluegreenError

Standby = TypeVar("Standby")
Old = TypeVar("Old")


class Phase(str, enum.Enum):
    PREPARE = "prepare"
    START = "start"
    READY = "ready"
    SWITCH = "switch"
    COMMIT = "commit"
    DRAIN = "drain"
    STOP = "stop"

    def __str__(self) -> str:
        return self.value


ORDER = tuple(Phase)


@dataclass(frozen=True)
class Plan(Generic[Old]):
    """What a swap is asked to do: run `build` on `slot`/`port`, replacing `old`."""

    build: Path
    slot: str
    port: int
    old: Old
    reason: str = "swap"


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
    outcome: str = "running"  # running | done | failed
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
    # Must leave nginx on the old upstream if it raises.
    async def switch(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    async def switch_back(self, plan: Plan[Old]) -> None: ...
    async def commit(self, plan: Plan[Old], standby: Standby) -> dict[str, Any]: ...
    async def drain(self, plan: Plan[Old]) -> dict[str, Any]: ...
    async def stop_old(self, plan: Plan[Old]) -> dict[str, Any]: ...
    async def discard(self, standby: Standby, *, drain: bool) -> None: ...


Emit = Callable[[dict[str, Any]], None]


async def run_swap(plan: Plan[Old], ops: SwapOps[Standby, Old], emit: Emit, record: SwapRecord) -> SwapRecord:
    """Carry out one swap, emitting a begin/end event per phase; raise BluegreenError on failure."""
    clock = time.monotonic
    t0 = clock()

    async def phase(name: Phase, action: Callable[[], Any]) -> Any:
        record.phase = name.value
        emit({"event": name.value, "status": "begin", "elapsed": round(clock() - t0, 4)})
        began = clock()
        try:
            out = await action()
        except BaseException as e:
            record.durations[name.value] = round(clock() - began, 4)
            if isinstance(e, BluegreenError):
                e.details.setdefault("phase", name.value)
            raise
        record.durations[name.value] = round(clock() - began, 4)
        details = out[1] if isinstance(out, tuple) else out
        record.details[name.value] = details or {}
        emit(
            {
                "event": name.value,
                "status": "done",
                "duration": record.durations[name.value],
                "elapsed": round(clock() - t0, 4),
                **(details or {}),
            }
        )
        return out

    try:
        await phase(Phase.PREPARE, lambda: ops.prepare(plan))
        standby, _ = await phase(Phase.START, lambda: ops.start(plan))
        try:
            await phase(Phase.READY, lambda: ops.wait_ready(plan, standby))
            await phase(Phase.SWITCH, lambda: ops.switch(plan, standby))
        except BaseException:
            # Nothing served from the standby yet (switch restores the old upstream itself).
            await _shielded(ops.discard(standby, drain=False))
            raise
        try:
            await phase(Phase.COMMIT, lambda: ops.commit(plan, standby))
        except BaseException:
            # nginx already points at the standby: point it back, let it finish what it got, stop it.
            await _shielded(ops.switch_back(plan))
            await _shielded(ops.discard(standby, drain=True))
            raise
        # Committed: the new build serves. From here on only the old one's exit is at stake.
        for name, action in ((Phase.DRAIN, ops.drain), (Phase.STOP, ops.stop_old)):
            try:
                await phase(name, lambda action=action: action(plan))  # type: ignore[misc]
            except BluegreenError as e:
                record.warnings.append(f"{name.value}: {e.message}")
    except BluegreenError as e:
        record.outcome = "failed"
        record.error = e.to_dict()
        raise
    except Exception as e:  # a bug or an unexpected OSError: still a clear, failed swap
        record.outcome = "failed"
        err = BluegreenError(f"unexpected error in phase {record.phase}: {e!r}", code="internal", phase=record.phase)
        record.error = err.to_dict()
        raise err from e
    except asyncio.CancelledError:
        record.outcome = "failed"
        record.error = {"code": "cancelled", "message": "cancelled (bluegreen cancel, or the daemon is stopping)",
                        "phase": record.phase}
        raise
    finally:
        record.finished_at = time.time()
    record.outcome = "done"
    record.phase = None
    return record


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even if the swap itself is being cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
