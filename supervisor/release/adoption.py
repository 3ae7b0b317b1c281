"""What a starting daemon does with the processes a previous one left: a pure decision.

Input: the saved state and which of its processes are still alive (pid and start time
checked by the caller). Output: adopt what serves, finish or undo an interrupted swap, or
start fresh; and which leftovers to drain and stop. The caller carries it out.

    no swap was running:     saved active alive -> adopt it;   dead or none -> fresh start
    a swap was interrupted:  it had committed (state.json names the new process active)
                               active alive          -> finish: adopt it, retire the old one
                             it had not
                               active alive          -> undo: adopt it, retire the new one
                             active dead, new alive  -> finish with the new one once it passes
                                                        app.ready, unless it was paused for a preview nobody
                                                        promoted: then a fresh start of the old build
                             both dead               -> fresh start; stop whatever is left
After an interrupted swap nobody knows which upstream nginx loaded: it is switched again.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from ..config.schema import other_slot
from ..state import SlotState, State


class Action(str, enum.Enum):
    FRESH = "fresh"  # start the saved (or configured) build
    ADOPT = "adopt"  # the saved active app still serves: take it over as it is
    FINISH = "finish"  # an interrupted swap had moved traffic: keep the new app, retire the old
    UNDO = "undo"  # an interrupted swap had not: keep the old app, retire the new

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Adoption:
    action: Action
    active: SlotState | None = None  # the process to adopt as the active app
    retire: tuple[SlotState, ...] = ()  # live leftovers: drained (unless starting fresh), then stopped
    unrecorded_slot: str | None = None  # a standby may run there unrecorded (killed before it was saved)
    switch: bool = False  # point nginx at the active slot even if its upstream seems right
    ready_first: bool = False  # the swap had not switched to it: it must pass app.ready before it serves


def decide(state: State, alive: Collection[int]) -> Adoption:
    """Decide from the saved state and the pids (of saved processes) that are still alive."""
    active = state.active if state.active and state.active.pid in alive else None
    swap = state.swap
    if swap is None:
        return Adoption(Action.ADOPT, active) if active else Adoption(Action.FRESH)
    standby = swap.standby if swap.standby and swap.standby.pid in alive else None
    old = swap.old if swap.old.pid in alive else None
    unrecorded = other_slot(swap.old.slot) if swap.standby is None else None
    committed = swap.standby is not None and state.active is not None and swap.standby.pid == state.active.pid
    if active is not None and committed:
        return Adoption(Action.FINISH, active, _others(active, old), switch=True)
    if active is not None:
        return Adoption(Action.UNDO, active, _others(active, standby), unrecorded, switch=True)
    if standby is not None and swap.awaiting != "paused":
        return Adoption(Action.FINISH, standby, _others(standby, old), switch=True, ready_first=True)
    return Adoption(Action.FRESH, None, _others(None, old, standby), unrecorded)


def _others(active: SlotState | None, *candidates: SlotState | None) -> tuple[SlotState, ...]:
    return tuple(c for c in candidates if c is not None and (active is None or c.pid != active.pid))
