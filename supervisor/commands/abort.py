"""abort: end a paused swap: its standby is stopped, the preview ends, traffic never moved."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon import Daemon

SPEC = CommandSpec(
    "abort", "end a paused swap: the preview ends and its standby is stopped; traffic never moved", order=12,
    description="End the swap paused by `swap BUILD --pause`: requests with the preview header or cookie go back "
                "to the active build, the standby is drained of them and stopped. Traffic never moved.",
)


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    app = daemon.app
    pause = app.release.decide("abort")
    assert app.swap_task is not None
    await asyncio.gather(app.swap_task, return_exceptions=True)
    return {"aborted": str(pause.standby.build), "standby": pause.standby.to_dict(),
            "active": app.active.to_dict() if app.active else None}


def run(sock: Path, args: argparse.Namespace) -> int:
    # The reply comes once the standby is drained and stopped: up to drain.timeout + app.stop.timeout.
    reply = client.final(sock, {"cmd": "abort"}, first=max(args.timeout, 600))
    if not reply.get("ok"):
        return client.print_error(reply)
    r = reply["result"]
    print(f"aborted the swap to {r['aborted']}: its standby (pid {r['standby']['pid']}) was stopped; traffic "
          f"never moved: {r['active']['build']} serves")
    return client.EXIT_OK
