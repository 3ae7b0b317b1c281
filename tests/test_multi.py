"""Several apps on one host (issue 13): one daemon and one config per app (the bluegreen@ unit's
layout) behind one nginx of the user's, each app's file in the directory its nginx.conf includes
with one glob. Swaps on both apps at the same moment, each under load, must not lose a request
nor touch the other's routing: with reloads (two reloads of the same nginx at once) and with
the runtime switch (two routing tables in one nginx, sharing one copy of the request handlers)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import render_config
from helpers import (LUA_MODULES, DaemonRun, Load, free_ports, http_get, make_build, settled_workers,
                     stop_all, user_nginx_conf, wait_until)
from shapes import UserNginx
from supervisor.proxy.render import render_upstream

pytestmark = pytest.mark.e2e

APPS = ("shop", "blog")


class OneNginx:
    """The user's nginx (with the lua module loaded, as Debian's is once the package is in),
    whose http block includes conf.d/*.conf, and a daemon per app started on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.user = UserNginx(root / "nginx")
        self.prefix = self.user.prefix
        (self.prefix / "conf.d").mkdir(parents=True)
        ports = free_ports(6)
        self.apps = {app: {"listen": ports[3 * i], "ports": (ports[3 * i + 1], ports[3 * i + 2])}
                     for i, app in enumerate(APPS)}
        conf = self.prefix / "nginx.conf"
        conf.write_text(user_nginx_conf(self.prefix, {a["listen"]: name for name, a in self.apps.items()}, LUA_MODULES))
        for name, a in self.apps.items():  # what the user had before bluegreen: plain upstreams
            self.file(name).write_text(render_upstream(name, a["ports"][0]))
        self.base = self.user.base
        self.user.start()
        assert self.user.master is not None
        self.master = self.user.master
        self.runs: dict[str, DaemonRun] = {}

    def file(self, name: str) -> Path:
        return self.prefix / "conf.d" / f"{name}.conf"

    def daemon(self, name: str, switch: str, handlers: Path | None = None, wait: bool = True) -> DaemonRun:
        """The daemon of app `name` (/etc/bluegreen/<app>.toml and its own state_dir, as with bluegreen@<app>)."""
        a = self.apps[name]
        d = self.root / name
        d.mkdir()
        nginx = self.user.external(self.file(name), name, switch)
        if handlers is not None:
            nginx.append(f'lua_handlers_file = "{handlers}"')
        cfg = d / "bluegreen.toml"
        cfg.write_text(render_config(d, build=make_build(d / "releases", "v1"), ports=a["ports"], listen=a["listen"],
                                     nginx="\n".join(nginx)))
        self.runs[name] = DaemonRun(dir=d, config=cfg, listen_port=a["listen"], ports=a["ports"])
        return self.runs[name].start(wait)

    def workers(self) -> set[int]:
        return settled_workers(self.master.pid)

    def close(self) -> None:
        try:
            stop_all(list(self.runs.values()))
        finally:
            self.user.close()


@pytest.fixture
def one_nginx(short_tmp: Path) -> Iterator[OneNginx]:
    n = OneNginx(short_tmp)
    try:
        yield n
    finally:
        n.close()


def swap_both_at_once(n: OneNginx) -> None:
    """Swap every app to v2 at the same instant (a barrier), each under load; no request may fail."""
    builds = {name: make_build(run.dir / "releases", "v2") for name, run in n.runs.items()}
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    go = threading.Barrier(len(n.runs))

    def swap(name: str) -> None:
        go.wait()
        results[name] = n.runs[name].cli("swap", str(builds[name]))

    shop_port, blog_port = (n.runs[a].listen_port for a in APPS)
    with Load(shop_port, clients=4) as shop, Load(blog_port, clients=4) as blog:
        wait_until(lambda: shop.slow_ok >= 1 and blog.slow_ok >= 1, 60, "load on both apps")
        threads = [threading.Thread(target=swap, args=(name,)) for name in n.runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wait_until(lambda: shop.versions["v2"] >= 10 and blog.versions["v2"] >= 10, 60, "both apps serving v2")
    for name in n.runs:
        assert results[name].returncode == 0, (name, results[name].stdout, results[name].stderr)
    assert not shop.failures and not blog.failures, (shop.failures, shop.examples, blog.failures, blog.examples)
    for name, run in n.runs.items():
        st = run.status()
        assert st["active"]["build"] == str(builds[name]) and st["active"]["port"] == run.ports[1]
        assert http_get(run.listen_port, "/") == (200, "hello from v2\n")
        # Each daemon's history names only its own app.
        assert run.cli("history", "--json").stdout.count('"reason": "swap"') == 1


def test_two_apps_swapped_at_the_same_moment_behind_one_nginx_lose_nothing(one_nginx: OneNginx) -> None:
    for name in APPS:
        one_nginx.daemon(name, "reload")
        assert http_get(one_nginx.runs[name].listen_port, "/") == (200, "hello from v1\n")
    swap_both_at_once(one_nginx)
    for name, run in one_nginx.runs.items():
        assert one_nginx.file(name).read_text() == render_upstream(name, run.ports[1])


def test_two_apps_on_the_runtime_switch_in_one_nginx_swap_at_once_without_a_reload(one_nginx: OneNginx) -> None:
    handlers = one_nginx.prefix / "conf.d" / "lua-handlers.conf"  # matched by the same conf.d/*.conf glob
    for name in APPS:  # each first start loads its part with one reload; the first also writes the handlers
        one_nginx.daemon(name, "runtime", handlers=handlers)
        assert http_get(one_nginx.runs[name].listen_port, "/") == (200, "hello from v1\n")
        assert one_nginx.runs[name].status()["nginx"]["switch"] == "runtime"
    text = handlers.read_text()
    assert "log_by_lua_block" in text and all("log_by_lua" not in one_nginx.file(a).read_text() for a in APPS)
    workers = one_nginx.workers()

    swap_both_at_once(one_nginx)
    # No reload: the same workers served both swaps, and every app's part is as its daemon wrote it.
    assert one_nginx.workers() == workers
    assert handlers.read_text() == text
    # Each app's routing table is its own: rolling one back leaves the other on v2.
    shop, blog = (one_nginx.runs[a] for a in APPS)
    assert shop.cli("rollback").returncode == 0
    assert http_get(shop.listen_port, "/") == (200, "hello from v1\n")
    assert http_get(blog.listen_port, "/") == (200, "hello from v2\n")
    assert one_nginx.workers() == workers


def test_a_second_runtime_app_without_the_shared_handlers_file_is_refused_with_the_fix(one_nginx: OneNginx) -> None:
    one_nginx.daemon("shop", "runtime")  # one app: the handlers live in its own file
    before = one_nginx.file("blog").read_bytes()
    blog = one_nginx.daemon("blog", "runtime", wait=False)
    assert blog.proc is not None
    code = blog.proc.wait(60)
    out = blog.output()
    assert code != 0, out
    assert "is duplicate" in out and "nginx.lua_handlers_file" in out, out  # nginx's words, then the fix
    # Nothing changed for anyone: blog's file is back byte for byte, shop still answers, and the
    # refused daemon left no app process behind.
    assert one_nginx.file("blog").read_bytes() == before
    assert http_get(one_nginx.runs["shop"].listen_port, "/") == (200, "hello from v1\n")
    assert blog.leftovers() == []


def test_a_shared_handlers_file_nginx_does_not_include_is_found_and_everything_put_back(one_nginx: OneNginx) -> None:
    """Without the handlers no request would ever count out, so every drain would wait its whole
    timeout: the daemon asks nginx whether they run, and refuses with the fix when they do not."""
    elsewhere = one_nginx.root / "not-included"
    elsewhere.mkdir()
    before = one_nginx.file("blog").read_bytes()
    blog = one_nginx.daemon("blog", "runtime", handlers=elsewhere / "lua-handlers.conf", wait=False)
    assert blog.proc is not None
    code = blog.proc.wait(60)
    out = blog.output()
    assert code != 0, out
    assert "[handlers_missing]" in out and "include that file once in nginx's http block" in out, out
    assert "your previous config is back" in out, out
    assert one_nginx.file("blog").read_bytes() == before  # the user's upstream, loaded again
    assert not (elsewhere / "lua-handlers.conf").exists()  # written for this start, taken back
    assert blog.leftovers() == []


@pytest.mark.parametrize("switch", ["reload", "runtime"])
def test_a_config_copied_with_another_apps_upstream_file_is_refused_and_takes_nothing(one_nginx: OneNginx,
                                                                                      switch: str) -> None:
    """A third app's config copied from shop's (its own ports and state_dir, but shop's
    nginx.upstream_file): its daemon refuses to start, naming the daemon that owns the file, and
    never writes it; shop keeps its traffic."""
    shop = one_nginx.daemon("shop", switch)
    before = one_nginx.file("shop").read_bytes()
    d = one_nginx.root / "copycat"
    d.mkdir()
    ports = tuple(free_ports(2))
    cfg = d / "bluegreen.toml"
    cfg.write_text(render_config(d, build=make_build(d / "releases", "v9"), ports=ports, listen=free_ports(1)[0],
                                 nginx="\n".join(one_nginx.user.external(one_nginx.file("shop"), "shop", switch))))
    copycat = DaemonRun(dir=d, config=cfg, listen_port=shop.listen_port, ports=ports)  # type: ignore[arg-type]
    one_nginx.runs["copycat"] = copycat.start(wait=False)
    assert copycat.proc is not None
    code = copycat.proc.wait(60)
    out = copycat.output()
    assert code == 1, out
    assert (f"nginx.upstream_file {one_nginx.file('shop')} is already written by another bluegreen daemon "
            f"(pid {shop.proc.pid}, state_dir {shop.dir / 'run'})") in out, out
    assert "Give this config its own nginx.upstream_file and nginx.upstream_name" in out
    assert one_nginx.file("shop").read_bytes() == before
    assert http_get(shop.listen_port, "/") == (200, "hello from v1\n")
    assert copycat.leftovers() == []
    # shop's daemon killed (its app serves on): the file is still shop's, and shop's next daemon takes it back.
    shop.kill()
    copycat.start(wait=False)
    assert copycat.proc is not None and copycat.proc.wait(60) == 1
    assert (f"belongs to the app of state_dir {shop.dir / 'run'}, whose daemon is not running" in copycat.output()
            and "If that app is gone for good, remove" in copycat.output()), copycat.output()
    assert one_nginx.file("shop").read_bytes() == before and http_get(shop.listen_port, "/") == (200, "hello from v1\n")
    shop.start()
    assert http_get(shop.listen_port, "/") == (200, "hello from v1\n")
