"""promote: carry a paused swap on (switch, drain, stop), and wait for its end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "promote", "carry a paused swap or a rollout on: everyone to the new build, drain and stop the old one", order=11,
    description="Carry on the swap paused by `swap BUILD --pause` (the preview ends) or jump a rollout to everyone: "
                "traffic moves to the new build, the old one is drained and stopped (or kept warm). Prints the phases "
                "and exits like `swap` does.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw reply lines")


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    app = daemon.app
    app.release.decide("promote")
    app.listeners.append(reply)  # the rest of the swap's events come here
    try:
        return await app.swap_result()
    finally:
        if reply in app.listeners:
            app.listeners.remove(reply)


def run(sock: Path, args: argparse.Namespace) -> int:
    return client.stream(sock, {"cmd": "promote"}, args.json, first=args.timeout)
