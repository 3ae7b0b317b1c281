"""abort: end a paused swap or a rollout: everyone is on the old build, the new one is stopped."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "abort", "end a paused swap or a rollout: everyone on the old build, the new one drained and stopped", order=12,
    description="End the swap paused by `swap BUILD --pause` (the preview ends; traffic never moved) or the rollout "
                "started by `swap BUILD --rollout` (its share of users goes back to the old build). The new build is "
                "drained of what it still serves and stopped.",
)


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    app = daemon.app
    waiting, record = app.release.decide("abort"), app.swap
    assert app.swap_task is not None and record is not None
    import asyncio  # the daemon's side (the CLI does not load asyncio)

    await asyncio.gather(app.swap_task, return_exceptions=True)
    return {"aborted": str(waiting.standby.build), "standby": waiting.standby.to_dict(), "traffic": record.traffic,
            "active": app.active.to_dict() if app.active else None}


def run(sock: Path, args: argparse.Namespace) -> int:
    # The reply comes once the standby is drained and stopped: up to drain.timeout + app.stop.timeout.
    reply = client.final(sock, {"cmd": "abort"}, first=max(args.timeout, 600))
    if not reply.get("ok"):
        return client.print_error(reply)
    r = reply["result"]
    moved = "traffic never moved" if r["traffic"] == "unchanged" else "everyone is back on the old build"
    print(f"aborted the swap to {r['aborted']}: its standby (pid {r['standby']['pid']}) was stopped; {moved}: "
          f"{r['active']['build']} serves")
    return client.EXIT_OK
