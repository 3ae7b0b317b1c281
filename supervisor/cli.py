"""The `bluegreen` command: run the daemon, or talk to it over its control socket.

Exit codes: 0 done; 1 the operation failed and traffic is where it was (unchanged, or
switched back); 2 usage or config error; 3 the daemon cannot be reached (or does not answer);
4 the operation failed after traffic moved to the new build (the message says what serves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from . import __version__, protocol
from .config import Config, load
from .errors import ConfigError, Unreachable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_MOVED = 0, 1, 2, 3, 4
FIRST_REPLY = 10.0  # seconds a daemon has to answer at all: a hung one is told apart from a slow swap
SLOW_PHASES = {"ready": "waiting for the standby to be ready...", "drain": "waiting for in-flight requests to finish..."}
DEFAULT_CONFIG = "bluegreen.toml"

DESCRIPTION = """\
Zero-downtime blue/green releases of one web app behind nginx.

The daemon runs two copies of your app on alternating ports (blue, green). `swap` starts
the new build on the idle port, waits until it is ready, points nginx at it (tested and
confirmed reload), waits until the old copy has no request in flight, then stops it.
"""

EPILOG = """\
examples:
  bluegreen daemon -c app.toml              run the daemon (foreground; Ctrl-C stops app and nginx)
  bluegreen swap -c app.toml releases/42    release a build (blocks until the old one is stopped)
  bluegreen status -c app.toml              what serves now, and the last swap's phases
  bluegreen rollback -c app.toml            swap back to the previous build
  bluegreen cancel -c app.toml              stop a swap that has not switched traffic yet
  bluegreen quit --keep-serving -c app.toml stop the daemon only; the next daemon adopts the app
  echo status | socat - UNIX-CONNECT:run/bluegreen.sock

The config is -c PATH, else $BLUEGREEN_CONFIG, else ./bluegreen.toml.
exit codes: 0 done, 1 failed (traffic where it was), 2 usage/config error, 3 daemon unreachable
or not answering, 4 failed after traffic moved to the new build (read the message)
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", help="config file (default: $BLUEGREEN_CONFIG or ./bluegreen.toml)")
    common.add_argument("--socket", metavar="PATH", help="control socket (default: daemon.socket from the config)")
    common.add_argument("--timeout", metavar="SECONDS", type=float, default=FIRST_REPLY,
                        help=f"how long the daemon has to send its first reply (default {FIRST_REPLY:g}); a swap "
                             "then streams its phases for as long as they take")

    parser = argparse.ArgumentParser(
        prog="bluegreen", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bluegreen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("daemon", parents=[common], help="run the daemon in the foreground",
                   description="Run the daemon: start the saved (or app.build) build and nginx, serve the "
                               "control socket. SIGTERM/SIGINT stop the app and the managed nginx cleanly.")
    p = sub.add_parser("swap", parents=[common], help="release BUILD with zero downtime",
                       description="Start BUILD on the standby slot, switch nginx to it once ready, drain and "
                                   "stop the old slot. Without BUILD, restart the current build.")
    p.add_argument("build", nargs="?", metavar="BUILD", help="build directory (relative to the current directory)")
    p.add_argument("--json", action="store_true", help="print the raw reply lines")
    p = sub.add_parser("rollback", parents=[common], help="swap back to the previous build")
    p.add_argument("--json", action="store_true", help="print the raw reply lines")
    sub.add_parser("cancel", parents=[common], help="stop a running swap before it switches traffic",
                   description="Cancel the running swap if it has not switched nginx yet: its standby is "
                               "stopped (whole process tree) and traffic stays where it is.")
    p = sub.add_parser("quit", parents=[common], help="stop the daemon (optionally leaving the app serving)",
                       description="Stop the daemon. By default it stops the app and the managed nginx, like "
                                   "SIGTERM. With --keep-serving they keep serving and the next `bluegreen daemon` "
                                   "adopts them without a restart (use it to upgrade or restart bluegreen itself).")
    p.add_argument("--keep-serving", action="store_true", help="leave the app and the managed nginx running")
    p = sub.add_parser("status", parents=[common], help="show the active slot, the standby, the last swap")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    sub.add_parser("check-config", parents=[common], help="validate the config and report every problem")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args)
        if args.command == "daemon":
            from .daemon import serve  # the daemon's imports are not needed by the client

            cfg = _config(args, machine=True, with_build=False)
            if args.socket:
                cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, socket=Path(args.socket).absolute()))
            return serve(cfg)
        sock = _socket_path(args)
        first = args.timeout
        if args.command == "status":
            return status(sock, args.json, first=first)
        if args.command == "swap":
            req: dict[str, Any] = {"cmd": "swap"}
            if args.build:
                req["build"] = os.path.abspath(args.build)
            return stream(sock, req, args.json, first=first)
        if args.command == "rollback":
            return stream(sock, {"cmd": "rollback"}, args.json, first=first)
        if args.command == "quit":
            final = list(request(sock, {"cmd": "quit", "keep": args.keep_serving}, first=first))[-1]
            if not final.get("ok"):
                return _print_error(final)
            print("the daemon is stopping" + ("; the app and nginx keep serving" if final["result"]["keep_serving"]
                                               else ", with the app and its managed nginx"))
            return EXIT_OK
        if args.command == "cancel":
            # The reply comes once the standby is stopped: up to app.stop.timeout.
            final = list(request(sock, {"cmd": "cancel"}, first=max(first, 600)))[-1]
            if not final.get("ok"):
                return _print_error(final)
            print(f"cancelled the swap to {final['result']['cancelled']} (phase {final['result']['phase']}); "
                  "traffic unchanged")
            return EXIT_OK
    except ConfigError as e:
        _err("config error:\n  " + "\n  ".join(e.problems))
        return EXIT_USAGE
    except Unreachable as e:
        _err(e.message)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        _err("interrupted: a swap already started goes on in the daemon; see `bluegreen status`, "
             "or stop it with `bluegreen cancel`")
        return EXIT_FAILED
    return EXIT_USAGE


def _err(text: str) -> None:
    print(f"bluegreen: {text}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("BLUEGREEN_CONFIG") or DEFAULT_CONFIG)


def _config(args: argparse.Namespace, **checks: bool) -> Config:
    path = _config_path(args)
    if not args.config and not os.environ.get("BLUEGREEN_CONFIG") and not path.exists():
        raise ConfigError(f"no config given and ./{DEFAULT_CONFIG} does not exist; pass -c PATH or --socket PATH")
    return load(path, **checks)


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    return _config(args).daemon.socket


def check_config(args: argparse.Namespace) -> int:
    cfg = _config(args, machine=True)
    print(f"{cfg.path}: ok")
    print(f"  app: {' '.join(cfg.app.command)}  ports blue={cfg.app.ports[0]} green={cfg.app.ports[1]}")
    print(f"  nginx: {cfg.nginx.mode}" + (f" on {cfg.nginx.listen}" if cfg.nginx.mode == "managed" else
                                          f", upstream file {cfg.nginx.upstream_file}"))
    print(f"  socket: {cfg.daemon.socket}  state: {cfg.daemon.state_dir}")
    return EXIT_OK


def request(sock_path: Path, req: dict[str, Any], first: float = FIRST_REPLY) -> Iterator[dict[str, Any]]:
    """Send one request; yield every reply line (progress events, then the final one).

    The daemon has `first` seconds to send its first line; after that, lines may take as long
    as the phase they report (a readiness wait, a drain).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(sock_path))
    except FileNotFoundError:
        s.close()
        raise Unreachable(f"no daemon socket at {sock_path}: is `bluegreen daemon` running with this config?") from None
    except (ConnectionRefusedError, socket.timeout):
        s.close()
        raise Unreachable(f"no daemon answers on {sock_path} (stale socket?): start `bluegreen daemon`") from None
    except PermissionError:
        s.close()
        raise Unreachable(f"permission denied on {sock_path}: run as the daemon's user") from None
    s.settimeout(first)
    with s, s.makefile("rb") as f:
        try:
            s.sendall(protocol.encode(req))
            for line in f:
                s.settimeout(None)
                msg = protocol.parse_reply(line)
                yield msg
                if "ok" in msg:
                    return
        except socket.timeout:
            raise Unreachable(f"the daemon on {sock_path} is not answering (no reply within {first:g}s): is it "
                              "hung or stopped? Check its log and `ps`; --timeout waits longer") from None
        except ConnectionError as e:
            raise Unreachable(f"the connection to the daemon broke ({e.strerror or e}); see its log") from None
    raise Unreachable("the daemon closed the connection without a final reply; see its log")


def status(sock: Path, as_json: bool, out: TextIO = sys.stdout, first: float = FIRST_REPLY) -> int:
    final = list(request(sock, {"cmd": "status"}, first=first))[-1]
    if not final.get("ok"):
        return _print_error(final)
    st = final["result"]
    if as_json:
        json.dump(st, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(format_status(st))
    return EXIT_OK


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = int(time.time() - t)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_status(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"daemon   pid {d['pid']} {d['status']}, up {_ago(d['since'])} (v{d['version']}, {d['config']})"]
    a = st.get("active")
    if a:
        health = "" if a.get("alive") else "  ** NOT RUNNING **"
        lines.append(f"active   {a['slot']} :{a['port']} pid {a['pid']} up {_ago(a['since'])}  {a['build']}{health}")
    else:
        lines.append("active   none")
    sb = st.get("standby")
    lines.append(f"standby  {sb['slot']} :{sb['port']} pid {sb['pid']}  {sb['build']}" if sb else "standby  none")
    n = st["nginx"]
    where = n.get("listen") or n.get("upstream_file")
    lines.append(f"nginx    {n['mode']} {where}, " + (f"master pid {n['master_pid']}" if n.get("running")
                                                        else f"NOT RUNNING: {n.get('error')}"))
    if st.get("swap"):
        s = st["swap"]
        lines.append(f"swap     {s['reason']} to {s['build']} in progress, phase {s['phase']}")
    last = st.get("last_swap")
    if last:
        phases = " ".join(f"{k} {v:.3f}s" for k, v in last["durations"].items())
        lines.append(f"last     {last['reason']} to {last['build']}: {last['outcome']} {_ago(last['finished_at'])} ago")
        lines.append(f"         {phases}")
        if last.get("error"):
            lines.append(f"         error {last['error']['code']}: {last['error']['message'].splitlines()[0]}")
    if d.get("failure"):
        lines.append(f"FAILED   {d['failure']}")
    if d.get("state_saved") is False:
        lines.append("state    NOT SAVED: state.json is stale (see the warning)")
    if d.get("warning"):
        lines.append(f"WARNING  {d['warning']}")
    for e in (st.get("events") or [])[-5:]:
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event"))
        lines.append(f"event    {_ago(e['at'])} ago {e['event']} {detail}")
    if st.get("previous_build"):
        lines.append(f"previous {st['previous_build']}  (bluegreen rollback)")
    return "\n".join(lines) + "\n"


def _describe(event: dict[str, Any]) -> str:
    name = event["event"]
    if name == "prepare":
        return f"{event['slot']} :{event['port']}"
    if name == "start":
        return f"pid {event['pid']}, log {event['log']}"
    if name == "ready":
        return f"{event['target']} ({event['checks']} checks)"
    if name == "switch":
        return (f"nginx -> :{event['port']} (test {event['test'] * 1000:.0f}ms, reload {event['reload'] * 1000:.0f}ms, "
                f"confirm {event['confirm'] * 1000:.0f}ms)")
    if name == "drain":
        cut = f", {event['connections_cut']} connection(s) cut at the timeout" if event["timed_out"] else ""
        return f"old workers gone after {event['workers_wait']:.3f}s{cut}"
    if name == "stop":
        return f"pid {event['pid']} {event['how']}"
    return ""


def stream(sock: Path, req: dict[str, Any], as_json: bool, out: TextIO = sys.stdout,
           first: float = FIRST_REPLY) -> int:
    final: dict[str, Any] = {}
    for msg in request(sock, req, first=first):
        if as_json:
            out.write(json.dumps(msg) + "\n")
        elif "event" in msg:
            if msg.get("status") == "begin":
                if msg["event"] in SLOW_PHASES:  # say what we wait for; the others take milliseconds
                    out.write(f"  {msg['event']:<8} {SLOW_PHASES[msg['event']]}\n")
            else:
                out.write(f"  {msg['event']:<8} {msg['duration']:7.3f}s  {_describe(msg)}\n")
        out.flush()
        final = msg
    if not final.get("ok"):
        code = _print_error(final, quiet=as_json)
        return code
    if not as_json:
        r = final["result"]
        a, sw = r["active"], r["swap"]
        total = (sw.get("finished_at") or 0) - sw["started_at"]
        out.write(f"done in {total:.2f}s: {a['slot']} :{a['port']} pid {a['pid']} serves {a['build']}\n")
        for w in sw.get("warnings") or []:
            out.write(f"warning: {w}\n")
    return EXIT_OK


TRAFFIC = {
    "unchanged": "traffic is unchanged: the old build serves",
    "restored": "traffic is back on the old build",
    "moved": "traffic moved: the new build serves",
}


def _print_error(final: dict[str, Any], quiet: bool = False) -> int:
    """Say what failed and where traffic is; the exit code follows where traffic is."""
    e = final.get("error") or {}
    if not quiet:
        phase = f" in phase {e['phase']}" if e.get("phase") else ""
        _err(f"failed{phase} [{e.get('code')}]: {e.get('message')}")
        if e.get("traffic") in TRAFFIC:
            _err(TRAFFIC[e["traffic"]])
    if e.get("code") in ("bad_request", "config"):
        return EXIT_USAGE
    return EXIT_MOVED if e.get("traffic") == "moved" else EXIT_FAILED
