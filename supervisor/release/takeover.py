"""Carrying out adoption.decide at start-up: take over the processes a previous daemon left
running instead of restarting them, finish or undo its interrupted swap, stop its leftovers."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import client
from ..config.schema import other_slot
from ..errors import BluegreenError
from ..processes import slots
from ..state import InterruptedSwap
from . import adoption
from .phases import RELEASES, SwapRecord
from .spare import stop as stop_spare

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("bluegreen")


async def adopt(app: App) -> bool:
    """Carry out adoption.decide: take over live processes instead of restarting them."""
    state = app.keeper.state
    saved = [s for s in (state.active, state.swap and state.swap.standby, state.swap and state.swap.old) if s]
    alive = {s.pid for s in saved if slots.adopt_state(s, app.state_dir) is not None}
    decision = adoption.decide(state, alive)
    if state.swap is not None:
        log.warning("a %s to %s was interrupted (last step recorded: %s): %s", state.swap.reason,
                    state.swap.build, state.swap.phase, decision.action)
    leftovers = [p for p in (slots.adopt_state(s, app.state_dir) for s in decision.retire) if p is not None]
    warm = slots.adopt_state(state.warm, app.state_dir) if state.warm else None
    if warm is not None and (decision.active is None or warm.pid != decision.active.pid):
        leftovers.append(warm)  # a restart ends the keep_warm window
    app.keeper.warm(None, None)
    spare = slots.adopt_state(state.spare, app.state_dir) if state.spare else None
    if spare is not None and (decision.active is None or spare.pid != decision.active.pid):
        # This daemon boots its own (and watches it from the start). It never had traffic: no
        # drain, a short stop (a hung one must not keep the new daemon from watching what serves).
        result = await stop_spare(spare, app.config.app.stop)
        log.info("stopped the previous daemon's spare %s (pid %d): %s", spare.slot, spare.pid, result["how"])
    app.keeper.spare(None)
    if decision.unrecorded_slot:  # killed between spawning a standby and recording it
        leftovers += slots.find_ours(app.state_dir, decision.unrecorded_slot,
                                     app.launcher.log_path(decision.unrecorded_slot))
    active = slots.adopt_state(decision.active, app.state_dir) if decision.active else None
    if active is not None and decision.ready_first and not await _ready(app, active):
        leftovers.append(active)
        active = None
    if active is None:
        for p in leftovers:  # they would hold the ports the fresh start needs
            await app.retire(p, drain=False)
        _end_interrupted(app, state.swap, decision.action)
        return False
    try:
        await app.point_nginx_at(active.port, force=decision.switch)
    except BaseException:
        # Past this point a failure must not stop what still serves: leave it all to the next daemon.
        log.error("could not point nginx at the adopted %s slot; leaving every process as it was", active.slot)
        app.hand_over()
        raise
    app.committed(active, None)
    app.event("adopted", slot=active.slot, pid=active.pid, build=str(active.build))
    log.info("adopted %s (pid %d, port %d) serving %s", active.slot, active.pid, active.port, active.build)
    drained = None
    for p in leftovers:
        old = state.swap is not None and p.pid == state.swap.old.pid  # its drain goes on from the switch
        report = await app.retire(p, drain=True, since=state.swap.switched_at if old and state.swap else None)
        drained = report if old else drained
    _end_interrupted(app, state.swap, decision.action, drained)
    app.serving(active)
    app.keeper.save()
    return True


async def _ready(app: App, proc: slots.AppProcess) -> bool:
    """The interrupted swap's new build passes app.ready before it serves (the killed daemon may
    have started it a moment ago); nginx holds requests meanwhile. Its log is not read (what it
    printed before this daemon started is not told apart from earlier runs' lines)."""
    import dataclasses

    from ..processes import probes

    ready = dataclasses.replace(app.config.app.ready, log=None)
    try:
        await probes.wait_ready(proc, ready, app.launcher.url(ready.url, proc))
    except BluegreenError as e:
        log.warning("the interrupted swap's new build (pid %d) did not get ready: %s; starting afresh", proc.pid,
                    e.message.splitlines()[0])
        return False
    return True


def _end_interrupted(app: App, swap: InterruptedSwap | None, action: adoption.Action,
                     drained: dict[str, Any] | None = None) -> None:
    """The interrupted swap is over now: it ends like any swap (status' last swap, the history,
    the metrics), as finished (its new build serves) or not (what ran before serves, or a fresh start),
    with what the drain this daemon finished did to traffic."""
    app.keeper.swap_progress(None)
    if swap is None:
        return
    slot = swap.standby.slot if swap.standby else other_slot(swap.old.slot)
    record = SwapRecord(build=swap.build, to_slot=slot, to_port=app.config.app.port(slot), from_slot=swap.old.slot,
                        reason=swap.reason, started_at=swap.started_at or time.time(), phase=swap.phase,
                        from_build=swap.old.build, by=swap.by, finished_at=time.time())
    killed = f"the daemon was killed during the {swap.reason} (last step recorded: {swap.phase})"
    if action is adoption.Action.FINISH:
        record.outcome, record.traffic, record.committed = "done", "moved", True
        record.warnings.append(f"{killed}; the next daemon finished it")
        if drained is not None:
            drained.pop("after", None)
            drained.pop("died", None)
            if swap.phase == "drain" and (drained.get("closed_between_calls") is not None):
                # its drain had begun: what it closed before it died was counted in its memory only
                drained["uncounted_before_the_kill"] = True
                record.warnings.append("drain: the killed daemon had begun the drain; connections it closed before "
                                       "it died are not in these counts")
            record.details["drain"] = drained
            record.warnings += [f"drain: {said}" for said in client.drain_warnings(drained)]
        hook = app.config.hooks.after_switch
        if hook and swap.reason in RELEASES and not swap.after_switch_done:
            skipped = (f"hook_skipped: hooks.after_switch ({' '.join(hook)}) did not run for the {swap.reason} to "
                       f"{swap.build}: the daemon was killed before it; run it by hand once you have checked the new "
                       f"build")
            record.warnings.append(skipped)
            app.warn(skipped)
            log.warning("%s", skipped)
    else:
        # Whether nginx had switched before the kill is not known (traffic None); where it is now is said.
        record.outcome, record.traffic = "failed", None
        if action is adoption.Action.UNDO:
            now = "traffic is on the build that served before"
        elif swap.awaiting == "paused" and swap.standby is not None:
            now = ("the swap was paused for a preview nobody promoted and the active build had died too: the "
                   "preview build was stopped and the build that served before started afresh")
        else:
            now = "both processes were gone, so the daemon started afresh"
        record.error = {"code": "interrupted", "message": f"{killed}; the next daemon undid it: {now}"}
    app.keeper.swap_ended(record.to_dict(), keep_progress=False)
