"""nginx: the upstream and managed config it reads, and the reload-based switch (a FrontProxy).

A switch is: stage the previous upstream beside it (so the way back needs no disk space) ->
write the new one atomically -> `nginx -t` with the master's own -p/-c/-e -> reload ->
confirm from the master's workers: new ones titled "nginx: worker process" (forked only once
the master accepted the config). A reload command exiting 0 only means a signal was sent; the
master may still refuse the config (a taken `listen` port) and keep the old workers. Any
failure puts the previous upstream file back, byte for byte. The old generation of workers is
remembered: the routing has let go once every one of them has exited.
Which master is switched is a `Master`: the user's (ExternalMaster, here) or the one the daemon
runs (nginx_process.ManagedNginx). See shared NGINX-NOTES.md for the measurements behind each step.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil

from ..processes import procs
from ..config.schema import Config, ReleaseConfig
from ..config.host import LUA_MODULES
from ..errors import NginxError
from ..fsutil import UndoableFile, atomic_write
from .front import RoutingLock, routing

PLAIN_WORKER = "nginx: worker process"
POLL = 0.005
STEADY = 0.1  # seconds a new generation's worker count must hold when it is short of the expected one
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
LOG_TAIL = 65536


def quote(path: Path | str) -> str:
    """A path as an nginx string: quoted, so spaces and `#`/`;`/`{` in a path stay literal.
    (config.py refuses state_dir paths with the characters nginx cannot quote: `"`, `\\`, `$`.)"""
    return '"' + str(path) + '"'


def route_variable(name: str) -> str:
    """The variable naming the upstream each request goes to (the preview's, or the main one):
    `proxy_pass http://$<name>_route;` (the managed nginx uses it; with your own nginx, the preview
    needs it too)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + "_route"


def preview_vars(release: ReleaseConfig) -> tuple[str, str]:
    """The nginx variables of the preview header and cookie (`X-Bluegreen-Preview` -> http_x_bluegreen_preview)."""
    return "http_" + release.preview_header.lower().replace("-", "_"), "cookie_" + release.preview_cookie


def render_upstream(name: str, port: int, preview: int | None = None, release: ReleaseConfig = ReleaseConfig(),
                    token: str = "") -> str:
    # Exactly one server: with a single server nginx never marks it failed (no
    # "no live upstreams" 502s), unlike a `down`/`backup` sibling would. The preview is its own
    # upstream, chosen per request by the maps below (header first, then cookie).
    header, cookie = preview_vars(release)
    var = route_variable(name)
    to_preview = f"{name}__preview" if preview is not None else name
    text = (
        "# Written by bluegreen at every swap; do not edit.\n"
        f"upstream {name} {{\n"
        f"    server 127.0.0.1:{port};\n"
        "}\n"
    )
    if preview is not None:
        text += f"upstream {name}__preview {{\n    server 127.0.0.1:{preview};\n}}\n"
    # A map's plain strings match whatever their case: a token is matched by a case-sensitive
    # regex (its characters, letters, digits, _ and -, mean nothing in a regex).
    key = f"~^{token}$" if token else "1"
    return text + (
        f"map ${cookie} ${var}__by_cookie {{\n    default {name};\n    \"{key}\" {to_preview};\n}}\n"
        f"map ${header} ${var} {{\n    default ${var}__by_cookie;\n    \"{key}\" {to_preview};\n}}\n"
    )


def parse_upstream_port(text: str) -> int | None:
    """The inverse of render_upstream: the port of its single `server` line."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "server":
            port = parts[1].rstrip(";").rsplit(":", 1)[-1]
            return int(port) if port.isdigit() else None
    return None


ROLLOUT_COOKIE = "bluegreen_id"  # who a user is during a split (set by nginx when missing)
CONTROL = "/.bluegreen/"  # the runtime switch's control locations: on the control socket only


def shared_dicts(upstream_name: str) -> tuple[str, str]:
    """The runtime switch's two lua shared dicts (the table, the counters), one pair per app, so
    several apps' parts can live in one nginx."""
    return f"bluegreen.{upstream_name}", f"bluegreen.{upstream_name}.stats"


LUA_DIR = Path(__file__).resolve().parent / "lua"  # package data: bluegreen.lua, the program nginx runs
LUA_CONTROLS = ("route", "preview", "split", "stats", "inflight", "handlers", "state")  # as in bluegreen.lua


def lua_digest() -> str:
    """Names the lua program's version in the rendered parts: an upgraded bluegreen's first start
    finds the part stale and reloads nginx, which loads the new program."""
    import hashlib

    return hashlib.sha256((LUA_DIR / "bluegreen.lua").read_bytes()).hexdigest()[:16]


def lua_app(upstream_name: str, route: Path, release: ReleaseConfig = ReleaseConfig(),
            rollout_cookie: str = ROLLOUT_COOKIE, unjudged: tuple[str, ...] = ()) -> str:
    """One app's settings, as the lua table every call into bluegreen.lua takes."""
    header, cookie = preview_vars(release)
    table, stats = shared_dicts(upstream_name)
    fields = {"name": upstream_name, "table": table, "stats": stats, "route": str(route), "preview_header": header,
              "preview_cookie": cookie, "rollout_cookie": rollout_cookie}
    return ("{" + ", ".join(f"{k} = {_lua_string(v)}" for k, v in fields.items())
            + ", unjudged = {" + ", ".join(_lua_string(p) for p in unjudged) + "}}")


def render_runtime(upstream_name: str, route: Path, control: Path, release: ReleaseConfig = ReleaseConfig(),
                   rollout_cookie: str = ROLLOUT_COOKIE, handlers: bool = True,
                   unjudged: tuple[str, ...] = (), preload: bool = True) -> str:
    """The runtime switch's part of nginx's http block (the tested pattern in NGINX-NOTES.md):
    this app's shared dicts, its upstream whose balancer is bluegreen.lua's, and its control
    socket. What the lua does is said in supervisor/lua/bluegreen.lua.

    The table is seeded from the route file, which the daemon writes before every change, when
    it has no port yet (a fresh nginx). Requests to `unjudged` paths (a path, or a prefix ending
    in `/`) are counted in flight but never judged by a watch. Control: Unix socket only.

    Everything here is per app (named after the upstream) except the http-level request
    handlers (render_lua_handlers), which nginx allows once per http block: with `handlers`
    False they are left out, for a file that several apps share (nginx.lua_handlers_file).
    """
    table, stats = shared_dicts(upstream_name)
    app = lua_app(upstream_name, route, release, rollout_cookie, unjudged)
    control_locations = "".join(
        f"    location = {CONTROL}{name} {{\n"
        f"        content_by_lua_block {{ return require(\"bluegreen\").control({app}, \"{name}\") }}\n    }}\n"
        for name in LUA_CONTROLS)
    return f"""# Written by bluegreen (nginx.switch = "runtime"; bluegreen.lua {lua_digest()}); do not edit.
# Include it once, in http {{}}.
lua_shared_dict {table} 1m;
lua_shared_dict {stats} 4m;
{render_lua_handlers(preload) if handlers else ""}upstream {upstream_name} {{
    server 127.0.0.1:1;  # a placeholder: the balancer picks the port
    balancer_by_lua_block {{ return require("bluegreen").balancer({app}) }}
}}
server {{
    listen "unix:{control}";
    client_max_body_size 64;
    access_log off;
    # Makes $bluegreen_request (the handlers' map) indexed, so that lua can write it.
    set $bluegreen_request_seen $bluegreen_request;
{control_locations}}}
"""


def runtime_part(config: Config, route: Path, control: Path, handlers: bool = True, preload: bool = True) -> str:
    """render_runtime for this app's config: what the managed nginx and the user's nginx include.
    The path of app.ready.url is never judged, besides rollout.ignore_paths."""
    from urllib.parse import urlsplit

    ready = config.app.ready.url
    unjudged = config.rollout.ignore_paths + ((urlsplit(ready).path or "/",) if ready else ())
    return render_runtime(config.nginx.upstream_name, route, control, config.release, config.rollout.cookie,
                          handlers=handlers, unjudged=tuple(dict.fromkeys(unjudged)), preload=preload)


def render_lua_handlers(preload: bool = True) -> str:
    """The runtime switch's http-level part, once per http block, the same for every app: where
    nginx finds bluegreen.lua, and the request handlers that count a request out and set the
    rollout cookie for whichever app's balancer picked it (its name rides in $bluegreen_request).
    With `preload` the master loads the lua (workers running as www-data may not read the
    package's folder); the managed nginx loads it in its own init block instead."""
    init = 'init_by_lua_block { require("bluegreen") }\n' if preload else ""
    return f"""# bluegreen.lua {lua_digest()}, loaded from:
lua_package_path "{LUA_DIR}/?.lua;;";
{init}# What the balancer counted a request in as: empty until it does (a map, so that reading
# it before is no "uninitialized variable" warning); it survives internal redirects.
map "" $bluegreen_request {{
    default "";
}}
log_by_lua_block {{ require("bluegreen").log() }}
header_filter_by_lua_block {{ require("bluegreen").header_filter() }}
"""


def render_seed(upstream_name: str, route: Path) -> str:
    """An init_by_lua block that loads bluegreen.lua and seeds the table from the route file as
    nginx (re)loads its config: in the master, before the workers drop their privileges (a
    managed nginx whose workers run as nginx.user may not reach a private state_dir)."""
    table, _ = shared_dicts(upstream_name)
    return f'init_by_lua_block {{ require("bluegreen").seed({_lua_string(table)}, {_lua_string(str(route))}) }}\n'


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def render_managed_conf(config: Config, prefix: Path, upstream: Path, runtime: bool = False) -> str:
    """The managed nginx.conf. The upstream file it includes holds the upstream block (reload
    switch) or the runtime switch's part (runtime_switch.render_runtime): then the lua module is
    loaded here, and the public listener refuses the control path."""
    n = config.nginx
    user = ""
    if os.geteuid() == 0:
        # Root master: workers default to `nobody`, which may not reach a private state_dir.
        user = f"user {n.user or 'root'};\n"
    temp = "\n".join(f"    {kind}_temp_path {quote(prefix / 'temp' / kind)};" for kind in TEMP_KINDS)
    # One second past the drain timeout: the daemon's own deadline acts first and counts what it
    # cuts; nginx's is the backstop (e.g. when the daemon itself is gone).
    drain = math.ceil(config.drain.timeout) + 1
    modules = "".join(f"load_module {m};\n" for m in LUA_MODULES) if runtime else ""
    seed = textwrap.indent(render_seed(n.upstream_name, prefix / "route"), "    ") if runtime else ""
    private = f"        location ^~ {CONTROL} {{ return 404; }}\n" if runtime else ""
    # The runtime balancer picks the preview itself; with reloads, the upstream file's maps do.
    target = n.upstream_name if runtime else "$" + route_variable(n.upstream_name)
    return f"""# Generated by bluegreen from {config.path} at every daemon start; edit that file instead.
{modules}{user}worker_processes {n.worker_processes};
pid {quote(prefix / 'nginx.pid')};
error_log {quote(prefix / 'error.log')} notice;
# Old workers may serve in-flight requests for at most the drain timeout (+1 s backstop).
worker_shutdown_timeout {drain}s;

events {{
    worker_connections 1024;
}}

http {{
    log_format bluegreen '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                         'upstream=$upstream_addr rt=$request_time';
    access_log {quote(prefix / 'access.log')} bluegreen;
{temp}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    include {quote(upstream)};
{seed}
    server {{
        listen {n.listen};
{private}        location / {{
            proxy_pass http://{target};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def workers(master: int) -> dict[int, str]:
    """The master's worker processes, pid -> title (cache manager/loader ignored)."""
    return {pid: name for pid in procs.children(master) if (name := worker_title(pid))}


def worker_title(pid: int) -> str | None:
    """The title of nginx worker `pid`, serving or shutting down after a reload (it still serves
    its requests then); None if `pid` is gone or no worker (a cache manager, a loader)."""
    name = procs.title(pid)
    return name if name is not None and name.startswith(PLAIN_WORKER) else None


def _error_lines(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    important = [ln for ln in lines if any(f"[{lvl}]" in ln for lvl in ("emerg", "alert", "crit"))]
    return important or [ln for ln in lines if "test is successful" not in ln and "syntax is ok" not in ln]


def _write_failed(path: Path, e: OSError) -> NginxError:
    return NginxError(f"cannot write {path}: {e.strerror}; the previous file is unchanged "
                      "(check free disk space and permissions)", code="upstream_write_failed")




def write_upstream(path: Path, data: bytes | None) -> None:
    """Replace (or, for None, remove) the upstream file atomically; NginxError on failure."""
    try:
        if data is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, data)
    except OSError as e:
        raise _write_failed(path, e) from e


COMMAND_TIMEOUT = 30.0  # seconds `nginx -t` or a reload command may take (a hung sudo, a stuck NFS include)


async def run_command(argv: list[str], what: str, code: str, timeout: float = COMMAND_TIMEOUT) -> None:
    """Run an nginx command in its own process group; one that does not finish in `timeout` is
    killed with its children and reported, so that no swap waits on it for ever."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
    except OSError as e:
        raise NginxError(f"{what}: cannot run {argv[0]!r}: {e.strerror}", code=code) from e
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        procs.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise NginxError(f"{what} did not finish within {timeout:g}s ({' '.join(argv)}): killed; nothing was "
                         "reloaded by it. Check that the command runs by hand without waiting for input",
                         code=code, command=argv) from None
    if proc.returncode != 0:
        lines = _error_lines(out.decode("utf-8", "replace"))
        raise NginxError(
            f"{what} failed (exit {proc.returncode}): " + " | ".join(lines or ["(no output)"]),
            code=code,
            nginx=lines,
            command=argv,
        )



class ErrorLog:
    """nginx's error log, read from an offset (what a reload just said) or from its tail."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size if self.path else 0
        except OSError:
            return 0

    def since(self, offset: int) -> list[str]:
        """The emerg/alert/crit lines written since `offset` (at most 64 KiB of them)."""
        if not self.path:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)  # 0: rotated meanwhile
                text = f.read(LOG_TAIL).decode("utf-8", "replace")
        except OSError:
            return []
        return [ln for ln in _error_lines(text) if any(f"[{lvl}]" in ln for lvl in ("emerg", "alert", "crit"))]

    def tail(self, lines: int = 3) -> list[str]:
        """The latest such lines (from the last 64 KiB: older lines are stale)."""
        return self.since(max(0, self.offset() - LOG_TAIL))[-lines:]


class Master(Protocol):
    """The nginx master a switch reloads: how to test its config, find it, and signal it."""

    upstream_path: Path
    log: ErrorLog

    def test_argv(self) -> list[str]: ...
    def master_pid(self) -> int: ...
    async def send_reload(self, master: int) -> None: ...


class ReloadSwitch:
    """The FrontProxy that switches by rewriting the upstream file and reloading nginx."""

    mode = "reload"

    def traffic_split(self) -> None:
        """Reloads route all traffic, or a preview; they split no share of users and count nothing."""
        return None

    def __init__(self, config: Config, master: Master, render: Callable[[int], str] | None = None) -> None:
        self.config = config
        self.n = config.nginx
        self.master = master
        # What the upstream file holds for a port: the upstream block, or the runtime switch's part.
        self.render = render or (lambda port: render_upstream(self.n.upstream_name, port, self.preview_port,
                                                              config.release, self.preview_token))
        self.preview_port: int | None = None  # where preview requests go (a paused swap's standby)
        self.preview_token = ""  # what their header or cookie must say ("": 1)
        self.upstream = UndoableFile(master.upstream_path)
        self.log = master.log
        self.old_generation: set[int] = set()
        self.undo_port: int | None = None  # where the staged previous upstream sends traffic
        self.signalled = False
        self.port: int | None = None  # where the last confirmed route sends traffic
        self.lock = RoutingLock()

    async def routed_port(self) -> int | None:
        """The port the upstream file on disk sends traffic to (None if absent or not ours)."""
        return parse_upstream_port((self.upstream.read() or b"").decode(errors="replace"))

    def forget_undo(self) -> None:
        """The last switch will not be undone: drop its staged copy."""
        self.upstream.forget()
        self.undo_port = None

    def clean_stale_temp(self) -> None:
        self.upstream.clean_stale()

    async def apply_config(self, port: int) -> dict[str, Any]:
        """nginx's own config changed: load it (a reload), sending traffic to `port`."""
        return await self.route(port)

    @routing
    async def reconcile(self) -> str | None:
        """The upstream file on disk is what nginx loads at any (re)start, so it only needs
        rewriting when someone else wrote it: a managed nginx started afresh gets no preview."""
        if self.port is None or self.upstream.read() == self.render(self.port).encode():
            return None
        await self._route(self.port)
        self.forget_undo()
        return f"port {self.port}" + (f", preview to {self.preview_port}" if self.preview_port else "")

    def config_stale(self) -> bool:
        return False  # the upstream file is rewritten at every switch

    @routing
    async def preview(self, port: int | None, token: str = "") -> dict[str, Any]:
        """Send preview requests to `port` (None: nobody), by rewriting the upstream file with its
        maps and reloading: one reload to turn the preview on, one to turn it off."""
        if (port, token) == (self.preview_port, self.preview_token if port else ""):
            return {"preview": port, "mode": self.mode}
        current = await self.routed_port()
        if current is None:
            raise NginxError(f"{self.upstream.path} names no port; cannot set the preview", code="nginx_reload_failed")
        before = self.preview_port, self.preview_token
        self.preview_port, self.preview_token = port, token if port else ""
        try:
            result = await self._route(current)
        except BaseException:
            self.preview_port, self.preview_token = before
            raise
        finally:
            self.forget_undo()  # the preview is no switch: nothing to undo
        # Old workers keep accepting for nginx's 100 ms, with the old maps: the preview is on for
        # every new connection once they stop (titled "shutting down", or gone).
        deadline = time.monotonic() + self.n.reload_timeout
        while any(procs.title(p) == PLAIN_WORKER for p in self.old_generation) and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        return {**result, "preview": port}

    @routing
    async def route(self, port: int) -> dict[str, Any]:
        """All traffic to `port`, and no preview (its port may be about to stop)."""
        before, self.preview_port = self.preview_port, None
        try:
            return await self._route(port)
        except BaseException:
            self.preview_port = before
            raise

    async def _route(self, port: int) -> dict[str, Any]:
        """Point the upstream at `port`; on any failure restore the previous file and raise.

        The previous file is staged beside the new one first, so `route_back` can put it back
        with a rename even when the disk has filled up since.
        """
        try:
            previous = self.upstream.replace(self.render(port).encode())
        except OSError as e:
            raise _write_failed(self.upstream.path, e) from e
        try:
            result = await self._apply(port)
        except BaseException:
            self._restore()
            await self._resync()
            raise
        self.undo_port = parse_upstream_port((previous or b"").decode(errors="replace"))
        self.port = port
        return result

    def _restore(self) -> None:
        try:
            self.upstream.restore()
        except OSError as e:
            raise _write_failed(self.upstream.path, e) from e

    @routing
    async def undo(self) -> None:
        """Put the file from before the last route back and load it (test, reload, confirm):
        for when something found after a confirmed reload says the new file must not stay."""
        self._restore()
        self.undo_port = None
        await self._apply(0)

    @routing
    async def route_back(self, port: int) -> dict[str, Any]:
        """Undo the last switch, back to `port`, without needing any disk space (the staged copy
        is renamed into place). Raises if nginx cannot be switched back; then nginx still sends
        traffic where the last switch pointed it."""
        if self.undo_port != port or not self.upstream.undoable:
            self.forget_undo()
            return await self.route(port)
        current = self.upstream.read()
        self._restore()
        self.undo_port = None
        try:
            result = await self._apply(port)
            self.port = port
            return result
        except BaseException:
            try:  # keep the file telling what nginx runs (needs space: best effort)
                write_upstream(self.upstream.path, current)
            except NginxError:
                pass
            await self._resync()
            raise

    async def _apply(self, port: int) -> dict[str, Any]:
        """Test the file on disk, reload, confirm; remember the old worker generation for the drain."""
        self.signalled = False  # whether nginx may have loaded the file: only then does _resync reload
        t0 = time.monotonic()
        await run_command(self.master.test_argv(), "nginx -t", "nginx_test_failed")
        t1 = time.monotonic()
        master = self.master.master_pid()
        before = workers(master)
        offset = self.log.offset()
        await self.master.send_reload(master)
        self.signalled = True
        t2 = time.monotonic()
        await self.confirm(master, before, offset)
        t3 = time.monotonic()
        self.old_generation = set(before)
        return {
            "port": port,
            "test": round(t1 - t0, 4),
            "reload": round(t2 - t1, 4),
            "confirm": round(t3 - t2, 4),
            "old_workers": len(before),
        }

    async def _resync(self) -> None:
        """After a failed confirmation: best effort to make the running nginx match the restored file."""
        if not self.signalled:
            return
        try:
            master = self.master.master_pid()
            await self.master.send_reload(master)
        except (NginxError, OSError):
            pass

    async def confirm(self, master: int, before: dict[int, str], log_offset: int) -> None:
        # The current generation only: right after a reload the previous one may still be titled
        # "worker process" for nginx's 100 ms, and it is never replaced again.
        expected = max(1, sum(1 for p, t in before.items() if t == PLAIN_WORKER and p not in self.old_generation))
        deadline = time.monotonic() + self.n.reload_timeout
        seen, steady_since = 0, time.monotonic()
        while True:
            if not procs.alive(master):
                raise NginxError(
                    f"the nginx master (pid {master}) exited during the reload: "
                    + " | ".join(self.log.since(log_offset) or ["no error logged"]),
                    code="nginx_down",
                )
            now = workers(master)
            new = [p for p, t in now.items() if p not in before and t == PLAIN_WORKER]
            # New workers exist only once the master accepted the new config: that is the switch.
            # nginx tells the old workers to quit 100 ms later (hard-coded); the drain phase then
            # waits until every one of them has exited, which is stronger than "shutting down".
            if len(new) >= expected:
                return
            # Fewer than expected: `before` may have held two generations (another reload of this
            # nginx, e.g. a second app's daemon, ran just before ours). nginx forks a generation's
            # workers at once: a count that stays the same for STEADY is all of it.
            if len(new) != seen:
                seen, steady_since = len(new), time.monotonic()
            elif seen and time.monotonic() - steady_since >= STEADY:
                return
            # Only [emerg] means the master refused the config; [alert]/[crit] lines also come from
            # running workers (e.g. "write() to access.log was incomplete" on a full disk).
            errors = [ln for ln in self.log.since(log_offset) if "[emerg]" in ln]
            if errors and not new:
                raise NginxError(
                    "nginx refused the new config and kept the old one: " + " | ".join(errors),
                    code="nginx_reload_failed",
                    nginx=errors,
                )
            if time.monotonic() > deadline:
                raise NginxError(
                    f"the reload was not confirmed within {self.n.reload_timeout:g}s "
                    f"({len(new)} new worker(s) of {expected})"
                    + (": " + " | ".join(errors) if errors else "; see nginx's error log"),
                    code="nginx_reload_failed",
                    nginx=errors,
                )
            await asyncio.sleep(POLL)

    async def wait_released(self, port: int, deadline: float) -> int:
        """Wait until every worker that predates the last reload has exited (only those can still
        send a request to a port no longer in the upstream); return how many have not."""
        left = [p for p in self.old_generation if procs.alive(p)]
        while left and time.monotonic() < deadline:
            await asyncio.sleep(POLL * 2)
            left = [p for p in left if procs.alive(p)]
        return len(left)



class ExternalMaster:
    """A system nginx the user runs; its main config includes our upstream file."""

    def __init__(self, config: Config) -> None:
        assert config.nginx.upstream_file and config.nginx.pid_file
        self.n = config.nginx
        self.upstream_path = config.nginx.upstream_file
        self.pid_file = config.nginx.pid_file
        self.log = ErrorLog(config.nginx.error_log)

    def test_argv(self) -> list[str]:
        return list(self.n.test_command)

    def master_pid(self) -> int:
        try:
            text = self.pid_file.read_text().strip()
        except OSError as e:
            raise NginxError(
                f"cannot read nginx's pid file {self.pid_file}: {e.strerror}; is nginx running? "
                "(check nginx.pid_file matches the `pid` directive)",
                code="nginx_down",
            ) from e
        if not text.isdigit():
            raise NginxError(
                f"nginx's pid file {self.pid_file} is empty or invalid ({text[:20]!r}); is nginx running? "
                "(`nginx -t` leaves an empty pid file when no master runs)",
                code="nginx_down",
            )
        pid = int(text)
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:
            name = ""
        if "nginx" not in name or not procs.alive(pid):
            raise NginxError(
                f"nginx's pid file {self.pid_file} names pid {pid}, which is not a running nginx (stale pid file); "
                "start nginx, or fix nginx.pid_file",
                code="nginx_down",
            )
        return pid

    async def send_reload(self, master: int) -> None:
        await run_command(list(self.n.reload_command), "nginx reload", "nginx_reload_failed",
                          timeout=self.n.reload_timeout)
