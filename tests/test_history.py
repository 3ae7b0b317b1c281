"""History and audit (issue 13): every swap, failed swap, rollback and crash restart is kept in
state_dir/history.jsonl with who asked (SO_PEERCRED), from -> to, outcome and phase durations;
`bluegreen history` lists it, and `bluegreen status` prints a table."""

from __future__ import annotations

import json
import os
import pwd
import signal
from pathlib import Path

import pytest

from helpers import make_build, wait_until
from supervisor.release.history import History

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.e2e
def test_swaps_failures_rollbacks_and_crash_restarts_are_audited(make_daemon, releases: Path) -> None:
    run = make_daemon()
    v1, v2 = run.status()["active"]["build"], make_build(releases, "v2")
    assert run.cli("swap", str(v2)).returncode == 0
    assert run.cli("swap", str(make_build(releases, "broken", healthy=False))).returncode == 1
    assert run.cli("rollback").returncode == 0
    os.kill(run.status()["active"]["pid"], signal.SIGKILL)
    wait_until(lambda: len(run.cli("history", "--json").stdout.splitlines()) == 4, 60, "the crash restart")

    entries = [json.loads(ln) for ln in run.cli("history", "--json").stdout.splitlines()]
    assert [(e["reason"], e["outcome"]) for e in entries] == [
        ("swap", "done"), ("swap", "failed"), ("rollback", "done"), ("recover", "done")]
    assert [(Path(e["from"]).name, Path(e["to"]).name) for e in entries] == [
        ("v1", "v2"), ("v2", "broken"), ("v2", "v1"), ("v1", "v1")]
    for e in entries[:3]:  # asked over the socket, by this test's user
        assert (e["by"]["user"], e["by"]["uid"]) == (ME, os.getuid()) and e["by"]["pid"] > 0
    assert entries[3]["by"] == {"user": "bluegreen", "why": "crash restart"}
    assert entries[1]["error"]["code"] == "not_ready" and entries[1]["traffic"] == "unchanged"
    assert set(entries[0]["durations"]) >= {"prepare", "start", "ready", "switch", "drain", "stop"}
    assert "switch" not in entries[1]["durations"]  # it never got there
    assert entries[0]["at"] >= entries[0]["started_at"] and entries[0]["to"] == str(v2) and entries[2]["to"] == v1

    human = run.cli("history", "-n", "2")
    assert human.returncode == 0
    assert f"rollback  {ME}" in human.stdout and "v2 -> v1" in human.stdout and "(crash restart)" in human.stdout
    assert "swap      " not in human.stdout  # -n 2: only the last two
    lines = (run.dir / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == entries  # the CLI shows the file as stored

    table = run.cli("status").stdout
    assert "│ role " in table and "│ active " in table and "│ nginx " in table and " serving " in table, table
    assert run.cli("status", "--json").stdout.lstrip().startswith("{")


def test_the_history_file_is_rotated_and_read_across_its_files(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl", 4096, 3)
    for i in range(100):
        h.record({"reason": "swap", "build": f"/r/{i}", "from_build": f"/r/{i - 1}", "outcome": "done",
                  "traffic": "moved", "started_at": 1000.0 + i, "finished_at": 1001.0 + i, "durations": {"switch": 0.002}})
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["history.jsonl", "history.jsonl.1", "history.jsonl.2", "history.jsonl.3"]
    assert all(p.stat().st_size <= 4096 for p in files)
    last, skipped = h.last(25)
    assert [e["to"] for e in last] == [f"/r/{i}" for i in range(75, 100)] and skipped == 0
    (tmp_path / "history.jsonl").write_text((tmp_path / "history.jsonl").read_text() + '{"cut by a cra')
    last, skipped = h.last(1)
    assert last[0]["to"] == "/r/99" and skipped == 1  # a line cut mid-write is skipped, and counted


GARBAGE = [b"42", b"{}", b"[]", b"null", b'"text"', b'{"at": 1, "started_at": 1, "reason": "swap", "outcome": "done"}',
           b'{"at": "noon", "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done"}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done", "durations": {"x": "slow"}}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done", "decided": {"what": 1}}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done", "error": "boom"}',
           b"\xff\xfe not utf-8", b"[" * 100_000, b'{"at": 1e999, "started_at": 1, "reason": "s", "to": "/r", "outcome": "d"}',
           b'{"at": 1e308, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done"}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "\\ud800"}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done", "traffic": true}',
           b'{"at": 2, "started_at": 1, "reason": "swap", "to": "/r", "outcome": "done", "by": {"user": 5}}']


@pytest.mark.e2e
def test_damaged_history_lines_are_skipped_and_counted_never_a_failure(make_daemon, releases: Path) -> None:
    """Garbage in history.jsonl (an edit, a disk error, deep nesting): `history` shows the good
    entries, says how many lines it skipped, and never fails or echoes the file."""
    run = make_daemon()
    assert run.cli("swap", str(make_build(releases, "v2"))).returncode == 0
    path = run.dir / "run" / "history.jsonl"
    good = path.read_bytes()
    path.write_bytes(b"\n".join(GARBAGE) + b"\n" + good + b"\n".join(GARBAGE) + b"\n")
    for args in ((), ("--json",)):
        r = run.cli("history", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{2 * len(GARBAGE)} damaged line(s) of history.jsonl skipped" in r.stderr, r.stderr
        assert "v1 -> v2" in r.stdout or '"to": "' in r.stdout, r.stdout
        assert len(r.stdout) + len(r.stderr) < 5000  # nothing of the garbage echoed
    assert [Path(json.loads(ln)["to"]).name for ln in run.cli("history", "--json").stdout.splitlines()] == ["v2"]
    # An entry that is one, but holds escape sequences or a huge name: shown, cleaned and cut.
    odd = {**json.loads(good.splitlines()[-1]), "to": "/r/\x1b[2J\x1b[31m" + "x" * 5000}
    path.write_bytes(good + json.dumps(odd).encode() + b"\n")
    text = run.cli("history").stdout
    assert "\x1b" not in text and "?[2J?[31m" in text and len(text) < 2000, text


def test_a_history_line_is_never_glued_to_a_damaged_one(tmp_path: Path) -> None:
    """A last line with no end (a crash mid-write, a paste) must not swallow the next swap's line."""
    path = tmp_path / "history.jsonl"
    h = History(path, 1 << 20, 3)
    path.write_bytes(b'{"at": 1, "reason": "sw')  # cut short, no newline
    h.record({"reason": "swap", "build": "/r/2", "from_build": "/r/1", "outcome": "done", "traffic": "moved",
              "started_at": 1000.0, "finished_at": 1001.0, "durations": {}})
    entries, skipped = h.last(10)
    assert [e["to"] for e in entries] == ["/r/2"] and skipped == 1
    h.record({"reason": "swap", "build": "/r/3", "from_build": "/r/2", "outcome": "done", "traffic": "moved",
              "started_at": 1002.0, "finished_at": 1003.0, "durations": {}})
    assert path.read_bytes().count(b"\n\n") == 0  # a whole last line gets no blank line after it
    assert [e["to"] for e in h.last(10)[0]] == ["/r/2", "/r/3"]
