"""Atomic file replacement: readers see the old file or the new one, never a torn one.

A write is two steps that can be split: `stage` writes the bytes to a dot-temp file beside the
target (this is what needs disk space), `Staged.commit` renames it over the target (which does
not). Staging an undo copy *before* changing a file makes the way back work on a full disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class Staged:
    """Bytes already on disk next to `path`, ready to replace it by a rename."""

    def __init__(self, path: Path, tmp: str, synced: bool) -> None:
        self.path = path
        self.tmp: str | None = tmp
        self.synced = synced

    def commit(self) -> None:
        """Rename the staged file over the target and fsync the directory (no new space needed)."""
        if self.tmp is None:
            raise RuntimeError(f"staged copy of {self.path} was already used")
        if not self.synced:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(self.tmp, self.path)
        self.tmp = None
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def stage(path: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> Staged:
    """Write `data` to a dot-temp file in `path`'s directory; the target is untouched.

    The temp name starts with a dot so `include *.conf` globs never pick it up. The space is
    taken now (a full disk fails here); the fsync can wait until commit (`sync=False`), for a
    copy that is seldom used. On any error the temp file is removed and the error raised.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600
            if sync:
                os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return Staged(path, tmp, synced=sync)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically (stage, then commit); on error `path` is unchanged.
    `durable=False` skips the fsyncs: readers still see the old file or the new one, but a power
    loss may lose the change (for files every start rewrites anyway)."""
    staged = stage(path, data, mode, sync=durable)
    staged.synced = True  # nothing to sync at commit either
    try:
        if durable:
            staged.commit()
        else:
            os.replace(staged.tmp, path)  # type: ignore[arg-type]
            staged.tmp = None
    except BaseException:
        staged.discard()
        raise


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UndoableFile:
    """A file replaced atomically whose previous content is staged beside it first, so that one
    rename puts it back, even once the disk has filled up. Raises OSError like the writes it does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.undo: Staged | None = None
        self.undoable = False  # a replace can be undone (undo None: by removing the file)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, durable: bool = True) -> bytes | None:
        """Write `data`, keeping the way back; return the previous content."""
        previous = self.read()
        self.forget()
        undo = stage(self.path, previous, sync=False) if previous is not None else None  # synced only if used
        try:
            atomic_write(self.path, data, durable=durable)
        except BaseException:
            if undo is not None:
                undo.discard()
            raise
        self.undo, self.undoable = undo, True
        return previous

    def restore(self) -> None:
        """Put the content from before the last replace back (a rename: no new space needed)."""
        undo, undoable = self.undo, self.undoable
        self.undo, self.undoable = None, False
        if not undoable:
            raise RuntimeError(f"nothing to undo for {self.path}")
        if undo is None:
            self.path.unlink(missing_ok=True)
        else:
            undo.commit()

    def forget(self) -> None:
        if self.undo is not None:
            self.undo.discard()
        self.undo, self.undoable = None, False

    def clean_stale(self) -> None:
        """Remove dot-temp files a killed process left beside the file."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
