"""What a starting daemon does with what a previous one left: one test per case of the decision."""

from __future__ import annotations

import json

from supervisor.release.adoption import Action, Adoption, decide
from supervisor.state import InterruptedSwap, SlotState, State

BLUE = SlotState("blue", 8001, "/b/1", 101, 1.0, 1.0)
GREEN = SlotState("green", 8002, "/b/2", 202, 2.0, 2.0)


def swap(phase: str, old: SlotState = BLUE, standby: SlotState | None = GREEN) -> InterruptedSwap:
    return InterruptedSwap(phase, "swap", "/b/2", old, standby)


def test_nothing_saved_starts_fresh() -> None:
    assert decide(State(), alive=set()) == Adoption(Action.FRESH)


def test_a_live_active_app_is_adopted_as_it_is() -> None:
    d = decide(State(active=BLUE), alive={101})
    assert d == Adoption(Action.ADOPT, BLUE) and not d.switch and not d.retire


def test_a_dead_active_app_means_a_fresh_start() -> None:
    assert decide(State(active=BLUE), alive=set()) == Adoption(Action.FRESH)


def test_a_committed_swap_is_finished_and_the_old_app_retired() -> None:
    d = decide(State(active=GREEN, swap=swap("drain")), alive={101, 202})
    assert d == Adoption(Action.FINISH, GREEN, (BLUE,), switch=True)


def test_a_committed_swap_whose_old_app_is_gone_is_finished_with_nothing_to_retire() -> None:
    d = decide(State(active=GREEN, swap=swap("stop")), alive={202})
    assert d == Adoption(Action.FINISH, GREEN, (), switch=True)


def test_an_uncommitted_swap_is_undone_and_the_standby_retired() -> None:
    d = decide(State(active=BLUE, swap=swap("switch")), alive={101, 202})
    assert d == Adoption(Action.UNDO, BLUE, (GREEN,), switch=True)


def test_a_swap_killed_before_its_standby_was_recorded_looks_for_it_on_the_other_slot() -> None:
    d = decide(State(active=BLUE, swap=swap("start", standby=None)), alive={101})
    assert d == Adoption(Action.UNDO, BLUE, (), unrecorded_slot="green", switch=True)


def test_a_dead_old_active_with_a_live_standby_finishes_with_the_standby() -> None:
    # Never stop a process that may be serving: nginx may already point at it; but it serves only
    # once it passes app.ready (the killed daemon may have started it a moment ago).
    d = decide(State(active=BLUE, swap=swap("switch")), alive={202})
    assert d == Adoption(Action.FINISH, GREEN, (), switch=True, ready_first=True)


def test_everything_dead_but_a_leftover_starts_fresh_and_stops_the_leftover() -> None:
    d = decide(State(active=GREEN, swap=swap("drain")), alive={101})
    assert d == Adoption(Action.FRESH, None, (BLUE,))


def test_nothing_alive_after_an_interrupted_first_recording_starts_fresh_and_searches() -> None:
    d = decide(State(active=BLUE, swap=swap("start", standby=None)), alive=set())
    assert d == Adoption(Action.FRESH, None, (), unrecorded_slot="green")


def test_the_state_file_round_trips_every_field() -> None:
    """What decide() reads must survive the write: every field of State, nested records included."""
    from dataclasses import asdict, fields

    state = State(active=GREEN, previous_build="/b/1", last_swap={"reason": "swap", "build": "/b/2", "outcome": "done", "finished_at": 2.0,
                                                                  "durations": {"ready": 0.1}},
                  history=[{"build": "/b/2"}], swap=swap("drain"), nginx={"pid": 9, "create_time": 3.0},
                  events=[{"at": 1.0, "event": "crash"}])
    written = json.loads(state.to_json())
    assert set(written) == {"version"} | {f.name for f in fields(State)}
    assert State.from_json(state.to_json()) == state
    assert {k: v for k, v in written.items() if k != "version"} == asdict(state)


def test_a_preview_nobody_promoted_is_never_made_active_even_when_the_old_build_died() -> None:
    paused = InterruptedSwap("paused", "swap", "/b/2", BLUE, GREEN, awaiting="paused")
    d = decide(State(active=BLUE, swap=paused), alive={202})
    assert d == Adoption(Action.FRESH, None, (GREEN,))
    # once promoted (the pause's end was recorded), the same deaths finish the swap as before
    promoted = InterruptedSwap("paused", "swap", "/b/2", BLUE, GREEN)
    assert decide(State(active=BLUE, swap=promoted), alive={202}).action is Action.FINISH
