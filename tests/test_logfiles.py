"""The log pump and the follower on real files: rotation by size, following across several
rotations between two reads, and a full disk that drops output without blocking the writer."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import struct
import sys
import termios
from pathlib import Path

import pytest

from helpers import ROOT, wait_until
from supervisor.processes.logpump import Sink
from supervisor.processes.logs import Follower, last_lines
from supervisor.processes.slots import PUMP


def waiting_for_input(pid: int, read_end: int) -> bool:
    """The pipe is empty and the pump is blocked reading it again: it handled what it read."""
    unread = struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0]
    return unread == 0 and Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x0 ")  # read(0, ...)


def lines(a: int, b: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(a, b))


def test_the_sink_rotates_before_a_file_would_pass_max_bytes(tmp_path: Path) -> None:
    sink = Sink(str(tmp_path / "app.log"), 100, 2)
    for i in range(40):
        sink.write(b"line %02d\n" % i)  # 8 bytes each: 12 per file
    files = [tmp_path / "app.log.2", tmp_path / "app.log.1", tmp_path / "app.log"]
    assert [p.stat().st_size for p in files] == [96, 96, 32]
    assert not (tmp_path / "app.log.3").exists()  # the oldest fell off
    assert b"".join(p.read_bytes() for p in files) == b"".join(b"line %02d\n" % i for i in range(12, 40))


def test_the_follower_reads_across_several_rotations_between_two_reads(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    sink = Sink(str(path), 64, 10)
    sink.write(lines(0, 3))
    f = Follower(path)
    assert f.read() == lines(0, 3)
    for i in range(3, 60):  # many rotations before the next read
        sink.write(lines(i, i + 1))
    assert f.read() == lines(3, 60)
    sink.write(lines(60, 62))
    assert f.read() == lines(60, 62)


def test_the_follower_starts_where_it_was_told_even_if_that_file_was_rotated_since(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    sink = Sink(str(path), 64, 10)
    sink.write(b"--- header\n")
    st = path.stat()
    offset, origin = st.st_size, (st.st_dev, st.st_ino)
    for i in range(20):
        sink.write(lines(i, i + 1))
    assert Follower(path, offset, origin).read() == lines(0, 20)
    assert last_lines(path, 3) == ["line 17", "line 18", "line 19"]


def test_a_full_disk_drops_output_without_blocking_and_says_so_once_it_can(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            try:
                f.write(b"x" * 128 * 1024)
            except OSError:
                pass
        read_end, write_end = os.pipe()
        pump = subprocess.Popen([sys.executable, "-I", "-S", str(PUMP), str(mnt / "app.log"), "1000000", "1"],
                                stdin=read_end)
        os.write(write_end, b"lost " * 2000 + b"\n")  # 10 kB that cannot be written; the pump goes on reading
        wait_until(lambda: waiting_for_input(pump.pid, read_end), 10, "the pump to read the 10 kB")
        filler.unlink()
        os.write(write_end, b"after the disk had room again\n")
        os.close(write_end)
        os.close(read_end)
        assert pump.wait(10) == 0
        text = (mnt / "app.log").read_text()
        assert "10001 bytes of output were lost (No space left on device)" in text
        assert text.endswith("after the disk had room again\n")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_sink_makes_its_directory_again_if_an_operator_removed_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    sink = Sink(str(logs / "app.log"), 1000, 2)
    sink.write(b"before\n")
    shutil.rmtree(logs)  # `rm -rf run/logs` while the app runs
    sink.write(b"after\n")
    assert (logs / "app.log").read_bytes() == b"after\n" and sink.lost == 0


def test_one_big_read_from_the_pipe_is_rotated_at_line_ends(tmp_path: Path) -> None:
    """A slow pump reads many lines at once (up to the pipe's 64 KiB): each file still stays within
    max_bytes, cut between lines; only a line longer than a whole file is split."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("logpump", ROOT / "supervisor" / "processes" / "logpump.py")
    pump = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(pump)  # type: ignore[union-attr]
    lines = b"".join(f"line {i:05d}\n".encode() for i in range(1000))  # 11 bytes each
    sink = pump.Sink(str(tmp_path / "app.log"), 100, 200)
    sink.write(lines)
    sink.write(b"x" * 250 + b"\n")
    files = sorted(tmp_path.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert all(p.stat().st_size <= 100 for p in files), [(p.name, p.stat().st_size) for p in files]
    assert b"".join(p.read_bytes() for p in files) == lines + b"x" * 250 + b"\n"
    assert all(p.read_bytes().endswith(b"\n") for p in files if b"x" not in p.read_bytes())
