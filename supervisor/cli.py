"""The `bluegreen` command: run the daemon, check a config, or send a control verb over the
socket. The verbs' arguments and output live with each verb (supervisor/commands/); exit
codes are in client.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, commands
from .client import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, FIRST_REPLY, EXIT_FAILED, err as _err
from .errors import BluegreenError, ConfigError, LogsError, Unreachable
from .paths import LOG_NAMES, control_socket

if TYPE_CHECKING:
    from .config.schema import Config

DEFAULT_CONFIG = "bluegreen.toml"

DESCRIPTION = """\
Zero-downtime blue/green releases of one web app behind nginx.

The daemon runs two copies of your app on alternating ports (blue, green). `swap` starts
the new build on the idle port, waits until it is ready, points nginx at it (a routing
table changed and read back, no reload; or a tested and confirmed reload: nginx.switch),
waits until the old copy has no request in flight, then stops it.
"""

EPILOG = """\
examples:
  bluegreen daemon -c app.toml              run the daemon (foreground; Ctrl-C stops app and nginx)
  bluegreen swap -c app.toml releases/42    release a build (blocks until the old one is stopped)
  bluegreen status -c app.toml              what serves now, and the last swap's phases
  bluegreen rollback -c app.toml            swap back to the previous build
  bluegreen cancel -c app.toml              stop a swap that has not switched traffic yet
  bluegreen logs -f -c app.toml             follow the serving app's output (also: blue, green, nginx, daemon)
  bluegreen quit --keep-serving -c app.toml stop the daemon only; the next daemon adopts the app
  echo status | socat - UNIX-CONNECT:run/bluegreen.sock

The config is -c PATH, else $BLUEGREEN_CONFIG, else ./bluegreen.toml.
exit codes: 0 done, 1 failed (traffic where it was), 2 usage/config error, 3 daemon unreachable
or not answering, 4 failed after traffic moved to the new build (read the message)
"""


class _Version(argparse.Action):
    """argparse's own version action formats its text (loading shutil and three codecs for it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"bluegreen {__version__}")
        parser.exit()


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the terminal's width: left to find it, it loads shutil (and its
    archive codecs) at every add_argument, a tenth of the CLI's start."""

    def __init__(self, prog: str, **kw: int) -> None:
        try:
            columns = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.stdout.fileno()).columns)
        except (OSError, ValueError):
            columns = 80
        super().__init__(prog, width=kw.pop("width", columns - 2), **kw)


class _RawFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """The same, keeping the description's and the examples' own line breaks (the top-level help)."""


BUILT_IN = ("daemon", "check-config", "logs")  # subcommands that are no control verb


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with `only` (a verb or a built-in), that subcommand alone: `bluegreen
    status` need not load and describe every other verb (a third of its start)."""
    common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    common.add_argument("-c", "--config", metavar="PATH", help="config file (default: $BLUEGREEN_CONFIG or ./bluegreen.toml)")
    common.add_argument("--socket", metavar="PATH", help="control socket (default: daemon.socket from the config)")
    common.add_argument("--timeout", metavar="SECONDS", type=float, default=FIRST_REPLY,
                        help=f"how long the daemon has to send its first reply (default {FIRST_REPLY:g}); a swap "
                             "then streams its phases for as long as they take")

    parser = argparse.ArgumentParser(
        prog="bluegreen", description=DESCRIPTION, epilog=EPILOG, formatter_class=_RawFormatter
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    # prog given: argparse would otherwise build a help formatter now, and load shutil and its codecs
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog="bluegreen")

    def wanted(name: str) -> bool:
        return only is None or only == name

    if wanted("daemon"):
        sub.add_parser("daemon", parents=[common], formatter_class=_Formatter, help="run the daemon in the foreground",
                       description="Run the daemon: start the saved (or app.build) build and nginx, serve the "
                                   "control socket. SIGTERM/SIGINT stop the app and the managed nginx cleanly.")
    verbs = commands.load() if only is None else {only: commands.one(only)} if only in commands.names() else {}
    for name, verb in verbs.items():
        p = sub.add_parser(name, parents=[common], formatter_class=_Formatter, help=verb.SPEC.help,
                           description=verb.SPEC.description or None)
        if hasattr(verb, "add_arguments"):
            verb.add_arguments(p)
    if wanted("check-config"):
        sub.add_parser("check-config", parents=[common], formatter_class=_Formatter,
                       help="validate the config and report every problem")
    if wanted("logs"):
        _logs_arguments(sub.add_parser("logs", parents=[common], formatter_class=_Formatter, description=LOGS,
                                       help="show (and follow) the app's, nginx's or the daemon's log"))
    return parser


LOGS = """Show the last lines of a log, read straight from daemon.state_dir (so it works with the daemon \
stopped too), across its latest rotation. active: the slot that serves now; blue, green: a slot's app \
output (every start begins with a '--- bluegreen' line); nginx: the managed nginx's error and access \
logs; daemon: the daemon's own log."""


def _logs_arguments(lg: argparse.ArgumentParser) -> None:
    lg.add_argument("which", nargs="?", default="active", choices=LOG_NAMES, help="which log (default: active)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    lg.add_argument("-n", "--lines", type=_lines, default=20, metavar="N", help="lines to show first (default 20)")


WITH_VALUE = ("-c", "--config", "--socket", "--timeout")  # the common options that take a value


def verb_first(words: list[str]) -> list[str]:
    """`bluegreen -c app.toml status` as `bluegreen status -c app.toml`: the common options are
    the subcommands', and people type them first too."""
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] not in ("-h", "--help", "--version", "--"):
        i += 2 if words[i] in WITH_VALUE else 1
    if 0 < i < len(words) and (words[i] in BUILT_IN or words[i] in commands.names()):
        return [words[i], *words[:i], *words[i + 1:]]
    return words


def main(argv: list[str] | None = None) -> int:
    words = verb_first(sys.argv[1:] if argv is None else argv)
    only = words[0] if words and (words[0] in BUILT_IN or words[0] in commands.names()) else None
    args = build_parser(only).parse_args(words)
    try:
        if args.command == "check-config":
            return check_config(args)
        if args.command == "logs":
            return show_logs(args)
        if args.command == "daemon":
            import dataclasses

            from .daemon.process import serve  # the daemon's imports are not needed by the client

            cfg = _config(args, machine=True, with_build=False)
            if args.socket:
                cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, socket=Path(args.socket).absolute()))
            return serve(cfg)
        verb = commands.one(args.command)
        code: int = verb.run(_socket_path(args), args)
        return code
    except ConfigError as e:
        _err("config error:\n  " + "\n  ".join(e.problems))
        return EXIT_USAGE
    except LogsError as e:
        _err(e.message)
        return EXIT_FAILED
    except Unreachable as e:
        _err(e.message)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        _err("interrupted: a swap already started goes on in the daemon; see `bluegreen status`, "
             "or stop it with `bluegreen cancel`")
        return EXIT_FAILED
    except BrokenPipeError:  # `bluegreen swap ... | head`: the reader left; what the daemon does goes on
        try:
            sys.stdout = open(os.devnull, "w")  # nothing more to say to a closed pipe, not even at exit
        except OSError:
            pass
        return EXIT_FAILED
    except BluegreenError as e:  # e.g. a damaged state.json read by `logs active`: named, with what to do
        _err(f"[{e.code}] {e.message}")
        return EXIT_FAILED
    except PermissionError as e:  # a file of the daemon's (config, state, logs) this user may not read
        _err(f"permission denied: {e.filename or e}; run this as the daemon's user (or root), or ask for read "
             "access to that file")
        return EXIT_FAILED
    except OSError as e:  # the last resort: one line, naming what failed, never a traceback
        _err(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
        return EXIT_FAILED


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("BLUEGREEN_CONFIG") or DEFAULT_CONFIG)


def _config(args: argparse.Namespace, **checks: bool) -> Config:
    """The whole config, checked (the daemon, check-config, logs); the verbs need only the socket."""
    from .config.schema import load

    path = _config_path(args)
    if not args.config and not os.environ.get("BLUEGREEN_CONFIG") and not path.exists():
        raise ConfigError(f"no config given and ./{DEFAULT_CONFIG} does not exist; pass -c PATH or --socket PATH")
    return load(path, **checks)


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = _config_path(args)
    return (path.exists() and control_socket(path)) or _config(args).daemon.socket


def _lines(v: str) -> int:
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of lines, 0 or more, got {v!r}")
    return int(v)


def show_logs(args: argparse.Namespace) -> int:
    from .processes.logs import show, sources

    found = sources(_config(args), args.which)
    try:
        show(found, args.lines, args.follow, sys.stdout)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `bluegreen logs | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def check_config(args: argparse.Namespace) -> int:
    cfg = _config(args, machine=True)
    print(f"{cfg.path}: ok")
    print(f"  app: {' '.join(cfg.app.command)}  ports blue={cfg.app.ports[0]} green={cfg.app.ports[1]}")
    print(f"  nginx: {cfg.nginx.mode}" + (f" on {cfg.nginx.listen}" if cfg.nginx.mode == "managed" else
                                          f", upstream file {cfg.nginx.upstream_file}"))
    print(f"  socket: {cfg.daemon.socket}  state: {cfg.daemon.state_dir}")
    from .config.schema import machine_warnings  # (loaded by _config already)

    for warning in machine_warnings(cfg):
        print(f"  warning: {warning}")
    return EXIT_OK
