"""nginx's config as bluegreen writes it: the upstream (reload switch), the runtime switch's part
(its shared dicts, its balancer and control server calling lua/bluegreen.lua), the http-level
handlers, and the managed nginx's whole nginx.conf."""

from __future__ import annotations

import math
import os
import re
import textwrap
from pathlib import Path

from ..config.host import LUA_MODULES
from ..config.schema import Config, ReleaseConfig

TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def quote(path: Path | str) -> str:
    """A path as an nginx string: quoted, so spaces and `#`/`;`/`{` in a path stay literal.
    (the config schema refuses state_dir paths with the characters nginx cannot quote: `"`, `\\`, `$`.)"""
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
    switch) or the runtime switch's part (render_runtime, here): then the lua module is
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
