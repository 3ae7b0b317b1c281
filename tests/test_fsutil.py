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
    with pytest.raises(StateError, match="No space left on device; the previous state is unchanged"):
        store.save(State())
    assert store.load() == s


def test_corrupt_state_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{oops")
    with pytest.raises(StateError, match="state.json is not a valid bluegreen state file"):
        StateStore(tmp_path / "state.json").load()


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
