"""The two nginx shapes every end-to-end promise is checked on:

- managed: the daemon's own nginx, its workers unprivileged (`nginx.user = "www-data"`);
- debian: the user's nginx as Debian ships it: master root, `user www-data;`, the lua module
  loaded as modules-enabled/ does, `error_page` lines and several locations (one for WebSockets,
  with `proxy_bind $myapp_bind;` as docs/nginx.md says for long-lived requests); bluegreen in
  external mode with the runtime switch.

And an app that answers what these tests need: `/` (its version), `/health`, `/missing` (404),
`/boom` (500), `/slow?ms=N`, `/events` (a numbered event stream), `/ws` (numbered WebSocket
messages, with the live example's `ws` package).
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from helpers import (LUA_MODULES, ROOT, USER_NGINX_CONF, DaemonRun, free_ports, kill_tree, make_build, managed_nginx, stop_all,
                     wait_until)
from supervisor.config.host import resolve_binary

SHAPES = ("managed", "debian")
WS_MODULE = ROOT / "examples" / "live-app" / "node_modules" / "ws"

APP = """
const fs = require('fs');
const http = require('http');
const version = 'VERSION';
const gate = 'GATE';  // a file: /gate answers once it exists (and a gated stop waits for it too)
const opened = (then) => { const t = setInterval(() => { if (!gate || fs.existsSync(gate)) { clearInterval(t); then(); } }, 50); };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const answer = (status, text) => { res.writeHead(status, {'content-type': 'text/plain'}); res.end(text); };
  if (url.pathname === '/health') return answer(200, 'ok\\n');
  if (url.pathname === '/missing') return answer(404, 'no such page\\n');
  if (url.pathname === '/boom') return answer(500, 'boom\\n');
  if (url.pathname === '/echo') {  // the request's method and body, as the app read them
    let body = '';
    req.on('data', (c) => { body += c; });
    return req.on('end', () => answer(200, `${version} ${req.method} ${body}\\n`));
  }
  if (url.pathname === '/gate') {  // says it has the request (GATE.VERSION), answers once the gate opens
    fs.writeFileSync(`${gate}.${version}`, '');
    return opened(() => answer(200, `${version} gate\\n`));
  }
  if (url.pathname === '/slow') return setTimeout(() => answer(200, `${version} slow\\n`), Number(url.searchParams.get('ms') || 1000));
  if (url.pathname === '/events') {  // numbered events, every 100 ms, going on from Last-Event-ID
    let e = Number(req.headers['last-event-id'] || 0);
    res.writeHead(200, {'content-type': 'text/event-stream'});
    const t = setInterval(() => res.write(`id: ${++e}\\ndata: ${version} ${e}\\n\\n`), 100);
    return req.on('close', () => clearInterval(t));
  }
  answer(FAIL && (n++ * 37) % 100 < FAIL ? 500 : 200, `hello from ${version}\\n`);
});
let n = 0;
// /ws: a numbered message every 100 ms (the live example's ws package, which bootstrap installs)
const { WebSocketServer } = require('WS_MODULE');
new WebSocketServer({ server, path: '/ws' }).on('connection', (ws) => {
  let m = 0;
  const t = setInterval(() => ws.send(`${version} ${++m}`), 100);
  ws.on('close', () => clearInterval(t));
  ws.on('error', () => clearInterval(t));
});
setTimeout(() => server.listen(Number(process.env.PORT), '127.0.0.1'), BOOT_MS);
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', () => STOP_GATE ? opened(stop) : stop());
"""


def app_build(parent: Path, name: str, fail: int = 0, boot_ms: int = 0, gate: Path | None = None,
              stop_gate: bool = False) -> Path:
    """A build of APP: `fail` % of its answers on `/` are 500s (spread evenly); it listens only
    `boot_ms` after it started (a slow boot holds a swap in its ready phase); `/gate` answers
    once the file `gate` exists (and creates `gate`.NAME when it gets the request), and with
    `stop_gate` so does its SIGTERM (a slow stop, held)."""
    return make_build(parent, name, server_js=app_source(name, fail, boot_ms, gate, stop_gate))


def app_source(name: str, fail: int = 0, boot_ms: int = 0, gate: Path | None = None, stop_gate: bool = False) -> str:
    """APP's text for a build called `name` (see app_build)."""
    return (APP.replace("VERSION", name).replace("FAIL", str(fail)).replace("BOOT_MS", str(boot_ms))
            .replace("STOP_GATE", "true" if stop_gate else "false").replace("WS_MODULE", str(WS_MODULE))
            .replace("GATE", str(gate or "")))


# The user's server as Debian's default site grows into a real one: error pages nginx answers
# itself (proxy_intercept_errors), static files, several locations proxying to the app.
DEBIAN_SERVER = """    server {{
        listen 127.0.0.1:{listen};
        error_page 404 /404.html;
        error_page 500 502 503 504 /50x.html;
        location = /404.html {{ root {prefix}/html; internal; }}
        location = /50x.html {{ root {prefix}/html; internal; }}
        location /static/ {{ alias {prefix}/html/; }}
        location /api/ {{
            proxy_pass http://myapp;
            proxy_set_header Host $host;
        }}
        location / {{
            proxy_pass http://myapp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_intercept_errors on;
            proxy_bind $myapp_bind;
        }}
        location /ws {{
            proxy_pass http://myapp;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_bind $myapp_bind;
        }}
    }}
"""


@dataclass
class UserNginx:
    """The user's nginx (its own prefix, nginx.conf there): started, stopped and restarted by the
    test, never by bluegreen."""

    prefix: Path
    listen: int = 0
    master: subprocess.Popen[bytes] | None = None
    masters: list[int] = field(default_factory=list)

    @property
    def base(self) -> list[str]:
        nginx = resolve_binary("nginx")
        assert nginx, "nginx is not installed: run scripts/test"
        return [nginx, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-e", str(self.prefix / "error.log")]

    def start(self) -> None:
        pid_file = self.prefix / "nginx.pid"
        pid_file.unlink(missing_ok=True)
        self.master = subprocess.Popen(self.base + ["-g", "daemon off;"], start_new_session=True)
        self.masters.append(self.master.pid)
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the user's nginx to start")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """`nginx -s stop` (SIGTERM) or `-s quit` (SIGQUIT): what systemctl restart or an upgrade does."""
        assert self.master is not None
        self.master.send_signal(sig)
        self.master.wait(30)

    def close(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.stop(signal.SIGQUIT)
        kill_tree(self.masters)

    def external(self, upstream_file: Path, name: str, switch: str | None = None,
                 reload: list[str] | None = None) -> list[str]:
        """The [nginx] keys of a daemon in external mode on this nginx (one per line)."""
        keys = ['mode = "external"'] + ([f'switch = "{switch}"'] if switch else []) + [
            f'upstream_name = "{name}"', f'upstream_file = "{upstream_file}"', f'pid_file = "{self.prefix}/nginx.pid"',
            f'error_log = "{self.prefix}/error.log"']
        return keys + ["test_command = [" + ", ".join(f'"{a}"' for a in self.base + ["-t"]) + "]",
                       "reload_command = [" + ", ".join(f'"{a}"' for a in reload or self.base + ["-s", "reload"]) + "]"]


def debian_nginx(d: Path, listen: int, upstream_port: int) -> UserNginx:
    prefix = d / "nginx"
    (prefix / "conf.d").mkdir(parents=True)
    (prefix / "html").mkdir()
    (prefix / "html" / "404.html").write_text("not found (nginx's page)\n")
    (prefix / "html" / "50x.html").write_text("sorry (nginx's page)\n")
    # Like /etc/nginx: anyone may enter it (the workers are www-data).
    for p in (d, prefix, prefix / "conf.d", prefix / "html"):
        p.chmod(0o755)
    from supervisor.proxy.render import render_upstream

    (prefix / "conf.d" / "myapp.conf").write_text(render_upstream("myapp", upstream_port))
    (prefix / "nginx.conf").write_text(USER_NGINX_CONF.format(  # master root, workers www-data, as Debian ships it
        modules=LUA_MODULES, prefix=prefix, user="user www-data;",
        servers=DEBIAN_SERVER.format(prefix=prefix, listen=listen)))
    n = UserNginx(prefix, listen)
    n.start()
    return n


def start_on(shape: str, make_daemon: Callable[..., DaemonRun], d: Path, build: Path, extra: str = "",
             start: bool = True, env: dict[str, str] | None = None, **kw: Any) -> tuple[DaemonRun, UserNginx | None]:
    """A daemon with the runtime switch on `shape` (its environment plus `env`); for debian also the
    user's nginx (closed by the caller)."""
    listen, blue, green = free_ports(3)
    if shape == "managed":
        nginx = managed_nginx(listen, "runtime") + '\nuser = "www-data"'
        run = make_daemon(start=False, ports=(blue, green), listen=listen, build=build, nginx=nginx, extra=extra, **kw)
        return (run.start(env=env) if start else run), None
    user = debian_nginx(d, listen, blue)
    nginx = "\n".join(user.external(user.prefix / "conf.d" / "myapp.conf", "myapp", "runtime"))
    run = make_daemon(start=False, ports=(blue, green), listen=listen, build=build, nginx=nginx, extra=extra, **kw)
    try:
        if not start:
            return run, user
        run.start(env=env)
        # The daemon's first start loaded its part with a reload: for nginx's 100 ms the previous
        # workers (your config before it) still take connections; a test's clients start after.
        from helpers import settled_workers

        settled_workers(user.master.pid)
        return run, user
    except BaseException:
        user.close()
        raise


def worker_users(master: int) -> set[str]:
    import psutil

    return {c.username() for c in psutil.Process(master).children()}


def os_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def stream_nginx(d: Path, listen: int, upstream_port: int, user: str = "www-data") -> UserNginx:
    """The user's nginx for a TCP service: its stream {} block includes the upstream file and
    connects from the TCP kind's address, as docs/nginx.md shows."""
    from supervisor.config.host import STREAM_MODULE
    from supervisor.proxy.render import render_stream_upstream

    prefix = d / "nginx"
    (prefix / "conf.d").mkdir(parents=True)
    for p in (d, prefix, prefix / "conf.d"):
        p.chmod(0o755)
    (prefix / "conf.d" / "myapp.conf").write_text(render_stream_upstream("myapp", upstream_port))
    (prefix / "nginx.conf").write_text(f"""load_module {STREAM_MODULE};
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
{f'user {user};' if os.geteuid() == 0 else ''}
events {{ worker_connections 256; }}
stream {{
    include {prefix}/conf.d/*.conf;
    server {{ listen 127.0.0.1:{listen}; proxy_pass myapp; proxy_bind 127.0.0.5; proxy_half_close on; }}
}}
""")
    nginx = UserNginx(prefix, listen)
    nginx.start()
    return nginx


def stop_with_nginx(started: "list[tuple[DaemonRun, UserNginx | None]]") -> None:
    """Stop every daemon started on a shape, then the user's nginx each ran behind (if any)."""
    try:
        stop_all([run for run, _ in started])
    finally:
        for _, user in started:
            if user is not None:
                user.close()
