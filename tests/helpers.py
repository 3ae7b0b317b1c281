"""Test helpers: wait on conditions (never bare sleeps), pick ports at run time, run a real
daemon and kill every process it started, build app releases, and drive HTTP load."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Self

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def as_in_a_terminal() -> None:
    """For a child the test sends Ctrl-C: SIGINT and SIGQUIT at their defaults, as in an operator's
    terminal, even when the suite itself runs with them ignored (a script's background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def manual() -> str:
    """The whole manual: README.md and every page of docs/ (what a user reads)."""
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
NODE_APP = ROOT / "examples" / "node-app" / "v1" / "server.js"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, describe: str = "condition",
               on_timeout: Callable[[], str] | None = None, interval: float = 0.02) -> Any:
    """Poll `predicate` on a monotonic clock until it returns truthy; fail with context on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {describe}\n{extra}")
        time.sleep(interval)


# Ports for servers the tests start come from below the kernel's ephemeral range (32768+), so no
# outgoing connection on the host can take one between picking it and binding it. Overlapping
# tests (and test runs) coordinate through one lock file per port, held until the test ends.
PORT_RANGE = range(20000, 32000)
PORT_LOCKS = Path("/tmp/bluegreen-test-ports")
_held: list[int] = []


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on and that no other test process holds."""
    import fcntl
    import random

    PORT_LOCKS.mkdir(mode=0o1777, exist_ok=True)
    picked: list[int] = []
    for port in random.sample(PORT_RANGE, len(PORT_RANGE)):
        if len(picked) == n:
            break
        fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                os.close(fd)
                continue
        _held.append(fd)  # held until the test ends (release_ports)
        picked.append(port)
    return picked


def release_ports() -> None:
    """The test is over and every server it started is gone: its ports are free for others."""
    while _held:
        os.close(_held.pop())


def settled_workers(master: int, count: int = 2) -> set[int]:
    """The master's current generation of `count` workers, once the previous one (of the last
    reload) is gone: for nginx's 100 ms after a reload both are titled alike, and the old one
    then closes its idle keep-alive connections."""
    from supervisor.processes.procs import title

    def current() -> set[int] | None:
        kids = {c.pid: title(c.pid) or "" for c in psutil.Process(master).children()}
        return None if len(kids) != count or any("shutting down" in t for t in kids.values()) else set(kids)

    return wait_until(current, 30, "the previous generation of nginx workers to exit")


def managed_nginx(listen: int, switch: str | None = "reload", binary: str | None = None) -> str:
    """The [nginx] table of a managed nginx on `listen`, with the given switch (None: the
    default, auto) and binary."""
    text = f'mode = "managed"\nlisten = "127.0.0.1:{listen}"\nworker_processes = 2'
    text += f'\nswitch = "{switch}"' if switch else ""
    return text + (f'\nbinary = "{binary}"' if binary else "")


# What Debian's /etc/nginx/modules-enabled/50-mod-http-lua.conf (and its ndk sibling) load once
# libnginx-mod-http-lua is installed: the README's snippets for the runtime switch rely on it.
LUA_MODULES = """
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;"""


# The user's own nginx.conf, as the external-mode tests run it: its own prefix, the upstream files
# bluegreen writes included from conf.d/, and one server per app proxying to its upstream.
USER_NGINX_CONF = """{modules}
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
{user}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/conf.d/*.conf;
{servers}}}
"""


def user_nginx_conf(prefix: Path, servers: dict[int, str], modules: str = "") -> str:
    """USER_NGINX_CONF with a server on 127.0.0.1:`listen` proxying to upstream `name`, for each."""
    blocks = "".join(f"    server {{\n        listen 127.0.0.1:{listen};\n        location / {{ proxy_pass http://{name}; }}\n"
                     "    }\n" for listen, name in servers.items())
    return USER_NGINX_CONF.format(prefix=prefix, modules=modules, servers=blocks,
                                  user="user root;" if os.geteuid() == 0 else "")


def make_build(parent: Path, name: str, *, version: str | None = None, boot_delay_ms: int = 0,
               healthy: bool = True, server_js: str | None = None, start_sh: str = "exec node server.js\n") -> Path:
    """A release directory of the example Node app (or of `server_js`), like a CI artefact.
    `start.sh` is for configs whose command is a start script (`sh start.sh`)."""
    build = parent / name
    build.mkdir(parents=True)
    (build / "start.sh").write_text(start_sh)
    if server_js is None:
        shutil.copy(NODE_APP, build / "server.js")
    else:
        (build / "server.js").write_text(server_js)
    pkg = {"name": "app", "version": version or name, "bootDelayMs": boot_delay_ms, "healthy": healthy}
    (build / "package.json").write_text(json.dumps(pkg))
    return build


def serves(run: "DaemonRun", version: str) -> bool:
    """nginx answers `/` from `version` (False while it refuses: a restarting master)."""
    try:
        return http_get(run.listen_port, "/") == (200, f"hello from {version}\n")
    except OSError:
        return False


def raw(run: "DaemonRun", data: bytes, read: bool = True) -> list[dict[str, Any]]:
    """`data` as is on the control socket; every reply line (none if `read` is False: a client that
    sends and leaves). The write side is closed after sending, as socat does."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(run.socket))
        s.sendall(data)
        if not read:
            return []
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return [json.loads(x) for x in out.splitlines()]


# Example-app variants the fault tests use: it crashes once ready; it ignores SIGTERM (so its
# stop waits app.stop.timeout, then SIGKILL), alone or with a child that outlives it.
def crashes_after_ready(ms: int) -> str:
    return NODE_APP.read_text() + f"\nsetTimeout(() => {{ console.error('fatal: out of cheese'); process.exit(1); }}, {ms});\n"


SLOW_TO_STOP = NODE_APP.read_text().replace("process.on('SIGTERM', () => shutdown('SIGTERM'));",
                                            "process.on('SIGTERM', () => log('SIGTERM ignored'));")
IGNORES_SIGTERM = SLOW_TO_STOP.replace("process.on('SIGTERM', () => log('SIGTERM ignored'));",
                                       "process.on('SIGTERM', () => log('SIGTERM ignored'));\n"
                                       "require('child_process').spawn('sleep', ['600'], { stdio: 'ignore' });")


def http_get(port: int, path: str = "/", timeout: float = 10.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One GET on a fresh connection; returns (status, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    if b"transfer-encoding: chunked" in head.lower():
        body = unchunk(body)
    return status, body.decode("utf-8", "replace")


def answering(port: int, want: dict[str, int], **headers: str) -> bool:
    """For wait_until: the answers are `want` (a restarting nginx may refuse connections meanwhile)."""
    try:
        return answers(port, sum(want.values()), **headers) == want
    except OSError:
        return False


def answers(port: int, n: int = 10, **headers: str) -> Counter[str]:
    got: "Counter[str]" = Counter()
    for _ in range(n):
        status, body = http_get(port, "/", headers=headers or None)
        got[body.split()[-1] if status == 200 else f"http_{status}"] += 1
    return got


def unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def bluegreen(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)


def kill_tree(pids: list[int]) -> None:
    """SIGKILL each pid's process group and tree (teardown of whatever a test started)."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
    for p in procs:
        try:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@dataclass
class DaemonRun:
    """A real `bluegreen daemon` in its own session, with a config written for this test."""

    dir: Path
    config: Path
    listen_port: int
    ports: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = None
    seen: set[int] = field(default_factory=set)
    not_ours: set[int] = field(default_factory=set)

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "bluegreen.sock"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.out"

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> "DaemonRun":
        out = open(self.log, "ab")
        # The venv's bin/ on PATH, as for a user who installed bluegreen and gunicorn in one venv.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "daemon", "-c", str(self.config)],
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        out.close()
        if wait:
            wait_until(self.serving, 60, "the daemon to serve", self.output)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def status(self) -> dict[str, Any] | None:
        """What `bluegreen status --json` prints, asked on the socket directly (no CLI start per poll);
        None while the daemon does not answer."""
        from supervisor import client
        from supervisor.errors import Unreachable

        try:
            reply = client.final(self.socket, {"cmd": "status"}, first=30)
        except Unreachable:
            return None
        if not reply.get("ok"):
            return None
        st: dict[str, Any] = reply["result"]
        self.remember(st)
        return st

    def remember(self, st: dict[str, Any]) -> None:
        """Keep every pid the daemon ever reported, so teardown can kill leftovers by pid."""
        for key in ("active", "standby", "warm", "retiring"):
            if st.get(key):
                self.seen.add(st[key]["pid"])
        if st["nginx"].get("master_pid"):
            if st["nginx"].get("mode") == "managed":
                self.seen.add(st["nginx"]["master_pid"])
            else:  # the user's nginx: its test stops it, never the daemon
                self.not_ours.add(st["nginx"]["master_pid"])

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
        if not self.socket.exists():
            return False
        st = self.status()
        return bool(st and st["daemon"]["status"] == "serving")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return bluegreen(*args, "-c", str(self.config), timeout=timeout)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """The CLI left running (a swap the test acts on meanwhile); `.communicate()` ends it."""
        return subprocess.Popen([sys.executable, "-m", "supervisor", *args, "-c", str(self.config)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)

    def phase(self) -> str | None:
        """The running swap's phase (None: no swap runs)."""
        st = self.status()
        return st["swap"]["phase"] if st and st.get("swap") else None

    def kill(self) -> None:
        """SIGKILL the daemon (no cleanup of any kind), remembering what it ran for teardown."""
        assert self.proc is not None
        self.seen |= {c.pid for c in self.children()}
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True) if self.proc else []
        except psutil.Error:
            return []

    def stop(self) -> int | None:
        """SIGTERM and wait; then kill anything it left behind, and fail if a daemon that stopped
        cleanly (and was not told to keep serving) left a process running. Returns the exit code."""
        if self.proc is None:
            return None
        for c in self.children():
            self.seen.add(c.pid)
        self.seen -= self.not_ours
        code = None
        stopped_now = self.proc.poll() is None
        if stopped_now:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        else:
            code = self.proc.returncode
        # (a log pump exits once it has read the app's last output, just after the daemon)
        deadline = time.monotonic() + 5
        while (left := [p for p in {*self.seen, *self.leftovers()} - self.not_ours if running(p)]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        details = "; ".join(f"{p} {describe(p)}" for p in left)
        kill_tree([self.proc.pid, *self.seen, *self.leftovers()])
        keeps = 'on_stop = "keep"' in self.config.read_text()
        if stopped_now and code == 0 and not keeps and left:
            raise AssertionError(f"the daemon stopped cleanly but left running: {details}")
        return code

    def leftovers(self) -> list[int]:
        """Processes of this run that no status ever showed (e.g. after a test failed with the daemon
        gone): every app process carries the state dir's marker; the managed master has a pid file."""
        from supervisor.processes.slots import marked

        pids = [p.pid for p in marked(self.dir / "run")]
        try:
            master = psutil.Process(int((self.dir / "run" / "nginx" / "nginx.pid").read_text()))
            if str(self.dir / "run" / "nginx") in " ".join(master.cmdline()):  # not a reused pid
                pids.append(master.pid)
        except (OSError, ValueError, psutil.Error):
            pass
        return pids


def stop_all(runs: "list[DaemonRun]") -> None:
    """Stop every daemon, even when one of them fails its leftover check; then say so."""
    errors = []
    for run in runs:
        try:
            run.stop()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "; ".join(errors)


def running(pid: int) -> bool:
    """A live process (a zombie is dead: only its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "(gone)"


class ClientThreads:
    """`clients` threads running `self._client(index)`, started when the block is entered and
    told to stop (then joined) when it is left."""

    def __init__(self, clients: int) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class Load(ClientThreads):
    """Concurrent clients hitting nginx, each request on a fresh connection; counts every failure.

    A share of requests is slow (served in `slow_ms`), so some are always in flight at a switch.
    """

    def __init__(self, port: int, clients: int = 6, slow_every: int = 10, slow_ms: int = 1000,
                 slow_path: str = "/slow?ms={ms}") -> None:
        super().__init__(clients)
        self.port = port
        self.slow_path = slow_path
        self.clients = clients
        self.slow_every = slow_every
        self.slow_ms = slow_ms
        self.ok = 0
        self.slow_ok = 0
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []
        self.versions: Counter[str] = Counter()
        self.last_failure_at = 0.0  # time.time() when the last failed request was sent

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())

    def _client(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            slow = (n + index) % self.slow_every == 0
            path = self.slow_path.format(ms=self.slow_ms) if slow else "/"
            sent = time.time()
            try:
                status, body = http_get(self.port, path, timeout=30)
                kind = None if status == 200 else f"http_{status}"
            except ConnectionRefusedError:
                kind = "refused"
            except ConnectionResetError:
                kind = "reset"
            except socket.timeout:
                kind = "timeout"
            except OSError as e:
                kind = f"oserror_{e.errno}"
            except (ValueError, IndexError):
                kind = "garbled"
            with self.lock:
                if kind is None:
                    self.ok += 1
                    self.slow_ok += slow
                    self.versions[body.split()[-1] if not slow else body.split()[0]] += 1
                else:
                    self.failures[kind] += 1
                    self.last_failure_at = max(self.last_failure_at, sent)
                    if len(self.examples) < 5:
                        self.examples.append(f"{path}: {kind}")


def dump_toml(data: dict[str, Any]) -> str:
    """Write the TOML subset our configs use (tables, strings, numbers, booleans, lists, inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines: list[str] = []

    def table(name: str, t: dict[str, Any]) -> None:
        scalars = {k: v for k, v in t.items() if not (isinstance(v, dict) and f"{name}.{k}" in TABLES)}
        # (top-level names are checked as ".daemon", nested ones as ".app.ready")
        if name:
            lines.append(f"[{name.lstrip('.')}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in t.items():
            if k not in scalars:
                table(f"{name}.{k}", v)

    table("", data)
    return "\n".join(lines) + "\n"


# The names that are TOML tables (not inline tables) in our configs.
TABLES = {".daemon", ".app", ".app.ready", ".app.health", ".app.restart", ".app.stop", ".app.files", ".drain", ".nginx"}


def example_config(example: Path, dest: Path, listen: int, ports: tuple[int, int]) -> Path:
    """Copy a shipped example config to `dest`, changing only ports and making paths absolute."""
    import tomllib

    data = tomllib.loads(example.read_text())
    base = example.parent
    data["daemon"]["state_dir"] = str(dest.parent / "run")
    data["app"]["ports"] = list(ports)
    data["app"]["build"] = str((base / data["app"]["build"]).resolve())
    data["app"]["files"] = {k: str((base / v).resolve()) for k, v in data["app"].get("files", {}).items()}
    data["nginx"]["listen"] = f"127.0.0.1:{listen}"
    dest.write_text(dump_toml(data))
    return dest


class HttpxClients(ClientThreads):
    """What users run: httpx clients, each with its own pool of kept-alive connections, one
    request in `slow_every` slow; every failure counted (a status other than 200, or an error),
    and when the last one was sent."""

    def __init__(self, port: int, clients: int = 2, slow_every: int = 5, slow_ms: int = 300) -> None:
        super().__init__(clients)
        self.url, self.slow_every, self.slow_ms = f"http://127.0.0.1:{port}", slow_every, slow_ms
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.last_failure_at = 0.0

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                path = f"/slow?ms={self.slow_ms}" if n % self.slow_every == 0 else "/"
                sent = time.time()
                try:
                    kind = None if client.get(path).status_code == 200 else "http_error"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                with self.lock:
                    if kind is None:
                        self.ok += 1
                    else:
                        self.failures[kind] += 1
                        self.last_failure_at = max(self.last_failure_at, sent)


class KeepAlive(ClientThreads):
    """Clients that each keep one connection open and send a request every few milliseconds;
    every answer is recorded with the times it was asked for and arrived, every failure counted."""

    def __init__(self, port: int, clients: int = 3) -> None:
        super().__init__(clients)
        self.port = port
        self.answers: list[tuple[float, float, str]] = []  # (sent, arrived, version)
        self.failures: list[str] = []

    def _client(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.wait(0.003):
            try:
                sent = time.monotonic()
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode()
                with self.lock:
                    if r.status == 200:
                        self.answers.append((sent, time.monotonic(), body.split()[-1]))
                    else:
                        self.failures.append(f"http_{r.status}")
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def torn(self, old: str, new: str) -> int:
        """Answers from `old` to requests sent after the first answer from `new` arrived, on any
        client. (A request already on its way to the old build may still answer after that: it
        was routed before the switch, and the page that sent it saw only the old build.)"""
        with self.lock:
            answers = list(self.answers)
        first_new = min((arrived for _, arrived, v in answers if v == new), default=None)
        assert first_new is not None, f"no answer from {new} reached these clients: nothing to judge"
        return sum(1 for sent, _, v in answers if v == old and sent > first_new)


MISBEHAVING = """
const http = require('http');
let n = 0;
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/health')) { res.writeHead(200, {'content-type': 'text/plain'}); res.end('ok\\n'); return; }
  n += 1;
  const fail = (n * 37) % 100 < FAIL;  // FAIL % of the answers, spread evenly
  setTimeout(() => {
    res.writeHead(fail ? 500 : 200, {'content-type': 'text/plain'});
    res.end(fail ? 'boom\\n' : 'hello from VERSION\\n');
  }, DELAY);
});
server.listen(Number(process.env.PORT), '127.0.0.1');
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"""


def misbehaving_build(parent: Path, name: str, fail: int = 0, delay_ms: int = 0) -> Path:
    """A build whose main path answers 500 to `fail` % of requests (spread evenly) and/or takes
    `delay_ms`; /health stays fine, so it passes readiness and looks healthy to a plain check."""
    return make_build(parent, name, server_js=MISBEHAVING.replace("FAIL", str(fail)).replace("DELAY", str(delay_ms))
                      .replace("VERSION", name))


class WebSocketClient(threading.Thread):
    """A WebSocket client that reconnects whenever its connection closes."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.messages: list[tuple[int, str, int]] = []  # (connection, version, n)
        self.connections = 0
        self.closes: list[str] = []

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed, WebSocketException
        from websockets.sync.client import connect

        while not self.stopped.is_set():
            try:
                with connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=10) as ws:
                    self.connections += 1
                    while not self.stopped.is_set():
                        try:
                            version, n = str(ws.recv(timeout=1)).split()
                        except TimeoutError:
                            continue
                        self.messages.append((self.connections, version, int(n)))
            except ConnectionClosed as e:
                self.closes.append(f"closed {e.rcvd.code if e.rcvd else 'without a close frame'}")
            except (OSError, WebSocketException) as e:
                self.closes.append(type(e).__name__)
            self.stopped.wait(0.1)

    def lost(self) -> list[tuple[int, int]]:
        """(connection, n) of the messages missing within each connection (each starts at 1)."""
        missing = []
        for c in {c for c, _, _ in self.messages}:
            seen = sorted(n for cc, _, n in self.messages if cc == c)
            missing += [(c, n) for n in range(1, seen[-1] + 1) if n not in set(seen)]
        return missing

    def close(self) -> None:
        self.stopped.set()
        self.join(30)


class EventStream(threading.Thread):
    """An EventSource as a browser runs it: `Accept: text/event-stream`, and on any close a new
    connection that sends the last id it saw (the app goes on from there)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.events: list[tuple[str, int]] = []  # (version, n) in the order they came
        self.connections = 0
        self.ends: list[str] = []  # how each connection ended

    def run(self) -> None:
        while not self.stopped.is_set():
            last = self.events[-1][1] if self.events else None
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(last)} if last else {})}
            try:
                with httpx.stream("GET", f"http://127.0.0.1:{self.port}/events", headers=headers, timeout=30) as r:
                    self.connections += 1
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            version, n = line[6:].split()
                            self.events.append((version, int(n)))
                        if self.stopped.is_set():
                            return
                self.ends.append("ended")
            except httpx.HTTPError as e:
                self.ends.append(type(e).__name__)
            self.stopped.wait(0.1)  # the stream's `retry: 100`

    def lost(self) -> list[int]:
        """Event numbers never received (the numbering goes on across reconnections)."""
        seen = [n for _, n in self.events]
        return sorted(set(range(seen[0], seen[-1] + 1)) - set(seen)) if seen else []

    def close(self) -> None:
        self.stopped.set()
        self.join(30)


def nginx_rewriting(where: Path, sed: str) -> Path:
    """The real nginx behind a wrapper that hands it a copy of its config edited by the sed
    expression `sed`: nginx's own words about a config it cannot run (a module that does not
    load, a listen parameter it does not know), without another nginx build."""
    from supervisor.config.host import resolve_binary

    wrapper = where / "nginx-rewriting"
    wrapper.write_text(f"""#!/bin/sh
conf=; prev=
for a; do [ "$prev" = -c ] && conf=$a; prev=$a; done
if [ -n "$conf" ]; then
    sed '{sed}' "$conf" > "$conf.old"
    for a; do shift; [ "$a" = "$conf" ] && a=$conf.old; set -- "$@" "$a"; done
fi
exec {resolve_binary("nginx")} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def refused_before_start(cfg: Path) -> list[str]:
    """check-config's and the daemon's stderr on `cfg`: both must exit 2 (a config this machine
    cannot run), the daemon before it starts anything."""
    out = []
    for argv in (["check-config"], ["daemon"]):
        r = subprocess.run([sys.executable, "-m", "supervisor", *argv, "-c", str(cfg)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        out.append(r.stderr)
    assert not list((cfg.parent / "run").glob("slots/*")), "something started"
    return out
