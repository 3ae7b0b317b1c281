"""Several apps on one host (issue 13): one daemon and one config per app (the bluegreen@ unit's
layout) behind one nginx of the user's, each app's upstream in its own included file. Swaps on
both apps at the same moment, each under load, reload the same nginx twice at once: neither may
lose a request, and neither may touch the other's upstream."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import render_config
from helpers import DaemonRun, Load, free_ports, http_get, kill_tree, make_build, user_nginx_conf, wait_until
from supervisor.config import resolve_binary
from supervisor.nginx import render_upstream

pytestmark = pytest.mark.e2e

APPS = ("shop", "blog")

@pytest.fixture
def two_apps(short_tmp: Path):
    nginx = resolve_binary("nginx")
    assert nginx, "nginx is not installed: run scripts/test"
    prefix = short_tmp / "nginx"
    (prefix / "conf.d").mkdir(parents=True)
    ports = free_ports(6)
    apps = {app: {"listen": ports[3 * i], "ports": (ports[3 * i + 1], ports[3 * i + 2])} for i, app in enumerate(APPS)}
    conf = prefix / "nginx.conf"
    conf.write_text(user_nginx_conf(prefix, {a["listen"]: name for name, a in apps.items()}))
    for name, a in apps.items():
        (prefix / "conf.d" / f"{name}.conf").write_text(render_upstream(name, a["ports"][0]))
    base = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    master = subprocess.Popen(base + ["-g", "daemon off;"], start_new_session=True)
    wait_until(lambda: (prefix / "nginx.pid").exists() and (prefix / "nginx.pid").read_text().strip(), 30,
               "the user's nginx to start")
    runs: dict[str, DaemonRun] = {}
    try:
        for name, a in apps.items():
            d = short_tmp / name  # /etc/bluegreen/<app>.toml and its own state_dir, as with bluegreen@<app>
            d.mkdir()
            cfg = d / "bluegreen.toml"
            cfg.write_text(render_config(d, build=make_build(d / "releases", "v1"), ports=a["ports"], listen=a["listen"],
                                         nginx="\n".join([
                                             'mode = "external"', 'switch = "reload"',
                                             f'upstream_file = "{prefix}/conf.d/{name}.conf"',
                                             f'upstream_name = "{name}"', f'pid_file = "{prefix}/nginx.pid"',
                                             f'error_log = "{prefix}/error.log"',
                                             "test_command = [" + ", ".join(f'"{x}"' for x in base + ["-t"]) + "]",
                                             "reload_command = [" + ", ".join(f'"{x}"' for x in base + ["-s", "reload"])
                                             + "]"])))
            runs[name] = DaemonRun(dir=d, config=cfg, listen_port=a["listen"], ports=a["ports"]).start()
        yield runs, prefix
    finally:
        for run in runs.values():
            run.stop()
        master.send_signal(signal.SIGQUIT)
        try:
            master.wait(30)
        except subprocess.TimeoutExpired:
            pass
        kill_tree([master.pid])


def test_two_apps_swapped_at_the_same_moment_behind_one_nginx_lose_nothing(two_apps) -> None:
    runs, prefix = two_apps
    for name, run in runs.items():
        assert http_get(run.listen_port, "/") == (200, "hello from v1\n")
    builds = {name: make_build(run.dir / "releases", "v2") for name, run in runs.items()}
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    go = threading.Barrier(len(runs))

    def swap(name: str) -> None:
        go.wait()
        results[name] = runs[name].cli("swap", str(builds[name]))

    with Load(runs["shop"].listen_port, clients=4) as shop, Load(runs["blog"].listen_port, clients=4) as blog:
        wait_until(lambda: shop.slow_ok >= 1 and blog.slow_ok >= 1, 60, "load on both apps")
        threads = [threading.Thread(target=swap, args=(name,)) for name in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wait_until(lambda: shop.versions["v2"] >= 10 and blog.versions["v2"] >= 10, 60, "both apps serving v2")
    for name in runs:
        assert results[name].returncode == 0, (name, results[name].stdout, results[name].stderr)
    assert not shop.failures and not blog.failures, (shop.failures, shop.examples, blog.failures, blog.examples)
    for name, run in runs.items():
        st = run.status()
        assert st["active"]["build"] == str(builds[name]) and st["active"]["port"] == run.ports[1]
        assert (prefix / "conf.d" / f"{name}.conf").read_text() == render_upstream(name, run.ports[1])
        assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
    # Each daemon's history names only its own app.
    for name, run in runs.items():
        assert run.cli("history", "--json").stdout.count('"reason": "swap"') == 1
