"""The log pump: copies an app's output from a pipe into its slot log, rotated by size.

Run as its own small process (`python -I -S logpump.py PATH MAX_BYTES BACKUPS`, stdin = the
pipe), never inside the daemon, so that the app's output keeps flowing while the daemon is
killed, restarted, or adopting the app: a pipe whose reader died would SIGPIPE the app, and a
file the app writes itself cannot be rotated without losing lines (copytruncate) or restarting
it. The pump is the file's only writer, so rotation is a rename with nothing lost.

It lives exactly as long as the app's output: it ignores the signals a stop or a Ctrl-C sends
and exits at end of file, once the app and every descendant holding its stdout are gone. It
never blocks the app on a full disk: what cannot be written is dropped, counted, and said in
the log once writing works again. Only the standard library, and no package import, so it
starts in ~20 ms and stays a few MB.
"""

from __future__ import annotations

import os
import signal
import sys
import time

CHUNK = 65536


def rotate(path: str, backups: int) -> None:
    """PATH -> PATH.1 -> ... -> PATH.<backups>; the oldest falls off. (Shared with the daemon's own
    rotation of nginx's logs; it lives here because the pump imports nothing of the package.)"""
    for n in range(backups - 1, 0, -1):
        src = f"{path}.{n}"
        if os.path.exists(src):
            os.replace(src, f"{path}.{n + 1}")
    os.replace(path, f"{path}.1")


class Sink:
    """An appended file rotated to PATH.1 .. PATH.<backups> before it would pass max_bytes."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.fd = -1
        self.size = 0
        self.lost = 0
        self.why = ""

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o640)  # an app's output may hold secrets: not for everyone
        except FileNotFoundError:  # someone removed the logs directory: make it again
            os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
            self.fd = os.open(self.path, flags, 0o640)
        self.size = os.fstat(self.fd).st_size

    def _current(self) -> bool:
        """Whether our fd is still the file at PATH (someone may have rotated or removed it)."""
        try:
            st, mine = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


    def write(self, data: bytes) -> None:
        """Append `data`, rotating before a file would pass max_bytes: at a line's end where one
        fits (a read from the pipe can hold many lines), cut only a line longer than a whole file."""
        while data:
            try:
                if self.fd < 0 or not self._current():
                    self._close()
                    self._open()
                room = self.max_bytes - self.size
                cut = len(data)
                if cut > room:
                    cut = data.rfind(b"\n", 0, max(room, 0)) + 1
                    if cut == 0 and self.size:  # not one whole line fits: a fresh file
                        self._close()
                        rotate(self.path, self.backups)
                        self._open()
                        continue
                    cut = cut or self.max_bytes
                if self.lost:
                    note = (f"--- bluegreen {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.lost} bytes of output were "
                            f"lost ({self.why})\n").encode()
                    self._all(note)
                    self.lost = 0
                self._all(data[:cut])
                data = data[cut:]
            except OSError as e:  # a full disk, a removed directory: drop, count, go on reading
                self.lost += len(data)
                self.why = e.strerror or str(e)
                self._close()
                return

    def _all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.size += n
            view = view[n:]


def main(argv: list[str]) -> int:
    path, max_bytes, backups = argv[0], int(argv[1]), int(argv[2])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sink = Sink(path, max_bytes, backups)
    while True:
        try:
            data = os.read(0, CHUNK)
        except InterruptedError:
            continue
        if not data:
            return 0
        sink.write(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
