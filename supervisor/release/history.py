"""The release history: every swap, rollback, automatic revert and crash restart, who asked for
it, from which build to which, how it ended and how long each phase took.

Kept as JSON lines in `state_dir/history.jsonl`, one per ended swap, appended and rotated by
size like the logs (`logs.max_bytes`, `logs.backups`); state.json keeps only the last few.
"Who" is the control socket's peer (SO_PEERCRED: user, uid, pid), or `bluegreen` itself for a
crash restart. A line that cannot be written (a full disk) is logged, never raised: the
history must not fail a swap.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..processes.logpump import rotate

log = logging.getLogger("bluegreen")

# The control-socket peer of the request being served; a swap task started by it inherits it.
PEER: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("peer", default=None)


def entry(record: dict[str, Any]) -> dict[str, Any]:
    """One history line from a swap record (SwapRecord.to_dict())."""
    error = record.get("error") or {}
    by = record.get("by") or {"user": "bluegreen", "why": "crash restart" if record["reason"] == "recover"
                              else "daemon"}
    out = {
        "at": record.get("finished_at") or time.time(), "started_at": record["started_at"],
        "reason": record["reason"], "by": by, "from": record.get("from_build"), "to": record["build"],
        "outcome": outcome(record), "traffic": record.get("traffic"), "durations": record.get("durations") or {},
    }
    if record.get("decided"):
        out["decided"] = record["decided"]  # who promoted or aborted a paused swap or a rollout
    if error:
        out["error"] = {"code": error.get("code"), "message": (error.get("message") or "").splitlines()[0][:300]}
    if record.get("warnings"):  # a contract step the next daemon could not run, connections cut...
        out["warnings"] = [w[:300] for w in record["warnings"]]
    held = (record.get("details") or {}).get("hold")
    if held:
        out["held"] = held  # a crash restart: what nginx held meanwhile, and lost
    verdict = error.get("verdict") or ((record.get("details") or {}).get("watch") or {}).get("verdict")
    if verdict:
        out["verdict"] = verdict
    return out


def parse_line(line: str) -> dict[str, Any] | None:
    """One history line as an entry, or None if it is not one: any JSON at all, or no JSON. Numbers
    must be real times and durations, strings real text (no lone surrogates)."""
    try:
        e = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(e, dict) and _time(e.get("at")) and _time(e.get("started_at"))
            and all(_text(e.get(k)) for k in ("reason", "to", "outcome"))
            and all(_text(e.get(k), none=True) for k in ("from", "traffic"))
            and _record(e.get("by"), {"user": str, "why": str})
            and isinstance(e.get("durations", {}), dict)
            and all(_text(k) and _seconds(v) for k, v in e.get("durations", {}).items())
            and _record(e.get("error"), {"code": str, "message": str}, need=("message",))):
        return None
    decided = e.get("decided")
    if decided is not None and not (_record(decided, {"what": str, "by": dict}, need=("what",))
                                    and _time(decided.get("at"))):
        return None
    return e  # type: ignore[no-any-return]


def _text(v: Any, none: bool = False) -> bool:
    if v is None:
        return none
    if not isinstance(v, str):
        return False
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e11


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9


def _record(v: Any, fields: dict[str, type], need: tuple[str, ...] = ()) -> bool:
    """None, or an object whose known fields (those in `need` required) have their type."""
    if v is None:
        return True
    if not isinstance(v, dict):
        return False
    for k, kind in fields.items():
        if k in v or k in need:
            if kind is str and not _text(v.get(k), none=k not in need):
                return False
            if kind is not str and not isinstance(v.get(k), (kind, type(None))):
                return False
    return True


def outcome(record: dict[str, Any]) -> str:
    """done, reverted (traffic went to the new build and came back), failed (it never moved), or
    failed_moved (the new build serves although the swap failed)."""
    if record["outcome"] == "done":
        return "done"
    return {"restored": "reverted", "moved": "failed_moved"}.get(record.get("traffic") or "", "failed")


class History:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups

    def record(self, swap: dict[str, Any]) -> None:
        """Append the line for an ended swap (a StateKeeper observer)."""
        line = (json.dumps(entry(swap)) + "\n").encode()  # phases stay in their order
        try:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                rotate(str(self.path), self.backups)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a line cut by a crash, or pasted in: ours must not be glued to it
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("could not write the history line for the %s to %s (%s): %s", swap["reason"], swap["build"],
                      swap["outcome"], e)

    def last(self, n: int) -> tuple[list[dict[str, Any]], int]:
        """The latest `n` entries, oldest first, across the rotated files; and how many lines were
        skipped as damaged (cut by a crash mid-write, or edited into something that is no entry)."""
        found: list[dict[str, Any]] = []
        skipped = 0
        files = [self.path] + [Path(f"{self.path}.{k}") for k in range(1, self.backups + 1)]
        for path in files:
            if len(found) >= n:
                break
            try:
                lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
            except OSError:
                continue
            older = []
            for ln in lines:
                e = parse_line(ln)
                if e is None:
                    skipped += ln.strip() != ""
                else:
                    older.append(e)
            found = older + found
        return (found[-n:] if n else []), skipped
