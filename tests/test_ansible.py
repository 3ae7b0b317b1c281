"""Past one host (issue 13): the README's Ansible play, run as printed, releases host after host
and stops at the first host whose swap fails, relying only on bluegreen's exit codes.

Three "hosts" are three daemons on this machine, each with its own config, state, nginx and
releases directory, reached with Ansible's local connection. The build is a zip named like the
README's WAR: a Python zipapp, so that the test needs no Tomcat (tests/test_examples.py releases
a real WAR through Tomcat). Release 2 checks its database at start; the second host's cannot be
reached, so there the new build exits and its swap fails with traffic unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import render_config
from helpers import ROOT, DaemonRun, free_ports, http_get

pytestmark = pytest.mark.e2e

HOSTS = ("web1", "web2", "web3")
BROKEN = "web2"

APP = '''\
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELEASE = "{release}"
if RELEASE != "1" and os.environ.get("SHOP_DB") == "unreachable":
    sys.exit("shop " + RELEASE + ": cannot reach the database at start, exiting")


class Shop(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("shop " + RELEASE + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Shop).serve_forever()
'''


def war(path: Path, release: str) -> Path:
    """shop-<release>.war: a zip that `python3 shop-<release>.war` runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__main__.py", APP.format(release=release))
    return path


def readme_block(lang: str) -> str:
    """The `lang` code block in the manual's Ansible paragraph (docs/past-one-host.md)."""
    text = (ROOT / "docs" / "past-one-host.md").read_text()
    section = text[text.index("**Ansible**"):text.index("**Kubernetes**")]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block in docs/past-one-host.md's Ansible paragraph"
    return match.group(1)


@pytest.fixture
def hosts(short_tmp: Path):
    runs: dict[str, DaemonRun] = {}
    try:
        for host in HOSTS:
            listen, blue, green = free_ports(3)
            d = short_tmp / host
            build = war(d / "releases" / "shop-1.war", "1")
            env = 'SHOP_DB = "unreachable"' if host == BROKEN else 'SHOP_DB = "db.internal:5432"'
            cfg = d / "shop.toml"
            cfg.write_text(render_config(d, build=build, ports=(blue, green), listen=listen,
                                         command=f'["{sys.executable}", "{{build}}"]',
                                         ready='url = "http://127.0.0.1:{port}/"\ntimeout = 30\ninterval = 0.05')
                           .replace('env = { PORT = "{port}" }', f'env = {{ PORT = "{{port}}", {env} }}'))
            runs[host] = DaemonRun(dir=d, config=cfg, listen_port=listen, ports=(blue, green)).start()
        yield runs
    finally:
        for run in runs.values():
            run.stop()


def test_the_readme_play_releases_host_by_host_and_stops_at_the_first_failure(hosts, short_tmp: Path) -> None:
    play = short_tmp / "play"
    (play / "dist").mkdir(parents=True)
    (play / "release.yml").write_text(readme_block("yaml"))
    war(play / "dist" / "shop-2.war", "2")
    # The inventory sets exactly the variables the README's inventory names, per host here.
    names = re.findall(r"^(\w+)=", readme_block("ini").split("[web:vars]")[1], re.M)
    assert sorted(names) == ["bluegreen", "bluegreen_config", "releases"]
    lines = ["[web]"] + [
        f"{host} ansible_connection=local bluegreen_config={run.config} releases={run.dir / 'releases'}"
        for host, run in hosts.items()]
    lines += ["", "[web:vars]", f"bluegreen={Path(sys.executable).parent / 'bluegreen'}",
              f"ansible_python_interpreter={sys.executable}"]
    (play / "hosts").write_text("\n".join(lines) + "\n")
    for run in hosts.values():
        assert http_get(run.listen_port, "/") == (200, "shop 1\n")

    env = {**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_HOME": str(short_tmp / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(short_tmp / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "hosts", "release.yml",
                        "-e", "release=2"], cwd=play, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr

    assert r.returncode == 2, out  # ansible's "a host failed"
    # web1 took release 2 (drained, old build stopped: the swap returned 0).
    assert http_get(hosts["web1"].listen_port, "/") == (200, "shop 2\n"), out
    assert hosts["web1"].status()["active"]["build"].endswith("shop-2.war")
    # web2's swap failed before the switch: release 1 still serves, the daemon still runs, and
    # the operator reads why in Ansible's output.
    assert http_get(hosts["web2"].listen_port, "/") == (200, "shop 1\n"), out
    assert hosts["web2"].status()["daemon"]["status"] == "serving"
    assert re.search(r"fatal: \[web2\].*\"rc\": 1\b", out), out
    assert "cannot reach the database" in out, out
    # web3 was never touched: nothing shipped, nothing swapped.
    assert not (hosts["web3"].dir / "releases" / "shop-2.war").exists(), out
    assert "web3" not in out.split("PLAY RECAP")[0], out
    assert http_get(hosts["web3"].listen_port, "/") == (200, "shop 1\n")
    assert '"reason": "swap"' not in hosts["web3"].cli("history", "--json").stdout
