"""nginx's config as bluegreen writes it: the upstream (reload switch), the runtime switch's part
(its shared dicts, its balancer and control server calling lua/bluegreen.lua), the http-level
handlers, and the managed nginx's whole nginx.conf."""

from __future__ import annotations

import functools
import math
import os
import re
import socket
import textwrap
from pathlib import Path

from ..config.host import LUA_MODULES, STREAM_MODULE
from ..config.schema import Config, HoldConfig, ReleaseConfig
from ..processes.sockets import LONG_LIVED

TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data: nginx's config, with {{ fields }}
FIELD = re.compile(r"\{\{ *([a-z_]+) *\}\}")


@functools.cache
def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def fill(template_name: str, /, **values: object) -> str:
    """A template of templates/ with its {{ fields }} filled. Every field must be given and every
    value used (a renamed field fails here, not in nginx); a value is inserted as it is, never
    read for fields itself."""
    text = template(template_name)
    fields = set(FIELD.findall(text))
    if fields != set(values):
        raise ValueError(f"template {template_name}: fields {sorted(fields)}, given {sorted(values)}")
    return FIELD.sub(lambda m: str(values[m.group(1)]), text)


def quote(path: Path | str) -> str:
    """A path as an nginx string: quoted, so spaces and `#`/`;`/`{` in a path stay literal.
    (the config schema refuses state_dir paths with the characters nginx cannot quote: `"`, `\\`, `$`.)"""
    return '"' + str(path) + '"'


def _variable(name: str, suffix: str) -> str:
    """An nginx variable named after the upstream (`my-app` -> `my_app_route`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + suffix


def route_variable(name: str) -> str:
    """The variable naming the upstream each request goes to (the preview's, or the main one):
    `proxy_pass http://$<name>_route;` (the managed nginx uses it; with your own nginx, the preview
    needs it too)."""
    return _variable(name, "_route")


def bind_variable(name: str) -> str:
    """The variable naming the address nginx connects a request to the app from: 127.0.0.1, or a
    long-lived kind's own (sockets.LONG_LIVED). `proxy_bind $<name>_bind;` in the location."""
    return _variable(name, "_bind")


def long_lived_maps(name: str, paths: tuple[str, ...] = ()) -> str:
    """The maps that set bind_variable(name): a WebSocket upgrade (a candidate: the drain proves
    it from nginx's side), then drain.long_lived_paths (a path and what is under it, or a prefix
    ending in `/`; case-sensitive regexes)."""
    def pattern(path: str) -> str:
        literal = re.sub(r"([.^$*+?()\[\]{}|])", r"\\\1", path)
        return f"~^{literal}" if path.endswith("/") else f"~^{literal}(/|$)"

    entries = "".join(f'    "{pattern(p)}" {LONG_LIVED["path"]};\n' for p in paths)
    return fill("long-lived.conf", var=bind_variable(name), paths=entries, websocket=LONG_LIVED["websocket"])


def preview_vars(release: ReleaseConfig) -> tuple[str, str]:
    """The nginx variables of the preview header and cookie (`X-Bluegreen-Preview` -> http_x_bluegreen_preview)."""
    return "http_" + release.preview_header.lower().replace("-", "_"), "cookie_" + release.preview_cookie


def render_upstream(name: str, port: int, preview: int | None = None, release: ReleaseConfig = ReleaseConfig(),
                    token: str = "", long_paths: tuple[str, ...] = ()) -> str:
    # Exactly one server: with a single server nginx never marks it failed (no
    # "no live upstreams" 502s), unlike a `down`/`backup` sibling would. The preview is its own
    # upstream, chosen per request by the maps below (header first, then cookie).
    header, cookie = preview_vars(release)
    # A map's plain strings match whatever their case: a token is matched by a case-sensitive
    # regex (its characters, letters, digits, _ and -, mean nothing in a regex).
    return fill("upstream.conf", name=name, port=port, cookie=cookie, header=header, var=route_variable(name),
                key=f"~^{token}$" if token else "1", to_preview=f"{name}__preview" if preview is not None else name,
                preview_upstream="" if preview is None else fill("preview-upstream.conf", name=name, port=preview),
                long_lived=long_lived_maps(name, long_paths))


def render_stream_upstream(name: str, port: int) -> str:
    """The upstream a TCP service's stream {} block proxies to (no preview, no maps: the stream
    module sees no header)."""
    return fill("stream-upstream.conf", name=name, port=port)


def upstream_text(config: Config, port: int, preview: int | None = None, token: str = "") -> str:
    """What the reload switch's upstream file holds for this app: a stream upstream (a TCP
    service), or the http upstream with its preview and long-lived maps."""
    name = config.nginx.upstream_name
    if config.app.protocol == "tcp":
        return render_stream_upstream(name, port)
    return render_upstream(name, port, preview, config.release, token, config.drain.long_lived_paths)


def shutdown_timeout(config: Config) -> int:
    """worker_shutdown_timeout: one second past the longer of the drain timeout and the long-lived
    grace. The daemon's own deadlines act first and count what they close; nginx's is the
    backstop (e.g. when the daemon itself is gone)."""
    return math.ceil(max(config.drain.timeout, config.drain.grace)) + 1


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
LUA_CONTROLS = ("route", "preview", "split", "stats", "inflight", "handlers", "state", "hold")  # as in bluegreen.lua


def lua_digest() -> str:
    """Names the lua program's version in the rendered parts: an upgraded bluegreen's first start
    finds the part stale and reloads nginx, which loads the new program."""
    import hashlib

    return hashlib.sha256((LUA_DIR / "bluegreen.lua").read_bytes()).hexdigest()[:16]


# The hold server's addresses, on one loopback port of its own (hold_port_in): a held request goes
# to HOLD; a request not retried to FAILED or TIMED_OUT, which answer 502 and 504 as nginx would
# have. TCP, not a Unix socket: nginx binds its side of every connection to the app
# (proxy_bind, the long-lived kinds) before the balancer picks where it goes.
HOLD, FAILED, TIMED_OUT = "127.0.0.1", "127.0.0.3", "127.0.0.6"
HOLD_LISTEN = re.compile(r"^\s*listen " + re.escape(HOLD) + r":(\d+);", re.MULTILINE)


def hold_port_in(part: Path) -> int:
    """The hold server's port: the one the part nginx already has (no reload for a new one), else
    a free one."""
    try:
        found = HOLD_LISTEN.search(part.read_text())
    except (OSError, UnicodeDecodeError):
        found = None
    return int(found.group(1)) if found else free_loopback_port()


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((HOLD, 0))
        return int(s.getsockname()[1])


RETRY_AFTER = 5  # seconds a client held past hold.timeout is told to wait (Retry-After)


def lua_app(upstream_name: str, route: Path, release: ReleaseConfig = ReleaseConfig(),
            rollout_cookie: str = ROLLOUT_COOKIE, unjudged: tuple[str, ...] = (),
            hold: HoldConfig | None = None, hold_port: int = 0) -> str:
    """One app's settings, as the lua table every call into bluegreen.lua takes (`hold` None: no
    hold server, as for gRPC)."""
    header, cookie = preview_vars(release)
    table, stats = shared_dicts(upstream_name)
    addresses = (HOLD, FAILED, TIMED_OUT) if hold else ("", "", "")
    fields = {"name": upstream_name, "table": table, "stats": stats, "route": str(route), "preview_header": header,
              "preview_cookie": cookie, "rollout_cookie": rollout_cookie, "bind": bind_variable(upstream_name),
              "hold": addresses[0], "fail502": addresses[1], "fail504": addresses[2], "retry_after": str(RETRY_AFTER)}
    h = hold or HoldConfig()
    return ("{" + ", ".join(f"{k} = {_lua_string(v)}" for k, v in fields.items())
            + f", hold_port = {hold_port if hold else 0}, hold_timeout = {h.timeout!r}, hold_max = {h.max_requests}"
            + f", retry_idempotent = {'true' if h.retry_idempotent else 'false'}"
            + ", unjudged = {" + ", ".join(_lua_string(p) for p in unjudged) + "}}")


def render_runtime(upstream_name: str, route: Path, control: Path, release: ReleaseConfig = ReleaseConfig(),
                   rollout_cookie: str = ROLLOUT_COOKIE, handlers: bool = True,
                   unjudged: tuple[str, ...] = (), preload: bool = True, long_paths: tuple[str, ...] = (),
                   hold: HoldConfig | None = None, hold_port: int = 0) -> str:
    """The runtime switch's part of nginx's http block (the tested pattern in NGINX-NOTES.md):
    this app's shared dicts, its upstream whose balancer is bluegreen.lua's, and its control
    socket. What the lua does is said in supervisor/lua/bluegreen.lua.

    The table is seeded from the route file, which the daemon writes before every change, when
    it has no port yet (a fresh nginx). Requests to `unjudged` paths (a path, or a prefix ending
    in `/`) are counted in flight but never judged by a watch. Control: Unix socket only.

    Everything here is per app (named after the upstream) except the http-level request
    handlers (render_lua_handlers), which nginx allows once per http block: with `handlers`
    False they are left out, for a file that several apps share (nginx.lua_handlers_file).

    With `hold` (an HTTP app), requests nothing can answer wait in the hold server (on
    `hold_port`) up to hold.timeout: see bluegreen.lua.
    """
    table, stats = shared_dicts(upstream_name)
    app = lua_app(upstream_name, route, release, rollout_cookie, unjudged, hold, hold_port)
    control_locations = "".join(fill("control-location.conf", path=CONTROL + name, app=app, name=name)
                                for name in LUA_CONTROLS)
    hold_server = ""
    if hold is not None:
        hold_server = fill("hold-server.conf", hold=f"{HOLD}:{hold_port}", failed=f"{FAILED}:{hold_port}",
                           timed_out=f"{TIMED_OUT}:{hold_port}", app=app, name=upstream_name,
                           bind_var=bind_variable(upstream_name))
    return fill("runtime.conf", digest=lua_digest(), table=table, stats=stats, name=upstream_name, app=app,
                handlers=render_lua_handlers(preload) if handlers else "", control=control,
                control_locations=control_locations, long_lived=long_lived_maps(upstream_name, long_paths),
                hold_server=hold_server, route_var=route_variable(upstream_name))


def runtime_part(config: Config, route: Path, control: Path, handlers: bool = True, preload: bool = True,
                 hold_port: int = 0) -> str:
    """render_runtime for this app's config: what the managed nginx and the user's nginx include.
    The path of app.ready.url is never judged, besides rollout.ignore_paths."""
    from urllib.parse import urlsplit

    ready = config.app.ready.url
    unjudged = config.rollout.ignore_paths + ((urlsplit(ready).path or "/",) if ready else ())
    return render_runtime(config.nginx.upstream_name, route, control, config.release, config.rollout.cookie,
                          handlers=handlers, unjudged=tuple(dict.fromkeys(unjudged)), preload=preload,
                          long_paths=config.drain.long_lived_paths,
                          hold=config.hold if config.app.protocol == "http" and hold_port and config.hold.timeout
                          else None,
                          hold_port=hold_port)


def render_lua_handlers(preload: bool = True) -> str:
    """The runtime switch's http-level part, once per http block, the same for every app: where
    nginx finds bluegreen.lua, and the request handlers that count a request out and set the
    rollout cookie for whichever app's balancer picked it (its name rides in $bluegreen_request).
    With `preload` the master loads the lua (workers running as www-data may not read the
    package's folder); the managed nginx loads it in its own init block instead."""
    return fill("handlers.conf", digest=lua_digest(), lua_dir=LUA_DIR,
                preload='init_by_lua_block { require("bluegreen") }\n' if preload else "")


def render_seed(upstream_name: str, route: Path) -> str:
    """An init_by_lua block that loads bluegreen.lua and seeds the table from the route file as
    nginx (re)loads its config: in the master, before the workers drop their privileges (a
    managed nginx whose workers run as nginx.user may not reach a private state_dir)."""
    table, _ = shared_dicts(upstream_name)
    return fill("seed.conf", table=_lua_string(table), route=_lua_string(str(route)))


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def render_managed_conf(config: Config, prefix: Path, upstream: Path, runtime: bool = False) -> str:
    """The managed nginx.conf. The upstream file it includes holds the upstream block (reload
    switch) or the runtime switch's part (render_runtime, here): then the lua module is
    loaded here, and the public listener refuses the control path."""
    n = config.nginx
    if config.app.protocol == "tcp":
        return render_tcp_conf(config, prefix, upstream)
    user = _user(config)
    temp = "\n".join(f"    {kind}_temp_path {quote(prefix / 'temp' / kind)};" for kind in TEMP_KINDS)
    modules = "".join(f"load_module {m};\n" for m in LUA_MODULES) if runtime else ""
    seed = textwrap.indent(render_seed(n.upstream_name, prefix / "route"), "    ") if runtime else ""
    private = f"        location ^~ {CONTROL} {{ return 404; }}\n" if runtime else ""
    # The runtime balancer picks the preview itself; with reloads, the upstream file's maps do.
    target = n.upstream_name if runtime else "$" + route_variable(n.upstream_name)
    grpc = config.app.protocol == "grpc"
    return fill("nginx.conf", config_path=config.path, load_modules=modules, user=user,
                worker_processes=n.worker_processes, pid_file=quote(prefix / "nginx.pid"),
                error_log=quote(prefix / "error.log"), shutdown_timeout=shutdown_timeout(config),
                access_log=quote(prefix / "access.log"),
                temp_paths=temp, upstream_file=quote(upstream), seed=seed, private_control=private,
                listen=n.listen + (" http2" if grpc else ""), worker_connections=n.worker_connections,
                location=fill("location-grpc.conf" if grpc else "location-http.conf", target=target,
                              bind_var=bind_variable(n.upstream_name)))


def _user(config: Config) -> str:
    # Root master: workers default to `nobody`, which may not reach a private state_dir.
    return f"user {config.nginx.user or 'root'};\n" if os.geteuid() == 0 else ""


def render_tcp_conf(config: Config, prefix: Path, upstream: Path) -> str:
    """The managed nginx.conf of a TCP service: a stream {} block, no http."""
    n = config.nginx
    return fill("nginx-tcp.conf", config_path=config.path, stream_module=STREAM_MODULE, user=_user(config),
                worker_processes=n.worker_processes, pid_file=quote(prefix / "nginx.pid"),
                error_log=quote(prefix / "error.log"), shutdown_timeout=shutdown_timeout(config),
                worker_connections=n.worker_connections, access_log=quote(prefix / "access.log"),
                upstream_file=quote(upstream), listen=n.listen, name=n.upstream_name, bind=LONG_LIVED["tcp"])
