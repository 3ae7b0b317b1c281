"""state.json: which slot serves which build, written atomically before the old app is touched."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StateError
from .fsutil import atomic_write

VERSION = 1


@dataclass
class SlotState:
    slot: str
    port: int
    build: str
    pid: int
    create_time: float
    since: float


@dataclass
class State:
    active: SlotState | None = None
    previous_build: str | None = None
    last_swap: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # A swap in progress: {"phase", "reason", "build", "standby": SlotState|None, "old": SlotState}.
    # Written as the swap goes, so a daemon killed mid-swap can finish or undo it on restart.
    swap: dict[str, Any] | None = None
    # The managed nginx master {"pid", "create_time"}, adopted by the next daemon if still running.
    nginx: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return (json.dumps({"version": VERSION, **asdict(self)}, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "State":
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError(f"unsupported state version {obj.get('version') if isinstance(obj, dict) else obj!r}")
        active = obj.get("active")
        return cls(
            active=SlotState(**active) if active else None,
            previous_build=obj.get("previous_build"),
            last_swap=obj.get("last_swap"),
            history=list(obj.get("history") or []),
            swap=obj.get("swap"),
            nginx=obj.get("nginx"),
            events=list(obj.get("events") or []),
        )


HISTORY = 20


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> State:
        """The saved state, or an empty one; a corrupt file is an error that names it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        try:
            return State.from_json(data)
        except (ValueError, TypeError, KeyError) as e:
            raise StateError(
                f"{self.path} is not a valid bluegreen state file ({e}); move it away to start from app.build",
                code="state_invalid",
            ) from e

    def save(self, state: State) -> None:
        state.history = state.history[-HISTORY:]
        state.events = state.events[-HISTORY:]
        try:
            atomic_write(self.path, state.to_json(), mode=0o600)
        except OSError as e:
            raise StateError(
                f"cannot write {self.path}: {e.strerror}; the previous state is unchanged "
                "(check free disk space and permissions)"
            ) from e
