"""Release hooks (issue 11), end to end through a real nginx, the CLI and the example Node app
under load: seed 000's expand and contract migrations as before_switch and after_switch, their
output streamed to the client, and every way a hook can fail leaving traffic where it should be."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from helpers import Load, bluegreen, http_get, make_build, running, wait_until
from supervisor.processes import sockets
from conftest import render_config

pytestmark = pytest.mark.e2e


def script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def alive_in_group(group: int) -> list[int]:
    """The live (not zombie) processes of process group `group`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return out


def hooks(**argv: list[str] | str | float) -> str:
    lines = []
    for k, v in argv.items():
        lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else str(v).replace("'", '"')))
    return "[hooks]\n" + "\n".join(lines)


def test_expand_and_contract_run_around_the_switch_with_the_builds_and_ports_in_their_env(
        make_daemon, short_tmp: Path, releases: Path) -> None:
    log = short_tmp / "migrations.log"
    migrate = script(short_tmp / "migrate", f'echo "$1: schema step for $BLUEGREEN_NEW_BUILD"\n'
                     f'echo "$1 old=$BLUEGREEN_OLD_BUILD new=$BLUEGREEN_NEW_BUILD '
                     f'ports=$BLUEGREEN_OLD_PORT-$BLUEGREEN_NEW_PORT arg=$2" >> {log}\n')
    run = make_daemon(extra=hooks(before_switch=[str(migrate), "expand", "{port}"],
                                  after_switch=[str(migrate), "contract", "{build_name}"]))
    v1, v2 = run.status()["active"]["build"], make_build(releases, "v2")
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(v2))
    assert r.returncode == 0, r.stdout + r.stderr
    blue, green = run.ports
    assert log.read_text().splitlines() == [f"expand old={v1} new={v2} ports={blue}-{green} arg={green}",
                                            f"contract old={v1} new={v2} ports={blue}-{green} arg=v2"]
    out = r.stdout
    assert f"before_switch | expand: schema step for {v2}" in out and "after_switch | contract: schema step" in out
    # expand before any traffic moves; contract once the old build is drained, before it stops
    assert out.index("before_switch |") < out.index("\n  switch ") < out.index("\n  drain ") \
        < out.index("after_switch |") < out.index("\n  stop ")
    assert not load.failures, (load.failures, load.examples)
    assert "hook before_switch: expand: schema step" in (run.dir / "run" / "logs" / "daemon.log").read_text()


def test_a_failing_before_switch_aborts_the_swap_with_traffic_unchanged(make_daemon, short_tmp: Path,
                                                                        releases: Path) -> None:
    expand = script(short_tmp / "expand", 'echo "adding column users.email_verified"\n'
                    'echo "ERROR: lock timeout on table users" >&2\nexit 3\n')
    run = make_daemon(extra=hooks(before_switch=[str(expand)]))
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "before_switch | adding column users.email_verified" in r.stdout
    assert "[hook_failed]" in r.stderr and "exited with status 3" in r.stderr
    assert "ERROR: lock timeout on table users" in r.stderr and "traffic is unchanged" in r.stderr
    assert not load.failures, (load.failures, load.examples)
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the standby to stop")
    assert run.status()["last_swap"]["error"]["phase"] == "before_switch"


def test_a_hanging_hook_is_killed_with_its_children_at_the_timeout(make_daemon, short_tmp: Path,
                                                                   releases: Path) -> None:
    pid_file = short_tmp / "hook.pid"
    hang = script(short_tmp / "hang", f'echo $$ > {pid_file}\necho "waiting for the migration lock"\nsleep 300\n')
    run = make_daemon(extra=hooks(before_switch=[str(hang)], timeout=1))
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did not finish within hooks.timeout (1s) and was killed" in r.stderr, r.stderr
    assert "waiting for the migration lock" in r.stderr
    group = int(pid_file.read_text())
    assert not alive_in_group(group)  # the hook and its `sleep` are gone
    assert http_get(run.listen_port) == (200, "hello from v1\n")


def test_a_failing_after_switch_warns_by_default(make_daemon, short_tmp: Path, releases: Path) -> None:
    notify = script(short_tmp / "notify", 'echo "chat webhook: 503"\nexit 1\n')
    run = make_daemon(extra=hooks(after_switch=[str(notify)]))
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: after_switch: hooks.after_switch" in r.stdout and "exited with status 1" in r.stdout
    assert http_get(run.listen_port) == (200, "hello from v2\n")


def test_a_failing_after_switch_can_send_traffic_back_to_the_old_build(make_daemon, short_tmp: Path,
                                                                       releases: Path) -> None:
    contract = script(short_tmp / "contract", 'echo "dropping column users.legacy_flag"\nexit 2\n')
    run = make_daemon(extra=hooks(after_switch=[str(contract)], after_switch_failed="rollback"))
    old = run.status()["active"]["pid"]
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[hook_failed]" in r.stderr and "traffic is back on the old build" in r.stderr
    assert not load.failures, (load.failures, load.examples)
    st = run.status()
    assert st["active"]["pid"] == old and st["last_swap"]["traffic"] == "restored"
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the new build to stop")


def test_after_failure_is_told_what_failed(make_daemon, short_tmp: Path, releases: Path) -> None:
    told = short_tmp / "told"
    notify = script(short_tmp / "notify", f'echo "$BLUEGREEN_ERROR_CODE $BLUEGREEN_PHASE $BLUEGREEN_TRAFFIC" > {told}\n')
    run = make_daemon(extra='[[release.checks]]\npath = "/"\nbody = "hello from v9"\n' + hooks(after_failure=[str(notify)]))
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1 and "[checks_failed]" in r.stderr, r.stderr
    assert told.read_text() == "checks_failed check unchanged\n"


def test_a_hook_that_cannot_run_is_named_by_check_config_and_at_the_swap(make_daemon, short_tmp: Path,
                                                                        releases: Path) -> None:
    expand = script(short_tmp / "expand", "exit 0\n")
    cfg = short_tmp / "check.toml"
    expand.chmod(0o644)
    cfg.write_text(render_config(short_tmp, build=short_tmp, ports=(20001, 20002), listen=20003,
                                 extra=hooks(before_switch=[str(expand)], after_switch=["no-such-migrate-tool"])))
    r = bluegreen("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"hooks.before_switch: {expand} is not executable (chmod +x {expand})" in r.stderr
    assert "hooks.after_switch: 'no-such-migrate-tool' is not on PATH" in r.stderr

    expand.chmod(0o755)
    run = make_daemon(extra=hooks(before_switch=[str(expand)]))
    expand.chmod(0o644)  # broken after the daemon started: the swap says so, traffic stays
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 1 and "[hook_failed]" in r.stderr and "is not executable" in r.stderr, r.stderr
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    # Executable, but its #! interpreter is not installed: the kernel's ENOENT names the interpreter here.
    expand.write_text("#!/usr/bin/no-such-python3\nprint('expand')\n")
    expand.chmod(0o755)
    r = bluegreen("check-config", "-c", str(cfg))
    assert (f"hooks.before_switch: {expand} exists, but its first line (#!) names /usr/bin/no-such-python3, which "
            "is not installed") in r.stderr, r.stderr
    r = run.cli("swap", str(make_build(releases, "v3")))
    assert r.returncode == 1 and "names /usr/bin/no-such-python3, which is not installed" in r.stderr, r.stderr
    assert http_get(run.listen_port) == (200, "hello from v1\n")
    expand.write_bytes(b"#!/bin/sh\r\necho expand\r\n")  # edited on Windows
    r = bluegreen("check-config", "-c", str(cfg))
    assert "ends with a carriage return: the file has Windows line ends (dos2unix it)" in r.stderr, r.stderr
    r = run.cli("swap", str(make_build(releases, "v4")))
    assert r.returncode == 1 and "Windows line ends" in r.stderr, r.stderr
    expand.write_text("#!/tmp\necho expand\n")
    r = bluegreen("check-config", "-c", str(cfg))
    assert "its first line (#!) names /tmp, which is not an executable file" in r.stderr, r.stderr


def test_a_hook_left_running_by_a_killed_daemon_is_stopped_by_the_next_one(make_daemon, short_tmp: Path,
                                                                           releases: Path) -> None:
    """Otherwise the retried swap would run a second migration beside the first."""
    pid_file = short_tmp / "hook.pid"
    expand = script(short_tmp / "expand", f'echo $$ > {pid_file}\nsleep 300\n')
    run = make_daemon(extra=hooks(before_switch=[str(expand)]))
    swap = run.cli_background("swap", str(make_build(releases, "v2")))
    try:
        # the whole line: `echo $$ >` creates the file before it writes the number
        wait_until(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"), 60, "the hook to start")
        group = int(pid_file.read_text())
        run.kill()
        swap.communicate(timeout=60)
        assert alive_in_group(group)  # nothing stopped it yet
        run.start()
        wait_until(lambda: not alive_in_group(group), 30, "the next daemon to stop the left-over hook")
    finally:
        if swap.poll() is None:
            swap.kill()
        if alive_in_group(group):
            os.killpg(group, 9)
    st = run.status()
    assert st["active"]["slot"] == "blue" and st["standby"] is None
    assert any(e["event"] == "hook_stopped" and "hooks.before_switch" in e["hook"] for e in st["events"]), st["events"]
    assert "left by a daemon that was killed" in (run.dir / "run" / "logs" / "daemon.log").read_text()
    assert http_get(run.listen_port) == (200, "hello from v1\n")


@pytest.mark.parametrize("ends", ["exits 0", "times out"])
def test_a_helper_a_hook_starts_with_setsid_never_outlives_the_hook(make_daemon, short_tmp: Path, releases: Path,
                                                                    ends: str) -> None:
    """Migration scripts fork watchers (`setsid helper &`) that leave the hook's process group and
    may hold its output open: the hook is judged by its own exit, and what it left is stopped."""
    pid_file = short_tmp / "helper.pid"
    rest = "exit 0\n" if ends == "exits 0" else "sleep 300\n"
    expand = script(short_tmp / "expand", f'echo migrating\nsetsid sh -c \'echo $$ > {pid_file}; exec sleep 300\' &\n'
                                          f'while [ ! -s {pid_file} ]; do sleep 0.05; done\n{rest}')
    run = make_daemon(extra=hooks(before_switch=[str(expand)], timeout=20))
    r = run.cli("swap", str(make_build(releases, "v2")))
    helper = int(pid_file.read_text())
    assert "hooks.before_switch left 1 process(es) running after it ended; stopped: pid" in r.stdout + r.stderr, r
    if ends == "exits 0":  # not "did not finish within hooks.timeout" while the helper held its output
        assert r.returncode == 0, r.stdout + r.stderr
        assert http_get(run.listen_port) == (200, "hello from v2\n")
    else:
        assert r.returncode == 1 and "did not finish within hooks.timeout (20s)" in r.stderr, r.stderr
    wait_until(lambda: not running(helper), 10, "the helper to be gone")


def test_a_helper_that_clears_its_environment_never_outlives_the_hook_either(make_daemon, short_tmp: Path,
                                                                            releases: Path) -> None:
    """`env -i setsid helper &`: no marker of the run is left on it, but it was seen as the hook's
    descendant while the hook ran: it is stopped once the hook ends, and (an orphan reparented to
    the daemon, a child subreaper) reaped: no zombie left."""
    pid_file = short_tmp / "helper.pid"
    # (the hook goes on a moment after starting it, as a real one does: one look at its descendants
    # every 20 ms sees the helper; one started in the hook's last milliseconds may be missed)
    expand = script(short_tmp / "expand", f"env -i setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' &\n"
                                          f"while [ ! -s {pid_file} ]; do sleep 0.05; done\nsleep 0.3\nexit 0\n")
    run = make_daemon(extra=hooks(before_switch=[str(expand)], timeout=20))
    r = run.cli("swap", str(make_build(releases, "v2")))
    assert r.returncode == 0, r.stdout + r.stderr
    helper = int(pid_file.read_text())
    assert f"hooks.before_switch left 1 process(es) running after it ended; stopped: pid {helper}" in r.stdout, r
    daemon = psutil.Process(run.proc.pid)
    wait_until(lambda: helper not in [c.pid for c in daemon.children()], 10, "the daemon to reap the helper")



def test_a_hook_that_prints_a_flood_to_a_client_that_does_not_read_does_not_grow_the_daemon(
        make_daemon, short_tmp: Path, releases: Path) -> None:
    """Progress lines for a client that does not read are left out past 1 MiB unread, and said;
    the final reply always arrives."""
    import json
    import socket

    flood = script(short_tmp / "flood", "yes " + "x" * 1200 + " | head -c 50000000\n")  # 41,632 lines of 1201 bytes
    run = make_daemon(extra=hooks(before_switch=[str(flood)], timeout=120))
    daemon = psutil.Process(run.proc.pid)
    before = daemon.memory_info().rss
    with socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(run.socket))
        s.sendall(json.dumps({"cmd": "swap", "build": str(make_build(releases, "v2"))}).encode() + b"\n")
        wait_until(lambda: (run.status() or {}).get("swap") is None, 180, "the swap to end while nobody reads")
        grown = daemon.memory_info().rss - before
        s.settimeout(30)
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
    lines = data.decode().splitlines()
    final = json.loads(lines[-1])
    assert final["ok"], final
    assert any("progress line(s) left out: this client read too slowly" in ln for ln in lines)
    assert len(data) < 5_000_000, len(data)  # not the 50 MB the hook printed
    assert grown < 30 * 1024 * 1024, f"the daemon grew by {grown / 1048576:.1f} MB"
    # the first 2000 lines logged and streamed (each cut to 1000 characters), the rest counted
    total = -(-50_000_000 // 1201)
    assert final["result"]["swap"]["details"]["before_switch"]["lines"] == total
    assert f"{total - 2000} more line(s) of hooks.before_switch not shown" in run.log.read_text()
