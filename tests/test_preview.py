"""Preview and promote (issue 11), end to end through a real nginx, the CLI and the example Node
app under load: `swap --pause` lets requests that ask for the preview reach the new build while
everyone else stays on the old one, until `promote` or `abort`; in both switch modes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import Load, http_get, make_build, managed_nginx, running, wait_until
from supervisor.processes import sockets

pytestmark = pytest.mark.e2e

PREVIEW = {"X-Bluegreen-Preview": "1"}
COOKIE = {"Cookie": "theme=dark; bluegreen_preview=1"}


def body(port: int, headers: dict[str, str] | None = None) -> str:
    status, text = http_get(port, "/", headers=headers)
    assert status == 200, (status, text)
    return text


@pytest.mark.parametrize("switch", ["runtime", "reload"])
def test_a_paused_swap_previews_the_new_build_to_header_and_cookie_requests_then_promote_moves_everyone(
        make_daemon, releases: Path, switch: str) -> None:
    from helpers import free_ports

    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, switch))
    with Load(run.listen_port, clients=4) as load:
        r = run.cli("swap", str(make_build(releases, "v2")), "--pause")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "paused: " in r.stdout and "X-Bluegreen-Preview: 1" in r.stdout and "bluegreen promote" in r.stdout
        assert body(run.listen_port, PREVIEW) == "hello from v2\n"
        assert body(run.listen_port, COOKIE) == "hello from v2\n"
        assert body(run.listen_port, {"X-Bluegreen-Preview": "0"}) == "hello from v1\n"
        assert body(run.listen_port) == "hello from v1\n"
        st = run.status()
        assert st["paused"]["standby"]["port"] == run.ports[1] and st["active"]["slot"] == "blue"
        assert st["swap"]["phase"] == "paused"
        text = run.cli("status").stdout
        assert "paused   for " in text and "bluegreen promote | abort" in text, text
        during = dict(load.versions)
        p = run.cli("promote")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "switch" in p.stdout and "done in" in p.stdout, p.stdout
        assert body(run.listen_port) == "hello from v2\n"
    assert set(during) == {"v1"}, during  # nobody without the header saw the preview
    assert not load.failures, (load.failures, load.examples)
    st = run.status()
    assert st["paused"] is None and st["active"]["slot"] == "green"
    last = st["last_swap"]
    assert last["outcome"] == "done" and last["details"]["paused"]["decision"] == "promote"
    assert not sockets.listening(run.ports[0])  # the old build was drained and stopped as usual
    # The history says who started the swap and who promoted it.
    entry = json.loads(run.cli("history", "--json").stdout.splitlines()[-1])
    assert entry["decided"]["what"] == "promote" and entry["decided"]["by"]["uid"] == os.getuid(), entry
    assert entry["by"]["uid"] == os.getuid() and entry["decided"]["at"] >= entry["started_at"]
    assert f"promoted by {entry['decided']['by']['user']}" in run.cli("history").stdout


def test_abort_ends_the_preview_and_stops_the_standby_with_traffic_never_moved(make_daemon, releases: Path) -> None:
    run = make_daemon()
    with Load(run.listen_port, clients=4) as load:
        assert run.cli("swap", str(make_build(releases, "v2")), "--pause").returncode == 0
        standby = run.status()["paused"]["standby"]["pid"]
        assert body(run.listen_port, PREVIEW) == "hello from v2\n"
        r = run.cli("abort")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "aborted the swap to" in r.stdout and "traffic never moved" in r.stdout
        assert body(run.listen_port, PREVIEW) == "hello from v1\n"  # the preview route is gone
    assert not load.failures, (load.failures, load.examples)
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the standby to stop")
    assert not running(standby)
    last = run.status()["last_swap"]
    assert last["error"]["code"] == "aborted" and last["traffic"] == "unchanged"
    entry = json.loads(run.cli("history", "--json").stdout.splitlines()[-1])
    assert entry["decided"]["what"] == "abort" and entry["decided"]["by"]["uid"] == os.getuid(), entry
    assert f"aborted by {entry['decided']['by']['user']}" in run.cli("history").stdout
    assert run.cli("swap", str(make_build(releases, "v3"))).returncode == 0  # the slot is free again
    assert body(run.listen_port) == "hello from v3\n"


def test_promote_or_abort_with_nothing_paused_names_the_state(make_daemon) -> None:
    run = make_daemon()
    for verb in ("promote", "abort"):
        r = run.cli(verb)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"[not_paused]: nothing to {verb}: no swap is paused or rolling out (no swap is running)" in r.stderr, r.stderr
    assert body(run.listen_port) == "hello from v1\n"


def test_a_second_swap_while_paused_is_refused_naming_promote_and_abort(make_daemon, releases: Path) -> None:
    run = make_daemon()
    assert run.cli("swap", str(make_build(releases, "v2")), "--pause").returncode == 0
    r = run.cli("swap", str(make_build(releases, "v3")))
    assert r.returncode == 1 and "[busy]" in r.stderr and "is paused for preview" in r.stderr, r.stderr
    assert run.cli("abort").returncode == 0


def test_a_paused_swap_nobody_decides_is_aborted_at_the_pause_timeout(make_daemon, releases: Path) -> None:
    run = make_daemon(extra="[release]\npause_timeout = 1")
    assert run.cli("swap", str(make_build(releases, "v2")), "--pause").returncode == 0
    wait_until(lambda: (run.status() or {}).get("last_swap") is not None, 30, "the pause to time out")
    last = run.status()["last_swap"]
    assert last["error"]["code"] == "pause_timeout" and "release.pause_timeout (1s)" in last["error"]["message"]
    assert last["traffic"] == "unchanged"
    assert body(run.listen_port, PREVIEW) == "hello from v1\n"
    wait_until(lambda: not sockets.listening(run.ports[1]), 30, "the standby to stop")


def test_a_daemon_killed_while_paused_comes_back_on_the_old_build_with_the_standby_removed(
        make_daemon, releases: Path) -> None:
    run = make_daemon()
    with Load(run.listen_port, clients=4) as load:
        assert run.cli("swap", str(make_build(releases, "v2")), "--pause").returncode == 0
        standby = run.status()["paused"]["standby"]["pid"]
        assert body(run.listen_port, PREVIEW) == "hello from v2\n"
        run.kill()
        run.start()
        wait_until(lambda: not running(standby), 60, "the previewed standby to be stopped")
        assert body(run.listen_port, PREVIEW) == "hello from v1\n"
        assert body(run.listen_port) == "hello from v1\n"
    assert not load.failures, (load.failures, load.examples)
    st = run.status()
    assert st["paused"] is None and st["standby"] is None and st["active"]["slot"] == "blue"


def preview_token(swap_stdout: str) -> str:
    """The token `swap --pause` printed (release.preview_token = "random")."""
    import re

    m = re.search(r"'X-Bluegreen-Preview: ([A-Za-z0-9_-]+)'", swap_stdout)
    assert m and m.group(1) != "1", swap_stdout
    return m.group(1)


def test_with_a_random_preview_token_only_requests_that_carry_it_see_the_preview(shape, releases: Path) -> None:
    """The documented header with `1` no longer reaches the new build; the token printed by
    `swap --pause` does (header or cookie), on a restarted nginx too; each pause has its own."""
    from shapes import app_build
    from helpers import answering
    from test_supervision import restart_nginx

    run, user = shape('[release]\npreview_token = "random"')
    r = run.cli("swap", str(app_build(releases, "v2")), "--pause")
    assert r.returncode == 0, r.stdout + r.stderr
    token = preview_token(r.stdout)
    assert f"bluegreen_preview={token}" in r.stdout and token in run.cli("status").stdout
    port = run.listen_port
    assert body(port, PREVIEW) == body(port, COOKIE) == "hello from v1\n"  # the documented value: no preview
    assert body(port, {"X-Bluegreen-Preview": token}) == "hello from v2\n"
    assert body(port, {"Cookie": f"bluegreen_preview={token}"}) == "hello from v2\n"
    for other in {token.lower(), token.upper(), token[:-1], token + "x", f"1, {token}"} - {token}:
        assert body(port, {"X-Bluegreen-Preview": other}) == "hello from v1\n", other
    restart_nginx(run, user)  # nginx forgets its table: the daemon sets the preview, with its token, again
    # (the restarted nginx may refuse connections for a moment: `answering` waits through that)
    wait_until(lambda: answering(port, {"v2": 3}, **{"X-Bluegreen-Preview": token}), 30,
               "the preview back on the restarted nginx", run.output)
    assert body(port, PREVIEW) == "hello from v1\n"
    assert run.cli("abort").returncode == 0
    assert body(port, {"X-Bluegreen-Preview": token}) == "hello from v1\n"
    again = preview_token(run.cli("swap", str(app_build(releases, "v3")), "--pause").stdout)
    assert again != token and body(port, {"X-Bluegreen-Preview": token}) == "hello from v1\n"
    assert body(port, {"X-Bluegreen-Preview": again}) == "hello from v3\n"
    assert run.cli("promote").returncode == 0 and body(port) == "hello from v3\n"


def test_the_reload_switch_matches_the_random_preview_token_too(make_daemon, releases: Path) -> None:
    from helpers import free_ports

    listen = free_ports(1)[0]
    run = make_daemon(listen=listen, nginx=managed_nginx(listen, "reload"), extra='[release]\npreview_token = "random"')
    r = run.cli("swap", str(make_build(releases, "v2")), "--pause")
    token = preview_token(r.stdout)
    assert body(run.listen_port, PREVIEW) == "hello from v1\n"
    assert body(run.listen_port, {"X-Bluegreen-Preview": token}) == "hello from v2\n"
    assert body(run.listen_port, {"Cookie": f"bluegreen_preview={token}"}) == "hello from v2\n"
    for other in {token.lower(), token.upper(), token[:-1], token + "x", f"1, {token}"} - {token}:  # nginx's maps ignore case
        assert body(run.listen_port, {"X-Bluegreen-Preview": other}) == "hello from v1\n", other
        assert body(run.listen_port, {"Cookie": f"bluegreen_preview={other}"}) == "hello from v1\n", other
    assert run.cli("abort").returncode == 0
    assert body(run.listen_port, {"X-Bluegreen-Preview": token}) == "hello from v1\n"
