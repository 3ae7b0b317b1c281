"""The configuration schema: TOML in, frozen dataclasses out, every problem named by its key.

Each key is declared once in `SCHEMA` (type, default, help); loading checks types,
rejects unknown keys, then checks the rules that span keys. All problems are
collected so `bluegreen check-config` can report them at once.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import builds
from ..errors import ConfigError
from ..paths import rel as _rel, socket_path as _socket_path, toml
from ..protocol import shares
from .host import ephemeral_ports, hook_problems, lua_missing, protocol_missing, resolve_binary

SLOTS = ("blue", "green")


def other_slot(slot: str) -> str:
    return SLOTS[1 - SLOTS.index(slot)]

PLACEHOLDERS = ("port", "slot", "build", "build_name", "slot_dir")
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Characters an nginx string cannot carry even quoted (`$` starts a variable in access_log).
NGINX_UNSAFE = set('"\\$') | {chr(c) for c in range(32)}
MIN_LOG_BYTES = 4096  # below that, a log would rotate on nearly every line
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# --- value parsers: each returns the parsed value or raises ValueError(what was expected)


def _nonempty_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("expected a non-empty string")
    return v


def _optional_str(v: Any) -> str | None:
    return None if v is None else _nonempty_str(v)


def _str_or_none_any(v: Any) -> str | None:
    """A string, empty allowed (a gRPC service name: "" means the whole server)."""
    if v is not None and not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _number(v: Any) -> bool:
    """A real, finite number: TOML's nan and inf parse as floats, but no timeout or ratio means them."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


MAX_SECONDS = 365 * 86400  # no wait means more than a year; nginx refuses far larger times


def _positive(v: Any) -> float:
    if not _number(v) or v <= 0:
        raise ValueError("expected a number of seconds greater than 0" + _NOT_FINITE * _nonfinite(v))
    return _at_most_a_year(v)


MAX_HOLD = 55.0  # seconds: nginx's default proxy_read_timeout (60 s) ends a longer hold at the first hop


def _hold_seconds(v: Any) -> float:
    if not _number(v) or not 0 <= v <= MAX_HOLD:
        raise ValueError(f"expected a number of seconds from 0 to {MAX_HOLD:g} (nginx's proxy_read_timeout, 60 s by "
                         "default, ends a longer hold with 504)" + _NOT_FINITE * _nonfinite(v))
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _optional_seconds_or_zero(v: Any) -> float | None:
    return None if v is None else _seconds_or_zero(v)


def _seconds_or_zero(v: Any) -> float:
    if not _number(v) or v < 0:
        raise ValueError("expected a number of seconds, 0 or more" + _NOT_FINITE * _nonfinite(v))
    return _at_most_a_year(v)


def _at_most_a_year(v: float) -> float:
    if v > MAX_SECONDS:
        raise ValueError(f"expected at most {MAX_SECONDS} seconds (a year), got {v:g}")
    return float(v)


def _factor(v: Any) -> float:
    if not _number(v) or v <= 0 or v > 1e6:
        raise ValueError("expected a factor greater than 0, like 2" + _NOT_FINITE * _nonfinite(v))
    return float(v)


def _optional_factor(v: Any) -> float | None:
    return None if v is None else _factor(v)


_NOT_FINITE = " (a finite one: nan and inf mean nothing here)"


def _nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _pattern(regex: str, example: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(regex, v):
            raise ValueError(f"expected a name like {example!r} (letters, digits{', -' if '-' in regex else ', _'})")
        return v

    return parse


def _ratio(v: Any) -> float:
    if not _number(v) or not 0 <= v <= 1:  # (nan fails the range too)
        raise ValueError("expected a fraction between 0 and 1, like 0.01 for 1 %")
    return float(v)


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("expected a whole number greater than 0")
    return v


def _connections(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 64 <= v <= 1_000_000:
        raise ValueError("expected a whole number from 64 to 1000000")
    return v


def _log_bytes(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < MIN_LOG_BYTES:
        raise ValueError(f"expected a size in bytes, at least {MIN_LOG_BYTES}, like 10485760 for 10 MiB")
    return v


MAX_PATH = 1024  # characters in one listed path (each becomes one nginx parameter or lua string)


def _url_paths(v: Any) -> tuple[str, ...]:
    """URL paths: each starts with `/`, with no space, quote, backslash or `]`."""
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise ValueError('expected a list of paths, like ["/health", "/metrics"]')
    bad = [p for p in v if not re.fullmatch(r"/[^\s\"'\\\]]*", p)]
    if bad:
        raise ValueError(f"a path starts with / and has no space, quote, backslash or ]: {bad[0][:80]!r}")
    long = [p for p in v if len(p) > MAX_PATH]
    if long:
        raise ValueError(f"a path has at most {MAX_PATH} characters (nginx's limit for one parameter is near): "
                         f"{long[0][:40]!r}... has {len(long[0])}")
    return tuple(v)


def _argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        raise ValueError('expected a non-empty list of strings, like ["node", "server.js"] (never a shell string)')
    if not v[0].strip():
        raise ValueError("the program (first element) is empty")
    return tuple(v)


def _optional_argv(v: Any) -> tuple[str, ...] | None:
    return None if v is None else _argv(v)


def _env(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError('expected a table of strings, like { PORT = "{port}" }')
    return dict(v)


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(a, str) and a for a in v):
        raise ValueError('expected a list of non-empty strings, like ["logs", "temp"]')
    return tuple(v)


def _regex(v: Any) -> re.Pattern[str] | None:
    if v is None:
        return None
    try:
        return re.compile(_nonempty_str(v))
    except re.error as e:
        raise ValueError(f"not a valid regular expression ({e})") from None


def _ports(v: Any) -> tuple[int, int]:
    if (
        not isinstance(v, list)
        or len(v) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in v)
    ):
        raise ValueError("expected two TCP ports (1-65535), blue then green, like [8001, 8002]")
    if v[0] == v[1]:
        raise ValueError("two different ports are needed")
    return (v[0], v[1])


def _signal(v: Any) -> signal.Signals:
    if not isinstance(v, str):
        raise ValueError('expected a signal name like "SIGTERM"')
    name = v.upper() if v.upper().startswith("SIG") else "SIG" + v.upper()
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError('unknown signal name; use one like "SIGTERM", "SIGINT" or "SIGQUIT"') from None


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
        return v

    return parse


def _listen(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError('expected "HOST:PORT" or "PORT", like "127.0.0.1:8080"')
    port = v.rsplit(":", 1)[-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError('expected "HOST:PORT" or "PORT" with a port in 1-65535, like "127.0.0.1:8080"')
    return v


def _optional_listen(v: Any) -> str | None:
    """An address the daemon itself binds (HOST:PORT, host defaulting to 127.0.0.1)."""
    if v is None:
        return None
    _listen(v)
    host = v.rsplit(":", 1)[0] if ":" in v else "127.0.0.1"
    if not host:
        raise ValueError('expected "HOST:PORT" or "PORT", like "127.0.0.1:9108"')
    return v


def _host_port(v: str | None) -> tuple[str, int] | None:
    if v is None:
        return None
    host, _, port = v.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _workers(v: Any) -> str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return str(v)
    raise ValueError('expected "auto" or a whole number greater than 0')


REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One configuration key: how to parse it, its default, and what it is for."""

    name: str
    parse: Callable[[Any], Any]
    default: Any = REQUIRED
    help: str = ""  # the README's config reference row (Markdown), generated from here
    shown: str | None = None  # the default as the reference shows it, where the value alone would mislead


def _tables(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise ValueError("expected a list of tables ([[...]] blocks)")
    return v


CHECK_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CHECK_KEYS: dict[str, Any] = {"method": "GET", "path": None, "status": 200, "body": None, "headers": {}, "timeout": 5.0}


def _parse_checks(tables: list[dict[str, Any]], problems: list[str]) -> list[CheckConfig]:
    """Each [[release.checks]] entry, every problem named by its index and key."""
    checks = []
    for i, t in enumerate(tables):
        where, bad = f"release.checks[{i}]", len(problems)
        for key in t:
            if key not in CHECK_KEYS:
                problems.append(f"{where}.{key}: unknown key (known: {', '.join(CHECK_KEYS)})")
        v = {**CHECK_KEYS, **t}
        method = v["method"]
        if not isinstance(method, str) or method.upper() not in CHECK_METHODS:
            problems.append(f"{where}.method: one of {', '.join(CHECK_METHODS)}, got {method!r}")
        if not isinstance(v["path"], str) or not v["path"].startswith("/") or any(c in v["path"] for c in " \r\n"):
            problems.append(f"{where}.path: required, a path on the app starting with / (no spaces), "
                            f"got {v['path']!r}")
        if isinstance(v["status"], bool) or not isinstance(v["status"], int) or not 100 <= v["status"] <= 599:
            problems.append(f"{where}.status: the expected HTTP status (100-599), got {v['status']!r}")
        if v["body"] is not None and not isinstance(v["body"], str):
            problems.append(f"{where}.body: a string the answer must contain, got {v['body']!r}")
        headers = v["headers"]
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in
                                                    headers.items()):
            problems.append(f"{where}.headers: a table of strings, got {headers!r}")
        timeout = v["timeout"]
        if not _number(timeout) or timeout <= 0:
            problems.append(f"{where}.timeout: seconds, a positive finite number, got {timeout!r}")
        if len(problems) == bad:
            checks.append(CheckConfig(method.upper(), v["path"], v["status"], v["body"], dict(headers),
                                      float(timeout)))
    return checks


SCHEMA: dict[str, tuple[Key, ...]] = {
    "daemon": (
        Key("socket", _optional_str, None,
            "control socket path (≤ 107 bytes)",
            shown="`<state_dir>/bluegreen.sock`"),
        Key("state_dir", _nonempty_str, "run",
            "`state.json`, `logs/`, `slots/`, the managed nginx prefix `nginx/`"),
        Key("on_stop", _choice("stop", "keep"), "stop",
            "SIGTERM/SIGINT: `stop` the app and managed nginx, or `keep` them serving for the next "
            "daemon"),
        Key("socket_group", _optional_str, None,
            "group allowed on the socket (then mode 0660); default 0600, owner only"),
        Key("allow_users", _str_list, [],
            "users allowed on the socket besides root and the daemon's user: the socket is then mode 0666 "
            "and each connection's user is checked (SO_PEERCRED); anyone else gets `forbidden`. They must "
            "be able to reach its directory"),
        Key("allow_groups", _str_list, [],
            "groups whose members are allowed on the socket (as `allow_users`, by the connecting "
            "process's groups)"),
        Key("client_timeout", _positive, 10.0,
            "seconds a client has to send its request line"),
        Key("metrics_listen", _optional_listen, None,
            "`HOST:PORT` where Prometheus metrics are served (`GET /metrics`); unset: no endpoint"),
    ),
    "logs": (
        Key("max_bytes", _log_bytes, 10485760,
            "a log is rotated before it would pass this size (at least 4096): `logs/blue.log`, "
            "`logs/green.log`, the managed nginx's `access.log` and `error.log`, `logs/daemon.log`"),
        Key("backups", _positive_int, 5,
            "rotated files kept per log (`<name>.1` is the newest)"),
    ),
    "app": (
        Key("command", _argv, REQUIRED,
            "argv list, never run through a shell"),
        Key("protocol", _choice("http", "grpc", "tcp"), "http",
            "what the app speaks on its port: `http` (HTTP/1.1, WebSockets, event streams), `grpc` (the "
            "managed nginx listens with `http2` and proxies with `grpc_pass`; readiness is "
            "`grpc.health.v1.Health/Check`) or `tcp` (any protocol over TCP, proxied by nginx's `stream` "
            "module; switched by reloads; readiness by a connect, or `app.ready.send`/`expect`)"),
        Key("cwd", _nonempty_str, "{build}",
            "working directory (by default the build, or the directory holding a file build)"),
        Key("env", _env, {},
            "extra environment (the app also gets `BLUEGREEN_SLOT`, `BLUEGREEN_PORT`, "
            "`BLUEGREEN_BUILD`)"),
        Key("ports", _ports, REQUIRED,
            "`[blue, green]`, two different ports"),
        Key("build", _nonempty_str, REQUIRED,
            "the build started when `state.json` has none: a directory, or a file: an archive (`.war`, "
            "`.jar`, `.ear`, `.zip`, which must be a zip) or an executable"),
        Key("dirs", _str_list, [],
            "directories created in the slot dir before each start"),
        Key("files", _env, {},
            "`\"dest\" = \"template\"`: files rendered into the slot dir before each start"),
        Key("spare", _bool, False,
            "a hot spare: while no release needs the other slot, it runs the active build, ready and "
            "checked, with no traffic; a crash (or a hung app) is then one routing change, not a boot. "
            "Costs one more copy of the app's memory (`status` shows it)"),
    ),
    "app.ready": (
        Key("url", _optional_str, None,
            "ready when it answers 2xx; without it, a TCP connect check"),
        Key("timeout", _positive, 60.0,
            "seconds the standby has to become ready"),
        Key("interval", _positive, 0.1,
            "seconds between checks"),
        Key("passes", _positive_int, 1,
            "consecutive passing checks needed"),
        Key("send", _optional_str, None,
            "`app.protocol = \"tcp\"`: what the readiness check sends once connected (TOML escapes: "
            "`\"PING\\r\\n\"`); unset: a connect is enough"),
        Key("expect", _optional_str, None,
            "`app.protocol = \"tcp\"`: what the reply to `send` must contain"),
        Key("grpc_service", _str_or_none_any, None,
            "`app.protocol = \"grpc\"`: the service asked about in `grpc.health.v1.Health/Check` (`\"\"`: the "
            "whole server); ready when it answers SERVING",
            shown='`""` (grpc), unused (http)'),
        Key("body", _optional_str, None,
            "the 2xx body must contain this string"),
        Key("log", _regex, None,
            "a regex that must first appear in the app's log since this start (e.g. `Server startup "
            "in`)"),
    ),
    "app.health": (
        Key("url", _optional_str, None,
            "liveness URL of the active app (with `{port}`); unset = no liveness checks"),
        Key("interval", _positive, 5.0,
            "seconds between two liveness checks"),
        Key("timeout", _positive, 2.0,
            "seconds one check may take"),
        Key("failures", _positive_int, 3,
            "failed checks in a row after which the app counts as hung and is replaced"),
    ),
    "app.restart": (
        Key("attempts", _positive_int, 5,
            "restarts of a crashed active app before giving up (status `failed`)"),
        Key("backoff", _positive, 1.0,
            "seconds before the second restart in a row, doubled each time"),
        Key("backoff_max", _positive, 30.0,
            "the longest wait between two restarts"),
        Key("reset_after", _positive, 60.0,
            "an app that ran this long before crashing starts a fresh count"),
    ),
    "app.stop": (
        Key("signal", _signal, "SIGTERM",
            "signal sent to the old app's process group"),
        Key("timeout", _positive, 30.0,
            "seconds before SIGKILL of the whole tree"),
    ),
    "release": (
        Key("checks", _tables, [],
            "smoke checks, one `[[release.checks]]` block each: `method` (`GET`), `path` (required), "
            "`status` (expected, `200`), `body` (a substring the answer must contain), `headers` (a "
            "table), `timeout` (`5` s). They run against the standby's own port after it is ready and "
            "before any traffic moves, for releases (`swap`, `rollback`), not crash restarts. Any "
            "failure stops the standby: exit 1, `checks_failed`, traffic unchanged",
            shown="none"),
        Key("preview_header", _pattern(r"[A-Za-z0-9-]+", "X-Bluegreen-Preview"), "X-Bluegreen-Preview",
            "while a swap is paused (`swap --pause`), public requests with this header set to `1` go "
            "to the new build; letters, digits and `-`"),
        Key("preview_cookie", _pattern(r"[A-Za-z0-9_]+", "bluegreen_preview"), "bluegreen_preview",
            "the same with this cookie set to `1` (for browsers); letters, digits and `_`"),
        Key("preview_token", _choice("", "random"), "",
            "`\"random\"`: the preview header and cookie must carry a fresh secret token, made for "
            "each pause and printed by `swap --pause` (and `status`), instead of `1`; nobody who only "
            "read these docs reaches the new build. `\"\"`: the value `1`",
            shown='`""`'),
        Key("pause_timeout", _positive, 3600.0,
            "seconds a paused swap waits for `promote` or `abort`; then it is aborted "
            "(`pause_timeout`), traffic unchanged"),
        Key("watch_seconds", _seconds_or_zero, 0.0,
            "after a `swap BUILD` that switched everyone at once, watch the new build this long (the "
            "`[rollout]` rules, against the old build's traffic before the switch), the old one still "
            "running; a failed verdict goes back to it on its own (`rollout_aborted`). Runtime switch "
            "only"),
        Key("keep_warm", _seconds_or_zero, 0.0,
            "seconds the old build keeps running, with no traffic, after a release: `rollback` within "
            "that window is one routing change. `0`: stop it once drained"),
    ),
    "rollout": (
        Key("steps", shares, [],
            "shares of users (percent, rising, 1-100) the new build gets step by step before "
            "everyone, for every `swap BUILD` (or per swap: `--rollout 5,25,50,100`). Runtime switch "
            "only",
            shown="none"),
        Key("step_seconds", _positive, 60.0,
            "seconds each step lasts at least (`--step`)"),
        Key("step_timeout", _positive, 600.0,
            "seconds a step may wait for its verdict (a quiet site may take long to reach "
            "`min_requests`); then the rollout is reverted (`rollout_aborted`, naming the count)"),
        Key("ignore_paths", _url_paths, [],
            "request paths never judged (a path, or a prefix ending in `/`): health checks of a load "
            "balancer, metrics scrapes. The path of `app.ready.url` is never judged either",
            shown="none"),
        Key("cookie", _pattern(r"[A-Za-z0-9_]+", "bluegreen_id"), "bluegreen_id",
            "the cookie naming a user; its hash modulo 100 is the user's bucket. nginx sets it when "
            "missing"),
        Key("min_requests", _positive_int, 20,
            "a step passes only once the new build served this many requests"),
        Key("max_error_rate", _ratio, 0.01,
            "the new build's failed share (5xx answers, no answer at all) always tolerated"),
        Key("error_ratio", _factor, 2.0,
            "or up to this many times the old build's failed share, whichever is higher"),
        Key("latency_ratio", _optional_factor, None,
            "if set, a step fails when the new build's p99 exceeds the old build's p99 times this"),
    ),
    "hooks": (
        Key("before_switch", _optional_argv, None,
            "argv run after ready, before the smoke checks and any traffic: the expand migration. "
            "Failing or timing out aborts the swap (`hook_failed`), traffic unchanged"),
        Key("after_switch", _optional_argv, None,
            "argv run once the new build serves and the old one is drained, before the old one stops: "
            "the contract migration, a notification"),
        Key("after_failure", _optional_argv, None,
            "argv run after a release failed and was cleaned up, with `BLUEGREEN_ERROR_CODE`, "
            "`BLUEGREEN_ERROR`, `BLUEGREEN_PHASE`, `BLUEGREEN_TRAFFIC`"),
        Key("timeout", _positive, 300.0,
            "seconds a hook may run; then its whole process group is killed and it counts as failed"),
        Key("after_switch_failed", _choice("warn", "rollback"), "warn",
            "a failed `after_switch`: `warn` (success with a warning) or `rollback` (traffic back to "
            "the old build, still running; exit 1, `hook_failed`)"),
    ),
    "drain": (
        Key("timeout", _positive, 30.0,
            "the longest an old slot keeps serving short requests after the switch (managed nginx: "
            "`worker_shutdown_timeout` = the longer of this and `long_lived_grace`, + 1 s, as a backstop)"),
        Key("interval", _positive, 0.02,
            "seconds between two in-flight counts"),
        Key("long_lived_grace", _optional_seconds_or_zero, None,
            "seconds long-lived connections to the old build (WebSockets, `long_lived_paths`, a TCP "
            "service's pooled connections) get after the switch to end by themselves; then the daemon closes "
            "them and their clients reconnect, to the new build. Short requests never wait for them",
            shown="`drain.timeout`"),
        Key("long_lived_paths", _url_paths, [],
            "paths whose requests are long-lived too (a path, or a prefix ending in `/`), besides "
            "WebSockets: event streams, long polling, streamed downloads. A request header alone "
            "(`Accept: text/event-stream`) never makes a request long-lived"),
        Key("tcp_calls", _choice("one at a time", "pipelined"), "one at a time",
            "a TCP service's clients: `one at a time` (each waits for its answer before its next call on "
            "a connection: pools such as redis-py's, Jedis') lets the drain close a connection between two "
            "calls, proven from outside the app; `pipelined` (several calls on a connection before their "
            "answers: ioredis, node-redis, Lettuce, pipelines), which no one outside the app can tell from "
            "a rest: each connection is closed at `long_lived_grace`, and counted as possibly cutting calls"),
    ),
    "hold": (
        Key("timeout", _hold_seconds, 10.0,
            "the runtime switch (an HTTP app): how long a request that arrives while no build can answer (the "
            "active crashed and its replacement boots, a hung app is replaced) is held inside nginx, waiting "
            "for a build that answers; past it, `503` with `Retry-After`. 10 s covers a first restart (no "
            "backoff) of an app that boots in a few seconds, and the second (1 s backoff) of a Node app; a "
            "client is told rather than left hanging. At most 55: nginx's `proxy_read_timeout` (60 s by default) "
            "ends a longer hold with 504. 0: nothing is held (nginx answers 502 while no build can)"),
        Key("max_requests", _positive_int, 200,
            "the most requests held at once; one more gets `503` with `Retry-After` at once. Each held request "
            "takes about three of nginx's connections (`worker_connections` per worker: 1024 for the managed "
            "nginx, `nginx.worker_connections`), against two when served: raise both together"),
        Key("retry_idempotent", _bool, False,
            "a request the crashed app may already have read (bytes of it were sent) is retried on the build "
            "that answers next if its method is idempotent (GET, HEAD, PUT, DELETE, OPTIONS, TRACE). Off: it "
            "fails (502) and the crash event counts it lost. A request that never reached the app is always "
            "retried, whatever its method"),
    ),
    "nginx": (
        Key("mode", _choice("managed", "external"), "managed",
            "`managed`: the daemon runs its own nginx; `external`: your nginx"),
        Key("switch", _choice("reload", "runtime", "auto"), None,
            "how a swap moves traffic: `runtime` (a routing table inside nginx, no reload; needs "
            "`libnginx-mod-http-lua`), `reload` (rewrite the upstream, reload nginx), `auto` (managed "
            "only: runtime when this nginx loads the module, else reload; `status` and the start-up "
            "log say which and why)",
            shown="`auto` (managed), `reload` (external)"),
        Key("binary", _nonempty_str, "nginx",
            "looked up on PATH, then `/usr/sbin`"),
        Key("listen", _listen, "127.0.0.1:8080",
            "managed: where nginx listens"),
        Key("worker_processes", _workers, 1,
            "managed: a number or `\"auto\"`"),
        Key("worker_connections", _connections, 1024,
            "managed: connections each worker may hold; a WebSocket or event stream holds two (its client's "
            "and the app's), so 500 WebSocket clients need more than 1000 (the daemon's open-files limit "
            "must allow it)"),
        Key("user", _optional_str, None,
            "managed, daemon run as root: the workers' user",
            shown="root's own"),
        Key("reload_timeout", _positive, 10.0,
            "seconds for a reload to be confirmed"),
        Key("upstream_file", _optional_str, None,
            "external: the file bluegreen writes (include it in your `http` block): the upstream "
            "block, or with `switch = \"runtime\"` the runtime switch's part",
            shown="—"),
        Key("upstream_name", _nonempty_str, "bluegreen_app",
            "the upstream block's name (`proxy_pass http://NAME`)"),
        Key("lua_handlers_file", _optional_str, None,
            "external, `switch = \"runtime\"`, several apps in one nginx: the file for the request "
            "handlers all apps share (the same path in every app's config; include it once in `http`)",
            shown="none: in `upstream_file`"),
        Key("pid_file", _optional_str, None,
            "external: the master's pid file, to confirm reloads",
            shown="—"),
        Key("error_log", _optional_str, None,
            "external: nginx's error log, quoted when a reload fails"),
        Key("test_command", _optional_argv, None,
            "external: argv that tests the config, run as the daemon's user",
            shown="`nginx -t`"),
        Key("reload_command", _optional_argv, None,
            "external: argv that reloads",
            shown="`nginx -s reload`"),
    ),
}


# --- the typed result


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    state_dir: Path
    on_stop: str = "stop"
    socket_group: str | None = None
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    client_timeout: float = 10.0
    metrics_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class LogsConfig:
    max_bytes: int = 10485760
    backups: int = 5


@dataclass(frozen=True)
class RestartConfig:
    attempts: int = 5
    backoff: float = 1.0
    backoff_max: float = 30.0
    reset_after: float = 60.0

    def delay(self, attempt: int) -> float:
        """The wait before restart number `attempt` (1-based): none for the first, then doubling, capped."""
        return 0.0 if attempt <= 1 else min(self.backoff_max, self.backoff * 2 ** (attempt - 2))


@dataclass(frozen=True)
class ReadyConfig:
    url: str | None
    timeout: float
    interval: float
    passes: int = 1
    body: str | None = None
    log: re.Pattern[str] | None = None
    grpc_service: str | None = None  # set: readiness is grpc.health.v1.Health/Check for it
    send: str | None = None  # tcp: the readiness request
    expect: str | None = None  # tcp: what its reply must contain


@dataclass(frozen=True)
class HealthConfig:
    url: str | None = None
    interval: float = 5.0
    timeout: float = 2.0
    failures: int = 3


@dataclass(frozen=True)
class CheckConfig:
    """One smoke check: `method path` on the standby must answer `status` (and contain `body`)."""

    method: str
    path: str
    status: int = 200
    body: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 5.0

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class ReleaseConfig:
    checks: tuple[CheckConfig, ...] = ()
    preview_header: str = "X-Bluegreen-Preview"
    preview_cookie: str = "bluegreen_preview"
    preview_token: str = ""
    pause_timeout: float = 3600.0
    keep_warm: float = 0.0
    watch_seconds: float = 0.0


@dataclass(frozen=True)
class HooksConfig:
    before_switch: tuple[str, ...] | None = None
    after_switch: tuple[str, ...] | None = None
    after_failure: tuple[str, ...] | None = None
    timeout: float = 300.0
    after_switch_failed: str = "warn"  # warn | rollback

    def get(self, name: str) -> tuple[str, ...] | None:
        return getattr(self, name)  # type: ignore[no-any-return]


HOOKS = ("before_switch", "after_switch", "after_failure")


@dataclass(frozen=True)
class RolloutConfig:
    steps: tuple[int, ...] = ()
    step_seconds: float = 60.0
    step_timeout: float = 600.0
    ignore_paths: tuple[str, ...] = ()
    cookie: str = "bluegreen_id"
    min_requests: int = 20
    max_error_rate: float = 0.01
    error_ratio: float = 2.0
    latency_ratio: float | None = None


@dataclass(frozen=True)
class StopConfig:
    signal: signal.Signals
    timeout: float


@dataclass(frozen=True)
class AppConfig:
    command: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    ports: tuple[int, int]
    build: Path
    ready: ReadyConfig
    stop: StopConfig
    protocol: str = "http"
    dirs: tuple[str, ...] = ()
    files: Mapping[str, Path] = field(default_factory=dict)
    restart: RestartConfig = RestartConfig()
    health: HealthConfig = HealthConfig()
    spare: bool = False

    def port(self, slot: str) -> int:
        return self.ports[SLOTS.index(slot)]


@dataclass(frozen=True)
class DrainConfig:
    timeout: float
    interval: float
    long_lived_grace: float | None = None  # None: timeout
    long_lived_paths: tuple[str, ...] = ()
    tcp_calls: str = "one at a time"

    @property
    def grace(self) -> float:
        return self.timeout if self.long_lived_grace is None else self.long_lived_grace


@dataclass(frozen=True)
class HoldConfig:
    timeout: float = 10.0
    retry_idempotent: bool = False
    max_requests: int = 200


@dataclass(frozen=True)
class NginxConfig:
    mode: str
    switch: str
    binary: str
    listen: str
    worker_processes: str
    worker_connections: int
    user: str | None
    reload_timeout: float
    upstream_file: Path | None
    upstream_name: str
    lua_handlers_file: Path | None
    pid_file: Path | None
    error_log: Path | None
    test_command: tuple[str, ...]
    reload_command: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    app: AppConfig
    drain: DrainConfig
    nginx: NginxConfig
    release: ReleaseConfig = ReleaseConfig()
    hooks: HooksConfig = HooksConfig()
    rollout: RolloutConfig = RolloutConfig()
    logs: LogsConfig = LogsConfig()
    hold: HoldConfig = HoldConfig()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


# --- placeholders


def expand(template: str, context: Mapping[str, str]) -> str:
    """Fill `{port}`-style placeholders; `{{` and `}}` are literal braces."""
    return template.format_map(context)


_TOKEN = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def render_tokens(text: str, context: Mapping[str, str]) -> str:
    """Fill only the known `{port}`-style tokens of a file template; every other brace (`${catalina.base}`,
    JSON, ...) is left as it is, so existing config files work as templates unchanged."""
    return _TOKEN.sub(lambda m: context[m.group(1)], text)


def placeholder_problems(where: str, template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return [f"{where}: {e} in {template!r} (write {{{{ and }}}} for literal braces)"]
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    return [
        f"{where}: unknown placeholder {{{n}}} in {template!r}; known: {known}"
        for n in names
        if n not in PLACEHOLDERS
    ]


# --- loading


def load(path: str | os.PathLike[str], *, machine: bool = False, with_build: bool = True) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem.

    With `machine`, also check what this machine must offer (see `machine_problems`).
    """
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass -c PATH (see config.example.toml)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): save it as UTF-8; "
                          "an editor's UTF-16 or Latin-1 will not do") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return parse(text, path, machine=machine, with_build=with_build)


def parse(text: str, path: Path, *, machine: bool = False, with_build: bool = True) -> Config:
    try:
        data = toml().loads(text)
    except toml().TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    problems: list[str] = []
    values = _check_keys(data, problems)
    _cross_check(values, path, data, problems)
    if machine:
        problems += machine_problems(values, path, with_build=with_build)
    if problems:
        raise ConfigError(problems)
    return _assemble(values, path, data)


def _check_keys(data: dict[str, Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    """Type-check every declared key, fill defaults, and name every unknown key."""
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        table: Any = data
        for part in section.split("."):
            table = table.get(part, {}) if isinstance(table, dict) else {}
        if not isinstance(table, dict):
            problems.append(f"[{section}]: expected a table")
            table = {}
        subsections = {s.split(".")[-1] for s in SCHEMA if s.startswith(section + ".")}
        known = {k.name for k in keys}
        for name in table:
            if name not in known and name not in subsections:
                hint = ", ".join(sorted(known | subsections))
                problems.append(f"{section}.{name}: unknown key (known keys in [{section}]: {hint})")
        values[section] = {}
        for key in keys:
            if key.name not in table:
                if key.default is REQUIRED:
                    problems.append(f"{section}.{key.name}: missing; {key.help}")
                    continue
                if key.default is None:
                    values[section][key.name] = None
                    continue
                raw = key.default
            else:
                raw = table[key.name]
            try:
                values[section][key.name] = key.parse(raw)
            except ValueError as e:
                got = repr(raw)
                problems.append(f"{section}.{key.name}: {e}" + ("" if got[:40] in str(e) else
                                                                 f", got {got if len(got) <= 120 else got[:117] + '...'}"))
    for name in data:
        if name not in {s.split(".")[0] for s in SCHEMA}:
            problems.append(f"[{name}]: unknown section (known: {', '.join(s for s in SCHEMA if '.' not in s)})")
    return values


def _cross_check(v: dict[str, dict[str, Any]], path: Path, data: dict[str, Any], problems: list[str]) -> None:
    """Rules that span keys; each runs only on keys that parsed, so all problems show at once."""
    d, a, r, n = v["daemon"], v["app"], v["app.ready"], v["nginx"]
    if "state_dir" in d:
        sock = _socket_path(d, path.parent)
        if len(os.fsencode(str(sock))) > MAX_SOCKET_PATH:
            problems.append(
                f"daemon.socket: {sock} is {len(os.fsencode(str(sock)))} bytes; Unix sockets allow at most "
                f"{MAX_SOCKET_PATH}; choose a shorter path"
            )
    import grp
    import pwd

    for name in d.get("allow_users", ()):
        try:
            pwd.getpwnam(name)
        except KeyError:
            problems.append(f"daemon.allow_users: no such user {name!r}")
    for key in ("allow_groups", "socket_group"):
        names = d.get(key) or ()
        for name in [names] if isinstance(names, str) else names:
            try:
                grp.getgrnam(name)
            except KeyError:
                problems.append(f"daemon.{key}: no such group {name!r}")
    _check_app(a, r, v["app.health"], path, problems)
    _check_protocol(v, data, problems)
    _check_nginx(n, a, d, path, data, problems)
    metrics = _host_port(d.get("metrics_listen"))
    if metrics:  # the daemon's own port must be no one else's in this config
        taken = {p: f"app.ports ({'blue' if i == 0 else 'green'})" for i, p in enumerate(a.get("ports") or ())}
        if n.get("mode", "managed") == "managed" and isinstance(n.get("listen"), str):
            taken[int(n["listen"].rsplit(":", 1)[-1])] = "nginx.listen"
        if metrics[1] in taken:
            problems.append(f"daemon.metrics_listen: port {metrics[1]} is also {taken[metrics[1]]}; choose another port")
    v["release"]["checks"] = _parse_checks(v["release"].get("checks", []), problems)
    reloads = (n.get("switch") or ("auto" if n.get("mode") == "managed" else "reload")) == "reload"
    for key, on in (("rollout.steps", v["rollout"].get("steps")), ("release.watch_seconds",
                                                                   v["release"].get("watch_seconds"))):
        if on and reloads:
            problems.append(f'{key}: needs the runtime switch (nginx.switch = "runtime", or "auto" with '
                            f'libnginx-mod-http-lua); with reloads, remove {key}')
    ro = v["rollout"]
    if "step_timeout" in ro and "step_seconds" in ro and ro["step_timeout"] < ro["step_seconds"]:
        problems.append(f"rollout.step_timeout: {ro['step_timeout']:g}s is shorter than rollout.step_seconds "
                        f"({ro['step_seconds']:g}s), so no step could pass; raise it")
    for name in HOOKS:
        for i, arg in enumerate(v["hooks"].get(name) or ()):
            problems += placeholder_problems(f"hooks.{name}[{i}]", arg)


def _check_protocol(v: dict[str, dict[str, Any]], data: dict[str, Any], problems: list[str]) -> None:
    """What a gRPC or TCP app cannot have: HTTP checks; for TCP also what needs a path, a header,
    a cookie or counted answers, and the runtime switch."""
    a, n = v["app"], v["nginx"]
    if a.get("protocol", "http") != "http" and v["release"].get("checks"):
        problems.append(f'release.checks: HTTP smoke checks, and app.protocol = "{a["protocol"]}": remove them '
                        "(app.ready says when the build is ready)")
    if a.get("protocol") == "tcp":
        for key, value, what in (("rollout.steps", v["rollout"].get("steps"), "rollout"),
                                 ("release.watch_seconds", v["release"].get("watch_seconds"), "watch"),
                                 ("drain.long_lived_paths", v["drain"].get("long_lived_paths"), "long-lived paths")):
            if value:
                problems.append(f'{key}: app.protocol = "tcp" has no {what}: nginx\'s stream module sees no path, '
                                "header or cookie, and counts no answer; remove it")
    if a.get("protocol") == "tcp" and n.get("switch") in ("runtime", "auto") and "switch" in data.get("nginx", {}):
        problems.append(f'nginx.switch: "{n["switch"]}", and app.protocol = "tcp": a TCP service is switched by '
                        'reloads (Debian\'s nginx has no lua for its stream module): set nginx.switch = "reload" or '
                        "leave it out")


def _check_app(a: dict[str, Any], r: dict[str, Any], h: dict[str, Any], path: Path, problems: list[str]) -> None:
    for i, arg in enumerate(a.get("command", ())):
        problems += placeholder_problems(f"app.command[{i}]", arg)
    if "cwd" in a:
        problems += placeholder_problems("app.cwd", a["cwd"])
    for i, d in enumerate(a.get("dirs", ())):
        problems += placeholder_problems(f"app.dirs[{i}]", d)
    for dest, src in a.get("files", {}).items():
        problems += placeholder_problems(f"app.files.{dest!r}", dest)
        if not _rel(path.parent, src).is_file():
            problems.append(f"app.files.{dest!r}: source {_rel(path.parent, src)} does not exist or is not a file")
    for k, x in a.get("env", {}).items():
        problems += placeholder_problems(f"app.env.{k}", x)
    for key, url in (("app.ready.url", r.get("url")), ("app.health.url", h.get("url"))):
        if url is None:
            continue
        problems += placeholder_problems(key, url)
        if not url.startswith(("http://", "https://")):
            problems.append(f"{key}: expected an http:// URL, got {url!r}")
        elif "{port}" not in url:
            problems.append(f"{key}: must contain {{port}}, like \"http://127.0.0.1:{{port}}/health\"; with a fixed "
                            f"port it would check the other slot's app, got {url!r}")
    protocol = a.get("protocol", "http")
    if protocol != "http":
        how = {"grpc": "when grpc.health.v1.Health/Check says SERVING: app.ready.grpc_service",
               "tcp": "once it accepts a connection, or answers app.ready.send with app.ready.expect"}[protocol]
        for key, value in (("app.ready.url", r.get("url")), ("app.ready.body", r.get("body")),
                           ("app.health.url", h.get("url"))):
            if value is not None:
                problems.append(f'{key}: an HTTP check, and app.protocol = "{protocol}": remove it (the app is '
                                f"ready {how})")
    for key, needs in (("grpc_service", "grpc"), ("send", "tcp"), ("expect", "tcp")):
        if r.get(key) is not None and protocol != needs:
            problems.append(f'app.ready.{key}: only used with app.protocol = "{needs}"; remove it, or set the protocol')
    if r.get("expect") is not None and r.get("send") is None:
        problems.append("app.ready.expect: the reply to app.ready.send, which is not set")
    if "interval" in r and "timeout" in r and r["interval"] >= r["timeout"]:
        problems.append(
            f"app.ready.interval: must be shorter than app.ready.timeout ({r['timeout']}s), got {r['interval']}"
        )


def _check_nginx(n: dict[str, Any], a: dict[str, Any], d: dict[str, Any], path: Path, data: dict[str, Any],
                 problems: list[str]) -> None:
    mode = n.get("mode")
    if "state_dir" in d:
        bad = sorted(set(str(_rel(path.parent, d["state_dir"]))) & NGINX_UNSAFE)
        if bad:
            problems.append(f"daemon.state_dir: the path may not contain {' '.join(repr(c) for c in bad)} "
                            "(it is written into the managed nginx.conf); choose another directory")
    if "upstream_name" in n and not UPSTREAM_NAME.fullmatch(n["upstream_name"]):
        problems.append(f"nginx.upstream_name: letters, digits, '_', '.' and '-' only, got {n['upstream_name']!r}")
    if mode == "managed" and "listen" in n and "ports" in a:
        listen_port = int(n["listen"].rsplit(":", 1)[-1])
        if listen_port in a["ports"]:
            problems.append(f"nginx.listen: port {listen_port} is also in app.ports {list(a['ports'])}; "
                            "nginx and the app need different ports")
    if mode == "external":
        for key in ("upstream_file", "pid_file"):
            if not n.get(key):
                problems.append(f'nginx.{key}: required when nginx.mode = "external"')
        for key in ("listen", "worker_processes", "worker_connections", "user"):
            if key in data.get("nginx", {}):
                problems.append(f'nginx.{key}: only used when nginx.mode = "managed"; remove it')
        if n.get("lua_handlers_file") and n.get("switch") != "runtime":
            problems.append('nginx.lua_handlers_file: only used with nginx.switch = "runtime"; remove it')
        if n.get("lua_handlers_file") and n.get("upstream_file") and \
                _rel(path.parent, n["lua_handlers_file"]) == _rel(path.parent, n["upstream_file"]):
            problems.append("nginx.lua_handlers_file: must be another file than nginx.upstream_file (one is "
                            "shared by every app, the other is this app's)")
        if n.get("switch") == "auto":
            problems.append('nginx.switch: "auto" is for the managed nginx; with your own nginx choose "reload", or '
                            '"runtime" once its config includes the upstream file with the lua module loaded '
                            "(see docs/nginx.md#the-runtime-switch-with-your-own-nginx-external-mode)")
    elif mode == "managed":
        for key in ("upstream_file", "pid_file", "error_log", "test_command", "reload_command", "lua_handlers_file"):
            if n.get(key) is not None:
                problems.append(f'nginx.{key}: only used when nginx.mode = "external"; remove it')
        if "binary" in n and resolve_binary(n["binary"]) is None:
            problems.append(
                f"nginx.binary: {n['binary']!r} not found on PATH or in /usr/sbin; install nginx "
                "(apt-get install nginx) or set nginx.binary to its full path"
            )


def _nginx_config(n: dict[str, Any], base: Path) -> NginxConfig:
    binary = n["binary"]
    if n["mode"] == "managed":
        binary = resolve_binary(binary) or binary

    def opt(key: str) -> Path | None:
        return _rel(base, n[key]) if n[key] else None

    return NginxConfig(
        mode=n["mode"],
        switch=n["switch"] or ("auto" if n["mode"] == "managed" else "reload"),
        binary=binary,
        listen=n["listen"],
        worker_processes=n["worker_processes"],
        worker_connections=n["worker_connections"],
        user=n["user"],
        reload_timeout=n["reload_timeout"],
        upstream_file=opt("upstream_file"),
        upstream_name=n["upstream_name"],
        lua_handlers_file=opt("lua_handlers_file"),
        pid_file=opt("pid_file"),
        error_log=opt("error_log"),
        test_command=n["test_command"] or (binary, "-t"),
        reload_command=n["reload_command"] or (binary, "-s", "reload"),
    )


def _assemble(v: dict[str, dict[str, Any]], path: Path, data: dict[str, Any]) -> Config:
    base = path.parent
    d, a, r, s, dr, n = (v[k] for k in ("daemon", "app", "app.ready", "app.stop", "drain", "nginx"))
    rs, h = v["app.restart"], v["app.health"]
    return Config(
        path=path,
        daemon=DaemonConfig(socket=_socket_path(d, base), state_dir=_rel(base, d["state_dir"]), on_stop=d["on_stop"],
                            socket_group=d["socket_group"], allow_users=d["allow_users"],
                            allow_groups=d["allow_groups"], client_timeout=d["client_timeout"],
                            metrics_listen=_host_port(d["metrics_listen"])),
        app=AppConfig(
            command=a["command"],
            cwd=a["cwd"],
            env=a["env"],
            ports=a["ports"],
            build=_rel(base, a["build"]),
            ready=ReadyConfig(url=r["url"], timeout=r["timeout"], interval=r["interval"], passes=r["passes"],
                              body=r["body"], log=r["log"],
                              grpc_service=(r["grpc_service"] or "") if a["protocol"] == "grpc" else None,
                              send=r["send"], expect=r["expect"]),
            protocol=a["protocol"],
            stop=StopConfig(signal=s["signal"], timeout=s["timeout"]),
            dirs=a["dirs"],
            restart=RestartConfig(attempts=rs["attempts"], backoff=rs["backoff"], backoff_max=rs["backoff_max"],
                                  reset_after=rs["reset_after"]),
            files={dest: _rel(base, src) for dest, src in a["files"].items()},
            health=HealthConfig(url=h["url"], interval=h["interval"], timeout=h["timeout"], failures=h["failures"]),
            spare=a["spare"],
        ),
        drain=DrainConfig(timeout=dr["timeout"], interval=dr["interval"], long_lived_grace=dr["long_lived_grace"],
                          long_lived_paths=dr["long_lived_paths"], tcp_calls=dr["tcp_calls"]),
        release=ReleaseConfig(checks=tuple(v["release"]["checks"]), preview_header=v["release"]["preview_header"],
                              preview_cookie=v["release"]["preview_cookie"],
                              preview_token=v["release"]["preview_token"],
                              pause_timeout=v["release"]["pause_timeout"], keep_warm=v["release"]["keep_warm"],
                              watch_seconds=v["release"]["watch_seconds"]),
        rollout=RolloutConfig(**v["rollout"]),
        logs=LogsConfig(**v["logs"]),
        hold=HoldConfig(**v["hold"]),
        hooks=HooksConfig(before_switch=_program_from(base, v["hooks"]["before_switch"]),
                          after_switch=_program_from(base, v["hooks"]["after_switch"]),
                          after_failure=_program_from(base, v["hooks"]["after_failure"]),
                          timeout=v["hooks"]["timeout"], after_switch_failed=v["hooks"]["after_switch_failed"]),
        nginx=_nginx_config(n, base),
        raw=data,
    )


def _program_from(base: Path, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A hook's program given as a relative path (`scripts/migrate`) is relative to the config file."""
    if not argv or os.sep not in argv[0] or argv[0].startswith(("/", "{")):
        return argv
    return (str(base / argv[0]), *argv[1:])


def _nginx_file_problems(n: dict[str, Any], base: Path) -> list[str]:
    """The files the daemon writes for your nginx: their directory must be there, and writable."""
    problems = []
    for key in ("upstream_file", "lua_handlers_file"):
        if n.get(key) and n.get("mode") == "external":
            folder = _rel(base, n[key]).parent
            if not folder.is_dir():
                problems.append(f"nginx.{key}: the directory {folder} does not exist; create it (the daemon writes "
                                "the file, your nginx includes it)")
            elif not os.access(folder, os.W_OK | os.X_OK):
                problems.append(f"nginx.{key}: the directory {folder} is not writable by this user; the daemon "
                                "writes the file there")
    return problems


def machine_warnings(cfg: "Config") -> list[str]:
    """What may fail later on this machine without being wrong now: check-config prints these and
    the daemon logs them at start."""
    warnings = []
    ephemeral = ephemeral_ports()
    inside = [p for p in cfg.app.ports if ephemeral is not None and p in ephemeral]
    if inside and ephemeral is not None:
        warnings.append(f"app.ports: {', '.join(map(str, inside))} inside the kernel's range for outgoing connections "
                        f"({ephemeral.start}-{ephemeral.stop - 1}, net.ipv4.ip_local_port_range): while an outgoing "
                        "connection from that port lingers (TIME-WAIT), the app cannot listen on it and a swap fails; "
                        f"choose ports below {ephemeral.start}")
    listen = int(cfg.nginx.listen.rsplit(":", 1)[-1]) if cfg.nginx.mode == "managed" else None
    if ephemeral is not None and listen in ephemeral:
        warnings.append(f"nginx.listen: port {listen} is inside the kernel's range for outgoing connections "
                        f"({ephemeral.start}-{ephemeral.stop - 1}): an outgoing connection holding it makes the "
                        f"managed nginx fail to start (bind: address in use); choose a port below {ephemeral.start}")
    said = " ".join((*cfg.app.command, *cfg.app.env, *cfg.app.env.values())).lower()
    if cfg.app.protocol != "tcp" and "gunicorn" in said and "forwarded" not in said:
        warnings.append("app.command: gunicorn trusts X-Forwarded-For from 127.0.0.1 only (forwarded_allow_ips), "
                        "but nginx connects WebSockets and drain.long_lived_paths from 127.0.0.2 and 127.0.0.4 "
                        "(the drain tells them apart so): add --forwarded-allow-ips 127.0.0.1,127.0.0.2,127.0.0.4 "
                        "(or FORWARDED_ALLOW_IPS in app.env) for those requests to keep their client's address")
    return warnings


def machine_problems(v: dict[str, dict[str, Any]], path: Path, *, with_build: bool = True) -> list[str]:
    """What this machine must offer for the config to run, each problem named by its key.

    Run by `check-config` and at daemon start, not by client commands (a cleaned-up release
    directory must not stop `status`). `with_build=False` skips what depends on app.build,
    which the daemon only starts when state.json names no build. Only keys that parsed are checked.
    """
    problems: list[str] = []
    base = path.parent
    d, a = v["daemon"], v["app"]
    if "state_dir" in d:
        state_dir = _rel(base, d["state_dir"])
        existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"daemon.state_dir: {state_dir} cannot be created: {existing} is a file, not a directory")
        elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"daemon.state_dir: {existing} is not writable by this user; choose another directory")
    for name in HOOKS:
        argv = v["hooks"].get(name)
        if argv and "{" not in argv[0]:
            problems += hook_problems(name, _rel(base, argv[0]) if os.sep in argv[0] else Path(argv[0]))
    n = v["nginx"]
    problems += _nginx_file_problems(n, base)
    if n.get("mode") == "managed" and a.get("protocol", "http") != "http":
        missing = protocol_missing(resolve_binary(n.get("binary") or "nginx") or "nginx", a["protocol"])
        if missing:
            problems.append(f'app.protocol: "{a["protocol"]}": {missing}')
    if n.get("mode") == "managed" and n.get("switch") == "runtime":
        missing = lua_missing(resolve_binary(n.get("binary") or "nginx") or "nginx")
        if missing:
            problems.append(f'nginx.switch: "runtime" needs nginx\'s lua module; {missing}, or use "auto"')
    if not all(k in a for k in ("build", "cwd", "command", "ports", "env")) or "state_dir" not in d:
        return problems
    build = _rel(base, a["build"])
    why = builds.problem(build.resolve()) if build.exists() else f"does not exist; a build is {builds.FORMS}"
    build_ok = why is None
    if with_build and why:
        problems.append(f"app.build: {build} {why}")
    context = {"port": str(a["ports"][0]), "slot": SLOTS[0], "build": str(build), "build_name": build.name,
               "slot_dir": str(_rel(base, d["state_dir"]) / "slots" / SLOTS[0])}
    try:
        cwd = Path(expand(a["cwd"], context))
        if a["cwd"] == "{build}":
            cwd = builds.workdir(build)
        program = expand(a["command"][0], context)
    except (KeyError, ValueError, IndexError):
        return problems  # placeholders were already reported
    if not cwd.is_absolute():
        cwd = base / cwd
    if os.sep not in program and shutil.which(program, path=a["env"].get("PATH", os.environ.get("PATH"))) is None:
        problems.append(f"app.command: {program!r} is not on PATH; install it, or give its full path")
    depends_on_build = "{build" in a["cwd"] or "{build" in a["command"][0]
    if "{slot_dir}" in a["cwd"] or (depends_on_build and not (with_build and build_ok)):
        return problems  # made at start, or the build is not known yet
    if not cwd.is_dir():
        problems.append(f"app.cwd: {cwd} does not exist or is not a directory")
    elif os.sep in program and not ((cwd / program).is_file() and os.access(cwd / program, os.X_OK)):
        problems.append(f"app.command: {cwd / program} is not an executable file")
    return problems


