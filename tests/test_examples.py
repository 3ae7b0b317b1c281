"""The shipped examples, wrapped unchanged: Node, Tomcat 10 (per-slot CATALINA_BASE) and gunicorn.

Each runs its own example config (only ports and paths changed) through a managed nginx,
swapping under load with a fresh connection per request and some slow requests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, DaemonRun, Load, http_get, wait_until

pytestmark = pytest.mark.e2e
EXAMPLES = ROOT / "examples"


def swap_under_load(run: DaemonRun, builds: list[Path], load: Load) -> list[dict]:
    """Swap to each build in turn; after each, the old app must be gone. Returns the swap records."""
    records = []
    wait_until(lambda: load.slow_ok >= 2, 120, "load to be flowing")
    for build in builds:
        old_pid = run.status()["active"]["pid"]
        r = run.cli("swap", str(build), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not psutil.pid_exists(old_pid), "the old app outlived its drain"
        st = run.status()
        assert st["active"]["build"] == str(build)
        records.append(st["last_swap"])
        after = load.total
        wait_until(lambda after=after: load.total >= after + 10, 60, "requests after the swap")
    return records


def report(name: str, run: DaemonRun, load: Load, records: list[dict]) -> None:
    for r in records:
        total = r["finished_at"] - r["started_at"]
        print(f"\n{name}: swap to {Path(r['build']).name}: ready {r['durations']['ready']:.2f}s, "
              f"switch {r['durations']['switch']:.3f}s, drain {r['durations']['drain']:.2f}s, total {total:.2f}s")
    print(f"{name}: {load.total} requests ({load.slow_ok} slow), {sum(load.failures.values())} failed, "
          f"{len(records)} swaps, versions {dict(load.versions)}")


def test_node_app_swaps_v1_v2_v1_under_load(make_daemon) -> None:
    run = make_daemon(example=EXAMPLES / "node-app" / "bluegreen.toml")
    assert http_get(run.listen_port, "/") == (200, "hello from 1.0.0\n")
    with Load(run.listen_port, clients=6, slow_every=10, slow_ms=1000) as load:
        records = swap_under_load(run, [EXAMPLES / "node-app" / "v2", EXAMPLES / "node-app" / "v1"], load)
    report("node", run, load, records)
    assert not load.failures, (load.failures, load.examples)
    assert set(load.versions) == {"1.0.0", "2.0.0"}


def test_tomcat_swaps_between_webapp_versions_under_load(make_daemon, short_tmp: Path) -> None:
    catalina = Path("/usr/share/tomcat10/bin/catalina.sh")
    assert catalina.exists(), "tomcat10 is not installed: run scripts/test, which installs it"
    run = make_daemon(example=EXAMPLES / "tomcat" / "bluegreen.toml")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    # A release as Tomcat users ship it: a WAR file (docBase points at it), then back to a directory.
    war = short_tmp / "app-2.0.war"
    subprocess.run([sys.executable, str(EXAMPLES / "tomcat" / "make-war"), str(EXAMPLES / "tomcat" / "v2"), str(war)],
                   check=True, capture_output=True)
    with Load(run.listen_port, clients=6, slow_every=10, slow_ms=1000, slow_path="/slow.jsp?ms={ms}") as load:
        records = swap_under_load(run, [war, EXAMPLES / "tomcat" / "v1"], load)
    report("tomcat", run, load, records)
    assert not load.failures, (load.failures, load.examples)
    assert set(load.versions) == {"v1", "v2"}
    assert Path(records[0]["build"]).name == "app-2.0.war"
    for r in records:  # switched only once Tomcat said so in its log *and* served the JSP health page
        assert "Server startup in" in r["details"]["ready"]["log_line"]
    logs = run.dir / "run" / "logs"
    for slot in ("blue", "green"):
        assert "Server startup in" in (logs / f"{slot}.log").read_text()
    # Two separate CATALINA_BASEs, each with the slot's own port in its server.xml.
    for slot, port in zip(("blue", "green"), run.ports):
        server_xml = (run.dir / "run" / "slots" / slot / "conf" / "server.xml").read_text()
        assert f'port="{port}"' in server_xml


def test_tomcat_standby_still_booting_is_stopped_on_cancel_jvm_included(make_daemon, short_tmp: Path) -> None:
    run = make_daemon(example=EXAMPLES / "tomcat" / "bluegreen.toml")
    # A build whose health page is missing: Tomcat boots, but it never becomes ready.
    sick = short_tmp / "sick"
    shutil.copytree(EXAMPLES / "tomcat" / "v2", sick)
    (sick / "health.jsp").unlink()
    swap = run.cli_background("swap", str(sick))
    try:
        standby = wait_until(lambda: (run.status() or {}).get("standby"), 60, "the standby JVM to start")
        jvm = psutil.Process(standby["pid"])
        wait_until(lambda: (run.status() or {}).get("swap", {}) and run.status()["swap"]["phase"] == "ready", 60,
                   "the swap to wait for readiness")
        cancel = run.cli("cancel")
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        out, err = swap.communicate(timeout=120)
        assert swap.returncode == 1 and "[cancelled]" in err
    finally:
        if swap.poll() is None:
            swap.kill()
    psutil.wait_procs([jvm], timeout=30)
    assert not jvm.is_running() or jvm.status() == psutil.STATUS_ZOMBIE
    st = run.status()
    assert st["standby"] is None and st["active"]["slot"] == "blue"
    assert st["last_swap"]["error"]["code"] == "cancelled"
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")


def test_python_app_under_gunicorn_swaps_under_load(make_daemon) -> None:
    assert shutil.which("gunicorn", path=str(Path(sys.executable).parent)), "gunicorn: run scripts/test"
    run = make_daemon(example=EXAMPLES / "python-app" / "bluegreen.toml")
    assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    with Load(run.listen_port, clients=6, slow_every=10, slow_ms=1000) as load:
        records = swap_under_load(run, [EXAMPLES / "python-app" / "v2"], load)
    report("gunicorn", run, load, records)
    assert not load.failures, (load.failures, load.examples)
    assert set(load.versions) == {"v1", "v2"}


def test_the_live_example_releases_with_its_event_stream_reconnecting_to_the_new_build(make_daemon) -> None:
    """examples/live-app as shipped (only ports and paths changed: its config lists /events): a
    stream open on v1 is cut at the grace, said so, and goes on from v2, missing no event."""
    from helpers import EventStream

    run = make_daemon(example=EXAMPLES / "live-app" / "bluegreen.toml")
    stream = EventStream(run.listen_port)
    stream.start()
    try:
        wait_until(lambda: len(stream.events) >= 3, 60, "events from v1")
        r = run.cli("swap", str(EXAMPLES / "live-app" / "v2"), timeout=300)
        assert r.returncode == 0 and "closed 1 long-lived connection(s) at the grace (1 path), cut: no goodbye is " \
            "proven safe for it" in r.stdout, (r.stdout + r.stderr)
        wait_until(lambda: stream.events[-1][0] == "v2", 60, "events from v2")
        assert stream.lost() == []
    finally:
        stream.close()
