"""pause: hold every new request inside nginx (a migration that needs no writes, a database
failover), until `resume`; a request held past the timeout gets 503 with Retry-After."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..errors import RequestError
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "pause", "hold every new request inside nginx until `resume` (each up to --hold seconds, then 503)",
    {"hold": (float, False)}, order=46,
    description="Hold every new request inside nginx: none reaches the app until `bluegreen resume`; each waits up "
                "to --hold seconds (default hold.timeout), then gets 503 with Retry-After. Requests already in the "
                "app finish. Runtime switch, HTTP app only. A daemon that stops (or is killed) while paused leaves "
                "nginx paused only until the next daemon starts, which resumes it: a pause nobody owns is an outage "
                "nobody watches.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hold", type=float, default=None, metavar="SECONDS",
                   help="the longest a request is held (default hold.timeout)")


async def handle(daemon: Daemon, reply: Any, hold: float | None = None) -> dict[str, Any]:
    from ..config.schema import MAX_HOLD

    if hold is not None and not 0 < hold <= MAX_HOLD:
        raise RequestError(f"pause: hold must be greater than 0 and at most {MAX_HOLD:g} seconds (nginx's "
                           "proxy_read_timeout, 60 s by default, ends a longer hold with 504)")
    return await daemon.app.holding.pause(hold)


def run(sock: Path, args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"cmd": "pause"}
    if args.hold is not None:
        request["hold"] = args.hold
    reply = client.final(sock, request, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    r = reply["result"]
    print(f"paused: nginx holds every new request (each up to {r['timeout']:g} s, then 503); "
          "`bluegreen resume` lets them go")
    return client.EXIT_OK
