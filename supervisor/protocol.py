"""The control socket's wire format, shared by the daemon and the CLI.

One request per connection, one JSON object per line (UTF-8, at most 64 KiB):

    -> {"cmd": "swap", "build": "/srv/app/releases/42"}      (optional "v": 1)
    -> swap /srv/app/releases/42                             (a line not starting with "{" is read as words;
    -> swap "/srv/my app/releases/42"                         quote a path with spaces as in a shell)
    <- {"event": "start", "status": "begin", "elapsed": 0.002, ...}   zero or more progress lines
    <- {"ok": true, "result": {...}}                                  exactly one final line
    <- {"ok": false, "error": {"code": "busy", "message": "..."}}

Commands: one module each in supervisor/commands/ (swap [BUILD], rollback, cancel, status, quit,
help). BUILD over the socket must be an absolute path (the daemon cannot know the caller's
working directory; the CLI resolves it).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, NamedTuple

from .errors import RequestError

VERSION = 1
MAX_LINE = 64 * 1024
ECHO = 60  # at most this much of a client's own input is quoted back in an error


class CommandSpec(NamedTuple):
    """A verb on the wire (a NamedTuple, not a dataclass: the CLI loads every verb's spec, and
    dataclasses would cost it more than the rest of its start)."""

    name: str
    help: str
    # argument name -> (accepted JSON type, required); never changed, so one shared empty dict is safe
    args: dict[str, tuple[type, bool]] = {}
    # the order words map onto args: "swap /x" -> build="/x"
    positional: tuple[str, ...] = ()
    order: int = 100  # where it stands in `help` and the CLI
    description: str = ""


class Request(NamedTuple):
    cmd: str
    args: dict[str, Any]


def parse_request(line: bytes | str, table: Mapping[str, CommandSpec]) -> Request:
    """Parse one request line (JSON object or words) against the command table (commands.specs());
    raise RequestError saying what is wrong."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise RequestError(f"request line is {len(line)} bytes; the limit is {MAX_LINE}")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request is not valid UTF-8") from None
    text = line.strip()
    if not text:
        raise RequestError('empty request; send a JSON object like {"cmd": "status"} or words like "status"')
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"invalid JSON: {e.msg} at column {e.colno}") from None
        except RecursionError:
            raise RequestError("invalid request: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise RequestError("a request must be a JSON object")
    else:
        try:
            import shlex  # plain-text requests (socat) are parsed in the daemon only

            words = shlex.split(text)
        except ValueError as e:
            raise RequestError(f"cannot split the words of the request: {e} (quote a path with spaces: "
                               'swap "/srv/my app/build")') from None
        if not words:
            raise RequestError('empty request; send a JSON object like {"cmd": "status"} or words like "status"')
        obj = {"cmd": words[0]}
        spec = table.get(words[0])
        if spec is not None:
            if len(words) - 1 > len(spec.positional):
                raise RequestError(f"{spec.name}: too many words; usage: {usage(spec)} "
                                   '(quote a path with spaces: swap "/srv/my app/build")')
            obj.update(zip(spec.positional, words[1:]))
    return _validate(obj, table)


def _validate(obj: dict[str, Any], table: Mapping[str, CommandSpec]) -> Request:
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError('missing "cmd" (a string); known commands: ' + ", ".join(table))
    spec = table.get(cmd)
    if spec is None:
        raise RequestError(f"unknown command {clip(cmd)}; known commands: " + ", ".join(table))
    version = obj.get("v", VERSION)
    if version != VERSION:
        raise RequestError(f"protocol version {version!r} is not supported; this daemon speaks v{VERSION}")
    args: dict[str, Any] = {}
    for name, value in obj.items():
        if name in ("cmd", "v"):
            continue
        if name not in spec.args:
            raise RequestError(f"{cmd}: unknown argument {clip(name)}; usage: {usage(spec)}")
        kind, _ = spec.args[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 60 is as good as 60.0
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise RequestError(f"{cmd}: {name!r} must be a {kind.__name__}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{cmd}: {name!r} must be a finite number, got {value!r}")
        if isinstance(value, str) and not _encodable(value):  # JSON's "\ud800": no path or name has it
            raise RequestError(f"{cmd}: {name!r} is not valid Unicode (a lone surrogate such as \\ud800)")
        args[name] = value
    for name, (_, required) in spec.args.items():
        if required and name not in args:
            raise RequestError(f"{cmd}: missing argument {name!r}; usage: {usage(spec)}")
    return Request(cmd, args)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clip(text: str) -> str:
    """A client's string, quoted back short: an error never echoes a whole 60 KB line."""
    return repr(text) if len(text) <= ECHO else repr(text[:ECHO]) + f"... ({len(text)} characters)"


def usage(spec: CommandSpec) -> str:
    parts = [spec.name] + [f"[{a.upper()}]" if not spec.args[a][1] else a.upper() for a in spec.positional]
    return " ".join(parts)


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def event(name: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, **fields}


def success(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def failure(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, **details}}


def parse_reply(line: bytes) -> dict[str, Any]:
    """Client side: decode one reply line."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("reply is not a JSON object")
    return obj


def shares(v: Any) -> tuple[int, ...]:
    """Rollout shares: percentages of users, each 1-100, rising (the rollout ends at 100 either way)."""
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError("expected a list of whole percentages, like [5, 25, 50, 100]")
    bad = [x for x in v if not 1 <= x <= 100]
    if bad:
        raise ValueError(f"each share is a percentage of users, 1-100; got {bad[0]}")
    if any(b <= a for a, b in zip(v, v[1:])):
        raise ValueError(f"shares must rise, like [5, 25, 50, 100]; got {v}")
    return tuple(v)
