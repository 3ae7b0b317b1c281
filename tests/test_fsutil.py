"""Atomic replacement: the old file or the new one, never a torn one, never a stray temp file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from supervisor.fsutil import atomic_write
from supervisor.state import State, StateStore, SlotState
from supervisor.errors import StateError


def test_replaces_with_mode_0644_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "upstream.conf"
    target.write_text("old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["upstream.conf"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    target.write_text("previous")

    def full_disk(*a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        atomic_write(target, b"next")
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["state.json"]


def test_state_round_trips_and_a_failed_save_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.load() == State()
    s = State(active=SlotState("green", 8002, "/b/2", 123, 1.5, 2.5), previous_build="/b/1")
    store.save(s)
    assert store.load() == s

    def full_disk(*a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StateError, match="No space left on device; free disk space in .* \\(the daemon writes it again by itself\\)"):
        store.save(State())
    assert store.load() == s


def test_corrupt_state_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{oops")
    with pytest.raises(StateError, match="state.json is not a valid bluegreen state file"):
        StateStore(tmp_path / "state.json").load()


SLOT = {"slot": "blue", "port": 8001, "build": "/srv/r/1", "pid": 42, "create_time": 1.0, "since": 1.0}


@pytest.mark.parametrize("damage, why", [
    ({"active": {**SLOT, "port": "8001"}}, "state.active.port: expected a number, got \"8001\""),
    ({"active": {**SLOT, "pid": True}}, "state.active.pid: expected a number, got true"),
    ({"active": {k: v for k, v in SLOT.items() if k != "build"}}, "state.active.build: expected a string, got null"),
    ({"active": [1, 2]}, "state.active: expected an object, got list"),
    ({"history": {"a": 1}}, "state.history: expected a list or null"),
    ({"events": [1, 2]}, "state.events: expected a list of objects"),
    ({"nginx": {"pid": "x", "create_time": 1}}, "state.nginx.pid: expected a number"),
    ({"warm_until": "later"}, "state.warm_until: expected a number or null"),
    ({"swap": {"phase": "start", "reason": "swap", "build": "/b", "old": {**SLOT, "since": None}}},
     "swap.old.since: expected a number, got null"),
    ({"swap": {"phase": 1, "reason": "swap", "build": "/b", "old": SLOT}}, "swap.phase: expected a string"),
    ({"active": {**SLOT, "slot": "../../etc/passwd"}}, 'state.active.slot: expected "blue" or "green"'),
    ({"active": {**SLOT, "pid": -1}}, "state.active.pid: expected 1-4194304, got -1"),
    ({"active": {**SLOT, "port": 99999}}, "state.active.port: expected 1-65535, got 99999"),
    ({"nginx": {"pid": -5, "create_time": 1}}, "state.nginx.pid: expected 1-4194304, got -5"),
    ({"swap": []}, "state.swap: expected an object or null, got list"),
    ({"last_swap": {"reason": "swap", "build": "/b", "outcome": "done", "error": "x"}},
     "state.last_swap.error: expected an object or null"),
    ({"last_swap": {"reason": "swap", "build": "/b", "outcome": "done", "durations": "x"}},
     "state.last_swap.durations: expected an object or null"),
    ({"last_swap": {"reason": "swap", "build": "/b", "outcome": "done", "finished_at": "x"}},
     "state.last_swap.finished_at: expected a number or null"),
    ({"events": [{"build": 5}]}, "state.events[0].at: expected a number"),
    ({"version": True}, "unsupported state version True"),
])
def test_a_state_file_with_a_wrong_type_is_named_with_the_field(tmp_path: Path, damage: dict, why: str) -> None:
    """Every field's type is checked on load: a hand-edited or damaged state.json is refused with
    the file and the field named, never a TypeError in the middle of a start or a status."""
    import json

    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "active": SLOT, **damage}))
    with pytest.raises(StateError) as e:
        StateStore(tmp_path / "state.json").load()
    assert f"{tmp_path / 'state.json'} is not a valid bluegreen state file ({why}" in e.value.message, e.value.message
    assert "move it away to start from app.build" in e.value.message


def test_a_state_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    deep = tmp_path / "deep" / "state.json"
    deep.parent.mkdir()
    deep.write_text("[" * 100_000)
    (tmp_path / "dir" / "state.json").mkdir(parents=True)
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "state.json").symlink_to(tmp_path / "loop" / "state.json")
    for path, why in ((deep, "nested too deeply"), (tmp_path / "dir" / "state.json", "Is a directory"),
                      (tmp_path / "loop" / "state.json", "Too many levels of symbolic links")):
        with pytest.raises(StateError) as e:
            StateStore(path).load()
        assert str(path) in e.value.message and why in e.value.message, e.value.message


def test_a_staged_copy_goes_back_with_a_rename_when_the_disk_is_full(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.fsutil import stage

    target = tmp_path / "upstream.conf"
    target.write_text("old")
    undo = stage(target, b"old", sync=False)  # staged before the change: the space is taken now
    atomic_write(target, b"new")
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)  # nothing can be written any more; a rename still works
    undo.commit()
    monkeypatch.setattr(os, "write", real_write)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["upstream.conf"]
