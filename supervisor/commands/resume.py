"""resume: let the requests a `pause` held go on to the app."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "resume", "end a pause: the held requests go on to the app", order=47,
    description="End `bluegreen pause`: the requests nginx holds go on to the build that serves, in about their "
                "arrival order, and new ones are served as usual. Says how long the pause lasted and what it held.",
)


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    return await daemon.app.holding.resume()


def run(sock: Path, args: argparse.Namespace) -> int:
    reply = client.final(sock, {"cmd": "resume"}, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    r = reply["result"]
    print(f"resumed after {r['paused_for']:.1f} s: nginx held {r['held']} request(s) meanwhile, "
          f"{r['hold_timeouts']} timed out (503)" + (f", {r['turned_away']} turned away at once (503: hold.max_requests "
                                                   "were held)" if r.get("turned_away") else ""))
    return client.EXIT_OK
