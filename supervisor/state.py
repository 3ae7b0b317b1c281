"""state.json: which slot serves which build, written atomically before the old app is touched.

`StateKeeper` is the one place the state changes and is saved: each change says whether it must
reach the disk before the caller goes on (`save`, which raises) or may be written later.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import StateError
from .fsutil import atomic_write

log = logging.getLogger("bluegreen")
VERSION = 1
HISTORY = 20
MAX_BYTES = 16 << 20  # a state.json is a few KiB: anything far bigger is not one (and is not read whole)
SLOTS = ("blue", "green")


class DaemonStatus(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RECOVERING = "recovering"  # replacing a crashed or hung app, or restarting nginx
    FAILED = "failed"  # gave up restarting a crashing app: a swap to a working build clears it
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


@dataclass
class SlotState:
    slot: str
    port: int
    build: str
    pid: int
    create_time: float
    since: float


@dataclass
class InterruptedSwap:
    """A swap in progress, written when the standby's slot and then its process are known (and
    with the commit), so a daemon killed mid-swap can finish or undo it on restart. `phase` is
    the last step recorded (start or commit)."""

    phase: str
    reason: str
    build: str
    old: SlotState
    standby: SlotState | None  # the new process: known from the end of `start` on
    started_at: float = 0.0  # for the history line the next daemon writes when it ends the swap
    by: dict[str, Any] | None = None
    # "paused": the standby is a preview nobody promoted (never to be made active by adoption)
    awaiting: str | None = None
    after_switch_done: bool = False  # the contract step ran (else the next daemon says it was skipped)
    switched_at: float = 0.0  # when traffic left the old build (its commit): the drain's deadlines run from it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InterruptedSwap":
        _typed(d, "swap", {"phase": str, "reason": str, "build": str, "started_at": _NUMBER + (type(None),),
                           "by": (dict, type(None)), "awaiting": (str, type(None)),
                           "after_switch_done": (bool, type(None)), "switched_at": _NUMBER + (type(None),)})
        return cls(phase=d["phase"], reason=d["reason"], build=d["build"], old=_slot(d.get("old"), "swap.old"),
                   standby=_slot(d["standby"], "swap.standby") if d.get("standby") else None,
                   started_at=d.get("started_at") or 0.0, by=d.get("by"), awaiting=d.get("awaiting"),
                   after_switch_done=bool(d.get("after_switch_done")), switched_at=d.get("switched_at") or 0.0)


_NUMBER = (int, float)


def _typed(d: Any, where: str, fields: dict[str, type | tuple[type, ...]]) -> None:
    """Every field of `d` of its type (a damaged or hand-edited file says where it is wrong)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    for name, kind in fields.items():
        v = d.get(name)
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else
                                                                             (kind,))):
            raise ValueError(f"{where}.{name}: expected {_kind(kind)}, got {json.dumps(v)[:40]}")


def _kind(kind: type | tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", dict: "an object", list: "a list",
             bool: "true or false", type(None): "null"}
    return " or ".join(dict.fromkeys(names[k] for k in (kind if isinstance(kind, tuple) else (kind,))))


def _slot(d: Any, where: str) -> SlotState:
    _typed(d, where, {"slot": str, "port": int, "build": str, "pid": int, "create_time": _NUMBER, "since": _NUMBER})
    if d["slot"] not in SLOTS:
        raise ValueError(f"{where}.slot: expected \"blue\" or \"green\", got {json.dumps(d['slot'])[:40]}")
    _in_range(d, where, "port", 1, 65535)
    _in_range(d, where, "pid", 1, 1 << 22)
    return SlotState(d["slot"], d["port"], d["build"], d["pid"], float(d["create_time"]), float(d["since"]))


def _in_range(d: dict[str, Any], where: str, key: str, low: float, high: float) -> None:
    if not low <= d[key] <= high:
        raise ValueError(f"{where}.{key}: expected {low}-{high}, got {d[key]}")


def _last_swap(d: Any) -> None:
    """What status prints of the last swap: its kind, build, outcome, end, phases, error."""
    _typed(d, "state.last_swap", {"reason": str, "build": str, "outcome": (str, type(None)),
                                  "finished_at": _NUMBER + (type(None),),
                                  "durations": (dict, type(None)), "error": (dict, type(None))})
    if not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in (d.get("durations") or {}).values()):
        raise ValueError("state.last_swap.durations: expected numbers of seconds")
    if d.get("error") is not None:
        _typed(d["error"], "state.last_swap.error", {"code": str, "message": str})


def _events(events: list[Any]) -> None:
    for i, e in enumerate(events):
        _typed(e, f"state.events[{i}]", {"at": _NUMBER, "event": str})


@dataclass
class State:
    active: SlotState | None = None
    previous_build: str | None = None
    last_swap: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    swap: InterruptedSwap | None = None
    # The managed nginx master {"pid", "create_time"}, adopted by the next daemon if still running.
    nginx: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    # The last release's old build, kept running (no traffic) until `warm_until` (release.keep_warm).
    warm: SlotState | None = None
    warm_until: float | None = None
    # The hot spare (app.spare): stopped by a restarted daemon, which starts its own.
    spare: SlotState | None = None

    def to_json(self) -> bytes:
        # Written at every swap phase: asdict would deep-copy every event and record first
        # (most of the cost); the lists and dicts here are JSON-ready and only read.
        obj = {"version": VERSION, "active": _plain(self.active), "previous_build": self.previous_build,
               "last_swap": self.last_swap, "history": self.history, "swap": _plain(self.swap), "nginx": self.nginx,
               "events": self.events, "warm": _plain(self.warm), "warm_until": self.warm_until,
               "spare": _plain(self.spare)}
        return (json.dumps(obj, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "State":
        obj = json.loads(data)
        if not isinstance(obj, dict) or type(obj.get("version")) is not int or obj.get("version") != VERSION:
            raise ValueError(f"unsupported state version {obj.get('version') if isinstance(obj, dict) else obj!r}")
        active, swap, warm = obj.get("active"), obj.get("swap"), obj.get("warm")
        _typed(obj, "state", {"previous_build": (str, type(None)), "last_swap": (dict, type(None)),
                              "history": (list, type(None)), "nginx": (dict, type(None)),
                              "events": (list, type(None)), "warm_until": _NUMBER + (type(None),)})
        for key in ("history", "events"):
            if not all(isinstance(x, dict) for x in obj.get(key) or ()):
                raise ValueError(f"state.{key}: expected a list of objects")
        if obj.get("nginx") is not None:
            _typed(obj["nginx"], "state.nginx", {"pid": int, "create_time": _NUMBER})
            _in_range(obj["nginx"], "state.nginx", "pid", 1, 1 << 22)
        if obj.get("last_swap") is not None:
            _last_swap(obj["last_swap"])
        _events(obj.get("events") or [])
        for key in ("swap", "warm", "spare"):
            if obj.get(key) is not None and not isinstance(obj[key], dict):
                raise ValueError(f"state.{key}: expected an object or null, got {type(obj[key]).__name__}")
        return cls(
            active=_slot(active, "state.active") if active else None,
            previous_build=obj.get("previous_build"),
            last_swap=obj.get("last_swap"),
            history=list(obj.get("history") or []),
            swap=InterruptedSwap.from_dict(swap) if swap else None,
            nginx=obj.get("nginx"),
            events=list(obj.get("events") or []),
            warm=_slot(warm, "state.warm") if warm else None,
            warm_until=obj.get("warm_until"),
            spare=_slot(obj["spare"], "state.spare") if obj.get("spare") else None,
        )


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: tuple[int, int, int] | None = None  # inode, size, mtime of this daemon's last write

    def load(self) -> State:
        """The saved state, or an empty one; a corrupt file is an error that names it."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return State()
        except PermissionError:
            raise StateError(f"{self.path} cannot be read by this user (permission denied); run this as the "
                             "daemon's user (or root)", code="state_invalid") from None
        except OSError as e:  # a directory, a symlink loop
            raise StateError(f"{self.path} cannot be read ({e.strerror}); move it away to start from app.build",
                             code="state_invalid") from None
        if len(data) > MAX_BYTES:
            raise StateError(f"{self.path} is not a valid bluegreen state file (over {MAX_BYTES >> 20} MiB; ours are "
                             "a few KiB); move it away to start from app.build", code="state_invalid")
        try:
            return State.from_json(data)
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
            raise StateError(
                f"{self.path} is not a valid bluegreen state file ({why}); move it away to start from app.build",
                code="state_invalid",
            ) from None

    def save(self, state: State, durable: bool = True) -> None:
        state.history = state.history[-HISTORY:]
        state.events = state.events[-HISTORY:]
        try:
            atomic_write(self.path, state.to_json(), mode=0o600, durable=durable)
            self.written = self._stamp()
        except OSError as e:
            raise StateError(f"cannot write {self.path}: {e.strerror}; {_fix(e.errno, self.path)}") from e


    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def changed_by_others(self) -> bool:
        """True when the file is no longer what this daemon last wrote (edited, damaged, removed)."""
        if self.written is None:
            return False
        try:
            return self._stamp() != self.written
        except OSError:
            return True


def _fix(errno_: int | None, path: Path) -> str:
    """What to do about a state.json that cannot be written."""
    if errno_ in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return f"something else took its place: move {path} away (the daemon writes it again by itself)"
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space in {path.parent} (the daemon writes it again by itself)"
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"let the daemon's user write {path.parent} (the daemon writes it again by itself)"
    return "the previous state is unchanged (check free disk space and permissions)"


class StateKeeper:
    """The state and its file: every change goes through here. `unsaved` is true when a change
    that had to reach the disk could not (a full disk); `retry` writes it once it can."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.state = State()
        self.unsaved = False
        self.error: str | None = None  # why the last write failed, while `unsaved`
        # Told of every swap that ended (its record), before it is saved: the metrics, the history log.
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def load(self) -> State:
        self.state = self.store.load()
        return self.state

    def save(self, durable: bool = True) -> None:
        """Write now; raise StateError if it cannot be written. `durable=False`: no fsync, for
        what only matters while processes run (a swap's progress: a power loss stops them all),
        never for what must survive a reboot (which build is active)."""
        try:
            self.store.save(self.state, durable)
        except StateError as e:
            self.error = e.message
            raise
        self.unsaved, self.error = False, None

    def save_quietly(self, durable: bool = True) -> bool:
        """Write now if possible; a failure is remembered and retried, not raised."""
        try:
            self.save(durable)
        except StateError:
            self.unsaved = True
            return False
        return True

    def retry(self) -> bool:
        return not self.unsaved or self.save_quietly()

    def keep_file(self) -> None:
        """state.json changed or removed by anything but this daemon (a slip of the editor, a cleanup
        script, a damaged disk block) is written again from memory, so that the next daemon does
        not start from a file that lies (the daemon's housekeeping calls this once a second)."""
        if self.unsaved or not self.store.changed_by_others():
            return
        if self.save_quietly():
            log.warning("%s was changed or removed by something other than this daemon: written again from what "
                        "the daemon knows (edit the config, not this file)", self.store.path)
        else:
            log.error("%s was changed or removed by something other than this daemon, and cannot be written again: "
                      "%s", self.store.path, self.error)

    def event(self, kind: str, **details: Any) -> None:
        """Recorded now, written with the next save."""
        self.state.events.append({"at": time.time(), "event": kind, **details})

    def serving(self, active: SlotState, nginx: dict[str, Any] | None, previous: str | None = None) -> None:
        """`active` serves (and, after a release, `previous` is what served before it)."""
        self.state.active = active
        self.state.nginx = nginx
        if previous is not None:
            self.state.previous_build = previous

    def snapshot(self) -> tuple[SlotState | None, str | None]:
        return self.state.active, self.state.previous_build

    def restore(self, snapshot: tuple[SlotState | None, str | None]) -> None:
        self.state.active, self.state.previous_build = snapshot

    def swap_progress(self, progress: InterruptedSwap | None) -> None:
        self.state.swap = progress

    def swap_ended(self, record: dict[str, Any], keep_progress: bool) -> None:
        """A swap ended; its progress stays only if it was handed to the next daemon to finish."""
        if not keep_progress:
            self.state.swap = None
        for observe in self.observers:
            try:
                observe(record)
            except Exception:  # the metrics or the history must never break a swap's bookkeeping
                log.exception("recording the end of a swap")
        self.state.last_swap = record
        entry = {k: record[k] for k in ("build", "reason", "outcome", "started_at")}
        error, details = record.get("error") or {}, record.get("details") or {}
        if error:
            entry.update(error=error.get("code"), traffic=record.get("traffic"))
        # A rollout, a watch and a revert are kept with the numbers that decided them.
        steps = (details.get("rollout") or {}).get("steps", [])
        verdicts = [{"share": s["share"], "verdict": s["verdict"]} for s in steps]
        if error.get("verdict"):
            verdicts.append({"share": error.get("share"), "verdict": error["verdict"]})
        elif (details.get("watch") or {}).get("verdict"):
            verdicts.append({"share": 100, "verdict": details["watch"]["verdict"]})
        if verdicts:
            entry["verdicts"] = verdicts
        self.state.history.append(entry)

    def warm(self, app: SlotState | None, until: float | None) -> None:
        """Recorded now, written with the next save: a restarted daemon stops what it names."""
        self.state.warm, self.state.warm_until = app, until

    def spare(self, app: SlotState | None) -> None:
        """Recorded now, written with the next save: a restarted daemon stops what it names."""
        self.state.spare = app

    def nginx_stopped(self) -> None:
        self.state.nginx = None


def _plain(record: SlotState | InterruptedSwap | None) -> dict[str, Any] | None:
    return asdict(record) if record is not None else None
