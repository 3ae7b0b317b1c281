"""Logs that never fill the disk: reading them across rotations, and rotating the ones the
daemon owns.

Who writes what, and how each is rotated at `logs.max_bytes`, keeping `logs.backups` files:
- `logs/<slot>.log`: the app's output, through a log pump (logpump.py), its only writer, which
  renames the file: nothing is lost, the app is never restarted or blocked;
- `nginx/access.log`, `nginx/error.log` (managed nginx): renamed by the daemon, then the master
  is told to reopen them (SIGUSR1); nginx keeps writing into the renamed file until it has;
- `logs/daemon.log`: the daemon's own logging handler.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from ..errors import LogsError
from .logpump import rotate

if TYPE_CHECKING:
    from ..config.schema import Config

Ident = tuple[int, int]


def ident(path: Path | str) -> Ident | None:
    """(device, inode): what a path names now; None if nothing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Follower:
    """Reads what is appended to a log, like `tail -F`: when the file is rotated (renamed) it
    finishes the old file, then goes on with the new one from its start.

    `offset` and `origin` say where to begin: `offset` bytes into the file whose ident was
    `origin` (which may have been rotated to PATH.1 meanwhile)."""

    def __init__(self, path: Path, offset: int = 0, origin: Ident | None = None) -> None:
        self.path, self.offset, self.origin = path, offset, origin
        self.f: BinaryIO | None = None

    def _open(self, path: Path, offset: int) -> None:
        try:
            self.f = open(path, "rb")
        except OSError:
            self.f = None
            return
        size = os.fstat(self.f.fileno()).st_size
        self.f.seek(offset if offset <= size else 0)

    def _first_open(self) -> None:
        if self.origin is not None and ident(self.path) != self.origin:
            k = self._rotated_to(self.origin)  # rotated since `offset` was taken (read() goes on from there)
            if k is not None:
                self._open(Path(f"{self.path}.{k}"), self.offset)
                return
            self.offset = 0  # that file is gone: begin with the current one
        self._open(self.path, self.offset)

    def _rotated_to(self, file: Ident) -> int | None:
        """k such that PATH.k is `file` now; None if it fell off the end."""
        k = 1
        while (found := ident(f"{self.path}.{k}")) is not None:
            if found == file:
                return k
            k += 1
        return None

    def read(self) -> bytes:
        """Everything appended since the last read, across any rotations since."""
        if self.f is None:
            self._first_open()
            if self.f is None:
                return b""
        out = self._drain()
        now = ident(self.path)
        mine = os.fstat(self.f.fileno())
        if now is not None and now != (mine.st_dev, mine.st_ino):
            self.f.close()
            # Ours is PATH.k now; PATH.k-1 .. PATH.1 were written after it (several rotations
            # between two reads), then PATH.
            k = self._rotated_to((mine.st_dev, mine.st_ino)) or 1  # fell off the end: none known between
            for n in range(k - 1, 0, -1):
                try:
                    out += Path(f"{self.path}.{n}").read_bytes()
                except OSError:
                    pass
            self._open(self.path, 0)
            out += self._drain() if self.f is not None else b""
        return out

    def _drain(self) -> bytes:
        assert self.f is not None
        if self.f.tell() > os.fstat(self.f.fileno()).st_size:  # truncated in place (copytruncate)
            self.f.seek(0)
        return self.f.read()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def last_lines(path: Path, n: int, end: int | None = None, limit: int | None = None) -> list[str]:
    """The last `n` lines of a log (of its first `end` bytes), reaching into PATH.1 when the current
    file has fewer; reading at most `limit` bytes of each file (a line cut there starts with `…`)."""
    lines: list[str] = []
    for p, upto in ((path, end), (Path(f"{path}.1"), None)):
        if len(lines) >= n:
            break
        lines = _tail(p, n - len(lines), upto, limit) + lines
    return lines[-n:] if n else []


def _tail(path: Path, n: int, end: int | None, limit: int | None = None) -> list[str]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if end is None else end
            block, data = 65536, b""
            while size > 0 and data.count(b"\n") <= n and (limit is None or len(data) < limit):
                step = min(block, size, limit - len(data) if limit else block)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > 0 and lines and len(lines) <= n:  # stopped at `limit` inside a line
        lines[0] = "…" + lines[0]
    return lines[-n:]


QUOTE_LINE, QUOTE_TOTAL = 512, 4096  # an app's last lines quoted in an error (CLI, state.json, status)


def quoted(lines: list[str]) -> list[str]:
    """Lines to quote in an error: each cut to QUOTE_LINE characters, the oldest left out past
    QUOTE_TOTAL in all (a build that prints a 10 MiB line must not make a 10 MiB error)."""
    out: list[str] = []
    total = 0
    for line in reversed(lines):
        if len(line) > QUOTE_LINE:
            line = f"{line[:QUOTE_LINE]}… ({len(line) - QUOTE_LINE} more characters)"
        total += len(line) + 1
        if total > QUOTE_TOTAL and out:
            break
        out.append(line)
    return out[::-1]


class NginxLogs:
    """The managed nginx's access and error logs, rotated once they pass max_bytes (checked by
    the monitor every second, so a file can pass it by what nginx writes in a second)."""

    def __init__(self, prefix: Path, max_bytes: int, backups: int) -> None:
        self.paths = (prefix / "access.log", prefix / "error.log")
        self.max_bytes, self.backups = max_bytes, backups

    def rotate_if_due(self, master: int | None) -> list[Path]:
        """Rename what is over the limit and make `master` reopen its logs; return what rotated."""
        due = [p for p in self.paths if _size(p) > self.max_bytes]
        if not due or master is None:
            return []
        for p in due:
            rotate(str(p), self.backups)
        try:
            os.kill(master, signal.SIGUSR1)
        except ProcessLookupError:
            pass  # a dead master reopens nothing; its successor opens fresh files
        return due


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class DaemonLog(RotatingFileHandler):
    """daemon.log (mode 0640: hooks' output lands here), rotated by size; a failed write (a full
    disk) is said once on stderr, not as a traceback per line."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)

    failing = False
    failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self.failed_now = False
        if self.stream is not None and self._moved():
            self.reopen()  # removed or renamed under us (rm -rf logs/, an outside logrotate)
        super().emit(record)  # calls handleError on failure
        if not self.failed_now:
            self.failing = False

    def _moved(self) -> bool:
        try:
            st, fst = os.stat(self.baseFilename), os.fstat(self.stream.fileno())
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino)

    def reopen(self) -> None:
        """Write to a fresh file at the same path (SIGHUP, or the file was removed)."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None  # type: ignore[assignment]
            try:
                os.makedirs(os.path.dirname(self.baseFilename), mode=0o750, exist_ok=True)
            except OSError:
                pass  # emit's failure says why
        finally:
            self.release()

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed_now = True
        if not self.failing:
            self.failing = True
            print(f"bluegreen: cannot write {self.baseFilename}: {sys.exc_info()[1]}; logging to stderr only "
                  "until it works again", file=sys.stderr)


# --- `bluegreen logs`: read straight from the files, so it works with the daemon down too



def sources(config: Config, which: str) -> list[tuple[str, Path]]:
    """The files `bluegreen logs WHICH` shows, with a label each; LogsError if there is none."""
    state_dir = config.daemon.state_dir
    logs = state_dir / "logs"
    if which == "active":
        from ..state import StateStore

        active = StateStore(state_dir / "state.json").load().active
        if active is None:
            raise LogsError(f"no build has been started with {state_dir} yet (no active slot in state.json); "
                            "start `bluegreen daemon`, or name a log: blue, green, nginx, daemon")
        which = active.slot
    if not logs.is_dir() and (state_dir / "state.json").exists():
        raise LogsError(f"{logs} is missing (removed while the daemon ran?): each log comes back with its next "
                        "line; try again in a moment")
    if which in ("blue", "green"):
        path = logs / f"{which}.log"
        if not path.exists():
            raise LogsError(f"the {which} slot has never run with {state_dir} (no {path}); "
                            "`bluegreen status` says which slot serves")
        return [(which, path)]
    if which == "daemon":
        found = [("daemon", logs / "daemon.log")]
    elif config.nginx.mode == "managed":
        prefix = state_dir / "nginx"
        found = [("error", prefix / "error.log"), ("access", prefix / "access.log")]
    elif config.nginx.error_log is not None:
        found = [("error", config.nginx.error_log)]
    else:
        raise LogsError("your own nginx writes its logs where its config says (nginx.mode = \"external\"); "
                        "set nginx.error_log to show its error log here")
    found = [(label, p) for label, p in found if p.exists()]
    if not found:
        where = config.nginx.error_log if which == "nginx" and config.nginx.mode == "external" else state_dir
        raise LogsError(f"no {which} log yet at {where}: has `bluegreen daemon` run with this config?")
    for _, p in found:
        if not os.access(p, os.R_OK):
            raise LogsError(f"cannot read {p}: permission denied; run this as its owner or a member of its group "
                            f"({_group(p)}), or as root")
    return found


def _group(path: Path) -> str:
    import grp

    gid = path.stat().st_gid
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def show(found: list[tuple[str, Path]], lines: int, follow: bool, out: TextIO, poll: float = 0.2) -> None:
    """Print the last `lines` lines of each file; with `follow`, then what is appended (across
    rotations) until interrupted. Several files get a `label |` prefix, like `pm2 logs`."""
    prefix = len(found) > 1
    followers = [(label, Follower(path, _size(path), ident(path))) for label, path in found]
    for (label, path), (_, f) in zip(found, followers):  # up to where following begins: no line twice
        shown = last_lines(path, lines, f.offset)
        for line in shown:
            out.write(f"{label} | {line}\n" if prefix else line + "\n")
        if not shown and lines:  # (said on stderr: `bluegreen logs | grep` reads only log lines)
            print(f"bluegreen: {path} is empty" + (": nothing logged yet, following" if follow else ""),
                  file=sys.stderr)
    out.flush()
    if not follow:
        return
    pending = {label: "" for label, _ in found}
    while True:
        for label, f in followers:
            data = f.read()
            if not data:
                continue
            text = pending[label] + data.decode("utf-8", "replace")
            *complete, pending[label] = text.split("\n")
            for line in complete:
                out.write(f"{label} | {line}\n" if prefix else line + "\n")
        out.flush()
        time.sleep(poll)
