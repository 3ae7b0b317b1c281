"""The package as users install it: never editable. The README's own install lines run in a fresh
venv (and with pipx), the wheel and the sdist that `python -m build` makes are installed the same
way, and each installed `bluegreen` then does the README's first steps from `/`, outside the
checkout: check-config, the daemon on the example Node app behind a managed nginx, a swap under
load, status, logs and quit, with nothing left running."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from helpers import ROOT, Load, example_config, free_ports, http_get, kill_tree, running, wait_until
from supervisor.processes.slots import marked

pytestmark = pytest.mark.e2e

# A PATH without this checkout's .venv: only the installed bluegreen can answer.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PATH": SYSTEM_PATH}


def readme_install_lines() -> list[str]:
    """The shell lines of the README's "Installing it for your app" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Installing it for your app", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's install section has no sh block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def run(cmd: list[str] | str, timeout: float = 300, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    """Run `cmd` from `/` with the system PATH; it must exit 0."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/", shell=isinstance(cmd, str))
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def source_copy(dest: Path) -> Path:
    """The checkout without its venv, state and build output: what a user clones."""
    junk = shutil.ignore_patterns(".venv", ".git", "run", "build", "dist", "*.egg-info", "__pycache__",
                                  ".pytest_cache", ".hypothesis")
    shutil.copytree(ROOT, dest, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built as a release would build them, checked by twine."""
    out = tmp_path_factory.mktemp("dist")
    src = source_copy(tmp_path_factory.mktemp("src") / "bluegreen")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    wheel, = out.glob("*.whl")
    sdist, = out.glob("*.tar.gz")
    run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    return {"wheel": wheel, "sdist": sdist}


def test_the_wheel_ships_every_subpackage_and_data_file(dists: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    tracked = {str(p.relative_to(ROOT)) for p in (ROOT / "supervisor").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert tracked - names == set(), "files of the package missing from the wheel"


@pytest.fixture
def installed(request: pytest.FixtureRequest, dists: dict[str, Path], tmp_path: Path) -> Iterator[Path]:
    """A `bluegreen` installed the way `request.param` says, in a fresh place; its path."""
    how = request.param
    venv = tmp_path / "opt-bluegreen"
    if how in ("wheel", "sdist"):
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", str(dists[how])])
        yield venv / "bin" / "bluegreen"
        return
    src = source_copy(tmp_path / "bluegreen-src")
    lines = readme_install_lines()
    assert lines[0] == "python3 -m venv /opt/bluegreen && /opt/bluegreen/bin/pip install /path/to/bluegreen"
    assert lines[1].startswith("apt-get install nginx libnginx-mod-http-lua"), lines
    if how == "readme":  # the README's line, with its two paths replaced; apt ran in scripts/bootstrap
        run(lines[0].replace("/opt/bluegreen", str(venv)).replace("/path/to/bluegreen", str(src)))
        yield venv / "bin" / "bluegreen"
    else:  # the README's "# or: pipx install /path/to/bluegreen"
        assert "# or: pipx install /path/to/bluegreen" in (ROOT / "README.md").read_text()
        home, bindir = tmp_path / "pipx", tmp_path / "pipx-bin"
        run([sys.executable, "-m", "pipx", "install", str(src)],
            env=ENV | {"PIPX_HOME": str(home), "PIPX_BIN_DIR": str(bindir)})
        yield bindir / "bluegreen"


@pytest.mark.parametrize("installed", ["readme", "pipx", "wheel", "sdist"], indirect=True)
def test_an_installed_bluegreen_does_the_readme_first_steps_from_outside_the_checkout(
        installed: Path, tmp_path: Path) -> None:
    bluegreen = str(installed)
    assert not str(installed.resolve()).startswith(str(ROOT)), "not an install outside the checkout"
    assert run([bluegreen, "--version"]).stdout.startswith("bluegreen ")
    listen, blue, green = free_ports(3)
    site = tmp_path / "site"
    site.mkdir()
    cfg = example_config(ROOT / "examples" / "node-app" / "bluegreen.toml", site / "bluegreen.toml", listen, (blue, green))
    run([bluegreen, "check-config", "-c", str(cfg)])

    out = open(site / "daemon.out", "wb")
    daemon = subprocess.Popen([bluegreen, "daemon", "-c", str(cfg)], cwd="/", env=ENV, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    seen: list[int] = [daemon.pid]
    try:
        def answers(version: str) -> bool:
            assert daemon.poll() is None, (site / "daemon.out").read_text()[-3000:]
            try:
                return http_get(listen, timeout=5) == (200, f"hello from {version}\n")
            except OSError:
                return False

        wait_until(lambda: answers("1.0.0"), 60, "the installed daemon to serve v1",
                   lambda: (site / "daemon.out").read_text()[-3000:])
        seen += [c.pid for c in psutil.Process(daemon.pid).children(recursive=True)]
        with Load(listen, clients=3, slow_ms=300) as load:
            wait_until(lambda: load.total >= 30, 30, "some load before the swap")
            swap = run([bluegreen, "swap", "-c", str(cfg), str(ROOT / "examples" / "node-app" / "v2")])
            wait_until(lambda: load.versions["2.0.0"] >= 10, 30, "answers from the new build")
        assert "done" in swap.stdout + swap.stderr
        assert load.failures == {}, load.examples
        assert answers("2.0.0")
        seen += [c.pid for c in psutil.Process(daemon.pid).children(recursive=True)]

        status = run([bluegreen, "status", "-c", str(cfg)]).stdout
        assert "v2" in status and "serving" in status, status
        logs = run([bluegreen, "logs", "active", "-n", "20", "-c", str(cfg)]).stdout
        assert "2.0.0" in logs, logs
        run([bluegreen, "quit", "-c", str(cfg)])
        assert daemon.wait(60) == 0, (site / "daemon.out").read_text()[-3000:]
        seen += [p.pid for p in marked(site / "run")]
        still = [pid for pid in seen if running(pid)]
        assert still == [], f"left running after quit: {still}"
        with pytest.raises(OSError):
            http_get(listen, timeout=2)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
        kill_tree(seen)
