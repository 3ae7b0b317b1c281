"""swap [BUILD]: release BUILD (or restart the current build) with zero downtime."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..app import check_build
from ..errors import NotReadyYet
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon import Daemon

SPEC = CommandSpec(
    "swap",
    "start BUILD (default: the current build) on the standby slot, switch nginx to it, drain and stop the old one",
    {"build": (str, False), "pause": (bool, False)}, ("build",), order=10,
    description="Start BUILD on the standby slot, switch nginx to it once ready, drain and stop the old slot. "
                "Without BUILD, restart the current build. A BUILD that is a symlink (current -> releases/42) "
                "is resolved now. With --pause, stop before the switch: requests carrying the preview header or "
                "cookie reach the new build, everyone else stays on the old one, until `bluegreen promote` or "
                "`bluegreen abort` (or release.pause_timeout).",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", nargs="?", metavar="BUILD", help="build directory (relative to the current directory)")
    p.add_argument("--pause", action="store_true",
                   help="stop before the switch, with a preview for requests that carry the preview header or "
                        "cookie; exit once paused (then: bluegreen promote | bluegreen abort)")
    p.add_argument("--json", action="store_true", help="print the raw reply lines")


async def handle(daemon: Daemon, reply: Any, build: str | None = None, pause: bool = False) -> dict[str, Any]:
    app = daemon.app
    if build is None:
        if app.active is None:
            raise NotReadyYet("the daemon has not started the app yet; try again when status shows it serving")
        target = app.active.build  # a restart: what was released, not what a link names now
    else:
        target = Path(build)
    return await app.run_swap(check_build(target), reply, reason="swap" if build else "restart", pause=pause)


def run(sock: Path, args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "swap"}
    if args.build:
        req["build"] = os.path.abspath(args.build)
    if args.pause:
        req["pause"] = True
    return client.stream(sock, req, args.json, first=args.timeout)
