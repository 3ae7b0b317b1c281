"""Logs that never fill the disk (issue 13): the app's output rotated by size through its log pump
with no line lost, also while the daemon is killed and a new one adopts the app; the managed
nginx's logs rotated and reopened; and `bluegreen logs`, which reads them like `tail -F`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, as_in_a_terminal, bluegreen, http_get, make_build, wait_until

pytestmark = pytest.mark.e2e

MAX = 8192
LOGS = f"[logs]\nmax_bytes = {MAX}\nbackups = 50"

# Prints numbered lines: `n` of them per GET /log?n=, and one every TICK_MS if set. A gap in the
# numbers is a lost line.
CHATTY = r"""
'use strict';
const http = require('http');
let seq = 0;
const say = () => { seq += 1; console.log(`line ${seq} ` + 'x'.repeat(60)); };
if (process.env.TICK_MS) setInterval(say, Number(process.env.TICK_MS));
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/log') { for (let i = 0; i < Number(url.searchParams.get('n')); i++) say(); }
  res.writeHead(200, { 'content-type': 'text/plain' });
  res.end(`seq ${seq}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
server.listen(Number(process.env.PORT), '127.0.0.1');
"""


def slot_files(logs: Path, slot: str) -> list[Path]:
    """The slot log and its rotated files, oldest first."""
    rotated = sorted(logs.glob(f"{slot}.log.*"), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, logs / f"{slot}.log"]


def numbers(files: list[Path]) -> list[int]:
    text = "".join(p.read_text() for p in files)
    return [int(n) for n in re.findall(r"^line (\d+) ", text, re.M)]


def last_number(files: list[Path]) -> int:
    """The last line number written (0 while a rotation has just renamed the file away: the
    pump opens a new one at once, and the caller waits for the number anyway)."""
    try:
        found = numbers(files[-2:])
    except FileNotFoundError:
        return 0
    return found[-1] if found else 0


def test_app_output_is_rotated_by_size_with_no_line_lost(make_daemon, releases: Path) -> None:
    run = make_daemon(build=make_build(releases, "v1", server_js=CHATTY), extra=LOGS)
    slot = run.status()["active"]["slot"]
    for _ in range(10):
        assert http_get(run.listen_port, "/log?n=100")[0] == 200
    logs = run.dir / "run" / "logs"
    wait_until(lambda: last_number(slot_files(logs, slot)) == 1000, 30, "the pump to write line 1000")
    files = slot_files(logs, slot)
    assert len(files) >= 8, files  # ~70 kB of output, 8 kB files
    assert all(p.stat().st_size <= MAX for p in files), [(p.name, p.stat().st_size) for p in files]
    assert numbers(files) == list(range(1, 1001))  # every line once, in order, across the rotations


@pytest.fixture
def ticking(make_daemon, releases: Path, short_tmp: Path):
    """A daemon whose app prints a numbered line every 5 ms."""
    run = make_daemon(start=False, build=make_build(releases, "v1", server_js=CHATTY), extra=LOGS)
    text = run.config.read_text().replace('env = { PORT = "{port}" }', 'env = { PORT = "{port}", TICK_MS = "5" }')
    run.config.write_text(text)
    return run.start()


def test_the_app_logs_through_a_daemon_kill_and_adoption_without_a_lost_line(ticking) -> None:
    run = ticking
    logs = run.dir / "run" / "logs"
    active = run.status()["active"]
    slot, pid = active["slot"], active["pid"]
    wait_until(lambda: last_number(slot_files(logs, slot)) > 200, 30, "the app to log")
    run.kill()
    rotated_before = len(slot_files(logs, slot))
    seen = last_number(slot_files(logs, slot))
    # Without any daemon: the app still logs, and the pump still rotates.
    wait_until(lambda: len(slot_files(logs, slot)) >= rotated_before + 2, 30, "rotations with no daemon")
    assert psutil.pid_exists(pid)
    run.start()
    after = run.status()["active"]
    assert (after["pid"], after["slot"]) == (pid, slot)  # adopted, not restarted
    wait_until(lambda: last_number(slot_files(logs, slot)) > seen + 600, 30, "more lines after the adoption")
    got = numbers(slot_files(logs, slot))
    assert got == list(range(1, len(got) + 1)), "a line was lost or repeated"
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_the_managed_nginx_logs_are_rotated_and_reopened(make_daemon) -> None:
    run = make_daemon(extra=LOGS)
    prefix = run.dir / "run" / "nginx"
    access = prefix / "access.log"

    def traffic() -> bool:
        for _ in range(20):
            http_get(run.listen_port, "/")
        return (prefix / "access.log.2").exists()

    wait_until(traffic, 60, "access.log to be rotated twice")
    before = access.stat().st_size
    wait_until(lambda: http_get(run.listen_port, "/?after")[0] == 200 and access.stat().st_size > before, 30,
               "nginx to write into the new access.log")
    assert "GET /?after" in access.read_text()
    assert "GET /?after" not in (prefix / "access.log.1").read_text()
    assert "rotated" in (run.dir / "run" / "logs" / "daemon.log").read_text()


def test_bluegreen_logs_shows_the_serving_app_and_follows_it_across_rotations(make_daemon, releases: Path) -> None:
    run = make_daemon(build=make_build(releases, "v1", server_js=CHATTY), extra=LOGS)
    http_get(run.listen_port, "/log?n=30")
    slot = run.status()["active"]["slot"]
    logs = run.dir / "run" / "logs"
    wait_until(lambda: last_number(slot_files(logs, slot)) == 30, 30, "30 lines")
    r = run.cli("logs", "-n", "5")
    assert r.returncode == 0, r.stderr
    assert [ln.split()[1] for ln in r.stdout.splitlines()] == ["26", "27", "28", "29", "30"]
    assert "--- bluegreen" in run.cli("logs", slot, "-n", "100").stdout  # each start is marked

    follow = subprocess.Popen([sys.executable, "-m", "supervisor", "logs", "-f", "-n", "1", "-c", str(run.config)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=as_in_a_terminal)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(follow.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: printed, 30, "bluegreen logs -f to print the last line")
        assert printed[0].startswith("line 30 ")  # following from here on
        for _ in range(5):  # ~35 kB: several rotations while following
            http_get(run.listen_port, "/log?n=100")
        wait_until(lambda: printed[-1].startswith("line 530 "), 30, "bluegreen logs -f to print line 530")
    finally:
        os.killpg(follow.pid, signal.SIGINT)
        follow.wait(10)
        reader.join(10)
    got = [int(n) for n in re.findall(r"^line (\d+) ", "".join(printed), re.M)]
    assert got == list(range(30, 531)), (got[:5], got[-5:], len(got))
    assert follow.returncode == 0


def test_bluegreen_logs_names_what_it_cannot_show(make_daemon) -> None:
    run = make_daemon()
    other = "green" if run.status()["active"]["slot"] == "blue" else "blue"
    r = run.cli("logs", other)
    assert r.returncode == 1
    assert f"the {other} slot has never run" in r.stderr and r.stdout == ""
    for which, expect in (("daemon", "bluegreen"), ("nginx", "access | ")):
        if which == "nginx":
            http_get(run.listen_port, "/")
            wait_until(lambda: (run.dir / "run" / "nginx" / "access.log").stat().st_size > 0, 10, "an access line")
        r = run.cli("logs", which)
        assert r.returncode == 0 and expect in r.stdout, (which, r.stdout, r.stderr)
    r = bluegreen("logs", "blue", "-c", str(run.dir / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run.cli("logs", "-n", "many")
    assert r.returncode == 2 and "expected a number of lines" in r.stderr


def test_logs_are_not_for_every_local_user(make_daemon) -> None:
    """A hook's printed secret and the app's output land in these files: 0640 in a 0750 directory."""
    import stat as st

    run = make_daemon()
    logs = run.dir / "run" / "logs"
    slot = run.status()["active"]["slot"]
    assert st.S_IMODE(logs.stat().st_mode) == 0o750
    for name in ("daemon.log", f"{slot}.log", "nginx.log"):  # nginx.log: the managed nginx's own output
        assert st.S_IMODE((logs / name).stat().st_mode) == 0o640, name


def test_logs_with_a_damaged_state_file_says_which_file_and_what_to_do(short_tmp: Path) -> None:
    """`logs active` reads state.json to find the active slot: a damaged one is one line naming
    the file and the field, exit 1, never a traceback."""
    (short_tmp / "run").mkdir()
    (short_tmp / "run" / "state.json").write_text('{"version": 1, "active": {"slot": "blue", "port": "x"}}')
    cfg = short_tmp / "bluegreen.toml"
    cfg.write_text(f'[app]\ncommand = ["node", "server.js"]\nports = [21001, 21002]\nbuild = "{short_tmp}"\n'
                   '[daemon]\nstate_dir = "run"\n')
    r = bluegreen("logs", "active", "-c", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"bluegreen: [state_invalid] {short_tmp}/run/state.json is not a valid bluegreen state "
                                'file (state.active.port: expected a number, got "x"); move it away to start from '
                                "app.build"), r.stderr


def test_a_build_that_prints_a_huge_line_and_dies_gets_a_bounded_error(make_daemon, releases: Path) -> None:
    """The last lines quoted in an error are cut (each line, and 4 KiB in all): a 10 MiB line does
    not make a 10 MiB CLI error, state.json or status."""
    huge = make_build(releases, "huge", server_js="console.log('starting');\n"
                      "process.stdout.write('x'.repeat(10 * 1024 * 1024) + '\\n', () => process.exit(3));\n")
    run = make_daemon()
    r = run.cli("swap", str(huge))
    assert r.returncode == 1 and "[app_exited]" in r.stderr, r.stderr[:2000]
    assert "xxxx… (" in r.stderr and "more characters)" in r.stderr, r.stderr[:2000]
    assert len(r.stderr) < 12_000, len(r.stderr)
    assert (run.dir / "run" / "state.json").stat().st_size < 100_000
    assert len(run.cli("status", "--json").stdout) < 100_000
    logs = run.dir / "run" / "logs"  # the log itself keeps it all (rotated at logs.max_bytes, 10 MiB)
    wait_until(lambda: sum(p.stat().st_size for p in logs.glob("green.log*")) > 10 * 1024 * 1024, 30, "the whole line")


def test_logs_nginx_with_your_own_nginx_shows_its_error_log_or_says_why_not(short_tmp: Path) -> None:
    """External mode: `logs nginx` shows nginx.error_log; an empty one is said (on stderr, exit 0),
    never a silent nothing; one this user cannot read names the group that can."""
    log = short_tmp / "error.log"
    log.write_text("")
    cfg = short_tmp / "bluegreen.toml"
    cfg.write_text(f'[app]\ncommand = ["node", "server.js"]\nports = [21001, 21002]\nbuild = "{short_tmp}"\n'
                   f'[daemon]\nstate_dir = "run"\n[nginx]\nmode = "external"\nupstream_file = "{short_tmp}/up.conf"\n'
                   f'pid_file = "{short_tmp}/nginx.pid"\nerror_log = "{log}"\n')
    r = bluegreen("logs", "nginx", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == "" and f"{log} is empty" in r.stderr, (r.stdout, r.stderr)
    log.write_text('2026/12/06 10:00:00 [error] 12#12: *3 connect() failed (111: Connection refused)\n')
    r = bluegreen("logs", "nginx", "-c", str(cfg))
    assert r.returncode == 0 and "Connection refused" in r.stdout, (r.stdout, r.stderr)
    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root (CI runs as root)")
    log.chmod(0o640)
    short_tmp.chmod(0o755)
    cfg.chmod(0o644)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "supervisor", "logs", "nginx", "-c", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and f"cannot read {log}: permission denied" in r.stderr and "(root)" in r.stderr, r.stderr
