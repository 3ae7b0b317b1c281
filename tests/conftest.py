from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import DaemonRun, example_config, free_ports, make_build, release_ports, stop_all  # noqa: E402
from shapes import SHAPES, stop_with_nginx  # noqa: E402


# Tests that measure time or load the machine hard: scripts/test runs them alone, after the
# parallel part, so that neither disturbs the other (2 cores).
SERIAL_FILES = {"test_bench.py", "test_chaos.py", "test_split.py", "test_examples.py", "test_ansible.py"}
SERIAL_TESTS = {"test_a_slow_build_is_reverted_when_latency_ratio_is_set"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SERIAL_FILES or item.originalname in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)


def needs(binary: str) -> None:
    if shutil.which(binary) is None and shutil.which(binary, path="/usr/sbin") is None:
        pytest.fail(f"{binary} is not installed: run scripts/test, which installs it")


@pytest.fixture(autouse=True)
def _ports_released() -> Iterator[None]:
    """Every test's ports go back to the pool when its teardown (servers stopped) is done."""
    yield
    release_ports()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: a Unix socket path must fit in 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="bg-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def render_config(d: Path, *, build: Path, ports: tuple[int, int], listen: int, extra: str = "",
                  ready: str = 'url = "http://127.0.0.1:{port}/health"\ntimeout = 30\ninterval = 0.05',
                  drain_timeout: float = 30, stop_timeout: float = 10, nginx: str | None = None,
                  command: str = '["node", "server.js"]', daemon: str = "", drain: str = "", app: str = "") -> str:
    nginx = nginx if nginx is not None else f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 2'
    return f"""
[daemon]
state_dir = "run"
{daemon}

[app]
command = {command}
env = {{ PORT = "{{port}}" }}
ports = [{ports[0]}, {ports[1]}]
build = "{build}"
{app}

[app.ready]
{ready}

[app.stop]
timeout = {stop_timeout}

[drain]
timeout = {drain_timeout}
{drain}

[nginx]
{nginx}
{extra}
"""


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., DaemonRun]]:
    """Start real daemons (managed nginx by default) and always tear them down, leftovers included."""
    needs("nginx")
    needs("node")
    runs: list[DaemonRun] = []

    def factory(start: bool = True, ports: tuple[int, int] | None = None, listen: int | None = None,
                example: Path | None = None, **kw: Any) -> DaemonRun:
        picked = free_ports(3)
        listen = listen or picked[0]
        blue, green = ports or (picked[1], picked[2])
        cfg = short_tmp / "bluegreen.toml"
        if example is not None:  # a shipped example config, only its ports and paths changed
            example_config(example, cfg, listen, (blue, green))
        else:
            build = kw.pop("build", None) or make_build(short_tmp / "releases", "v1")
            cfg.write_text(render_config(short_tmp, build=build, ports=(blue, green), listen=listen, **kw))
        run = DaemonRun(dir=short_tmp, config=cfg, listen_port=listen, ports=(blue, green))
        runs.append(run)
        return run.start() if start else run

    yield factory
    stop_all(runs)


@pytest.fixture
def releases(short_tmp: Path) -> Path:
    d = short_tmp / "releases"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest, make_daemon: Callable[..., DaemonRun], short_tmp: Path,
          releases: Path) -> Iterator[Callable[..., Any]]:
    """Start a daemon (v1 of shapes.APP, or `build`) with the runtime switch on this test's nginx
    shape (tests/shapes.py); the daemons are stopped first, then the users' nginx they switched."""
    from shapes import UserNginx, app_build, start_on

    started: list[tuple[DaemonRun, UserNginx | None]] = []

    def start(extra: str = "", build: Path | None = None, **kw: Any) -> tuple[DaemonRun, UserNginx | None]:
        started.append(start_on(request.param, make_daemon, short_tmp, build or app_build(releases, "v1"), extra, **kw))
        return started[-1]

    yield start
    stop_with_nginx(started)
