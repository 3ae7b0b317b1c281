"""swap [BUILD]: release BUILD (or restart the current build) with zero downtime."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..errors import NotReadyYet, RequestError
from ..protocol import shares
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "swap",
    "start BUILD (default: the current build) on the standby slot, switch nginx to it, drain and stop the old one",
    {"build": (str, False), "pause": (bool, False), "rollout": (list, False), "step_seconds": (float, False)},
    ("build",), order=10,
    description="Start BUILD on the standby slot, switch nginx to it once ready, drain and stop the old slot. "
                "Without BUILD, restart the current build. A BUILD that is a symlink (current -> releases/42) "
                "is resolved now. With --pause, stop before the switch: requests carrying the preview header or "
                "cookie reach the new build, everyone else stays on the old one, until `bluegreen promote` or "
                "`bluegreen abort` (or release.pause_timeout). With --rollout 5,25,50,100, give that share of users "
                "the new build step by step, each for --step seconds, watching its errors and latency against the "
                "old build's; a step that fails sends everyone back at once (runtime switch only).",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", nargs="?", metavar="BUILD", help="build directory (relative to the current directory)")
    p.add_argument("--pause", action="store_true",
                   help="stop before the switch, with a preview for requests that carry the preview header or "
                        "cookie; exit once paused (then: bluegreen promote | bluegreen abort)")
    p.add_argument("--rollout", metavar="SHARES", type=_shares,
                   help="percentages of users given the new build step by step, like 5,25,50,100 (default: "
                        "rollout.steps); each step is watched, a bad one sends everyone back")
    p.add_argument("--step", metavar="SECONDS", type=float, help="seconds per rollout step (default: "
                   "rollout.step_seconds)")
    p.add_argument("--json", action="store_true", help="print the raw reply lines")


def _shares(text: str) -> list[int]:
    try:
        return list(shares([int(x) for x in text.split(",") if x.strip()]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "share" in str(e) else "expected percentages like 5,25,50,100")


async def handle(daemon: Daemon, reply: Any, build: str | None = None, pause: bool = False,
                 rollout: list[Any] | None = None, step_seconds: float | None = None) -> dict[str, Any]:
    from .. import builds  # the daemon's side (zipfile and its codecs are not the CLI's)

    app = daemon.app
    if build is None:
        if app.active is None:
            raise NotReadyYet("the daemon has not started the app yet; try again when status shows it serving")
        target = app.active.build  # a restart: what was released, not what a link names now
    else:
        target = Path(build)
    try:
        steps = shares(rollout) if rollout is not None else ()
    except ValueError as e:
        raise RequestError(f"swap: rollout: {e}") from None
    if step_seconds is not None and step_seconds <= 0:
        raise RequestError("swap: step_seconds must be greater than 0")
    if (pause or steps) and app.config.app.protocol == "tcp":
        raise RequestError("swap: a TCP service (app.protocol = \"tcp\") has no preview and no rollout: nginx's "
                           "stream module sees no header or cookie to choose a connection's build by")
    if steps and build is None:
        raise RequestError("swap: a rollout needs a BUILD (a restart of the same build has nothing to watch)")
    return await app.run_swap(builds.check_build(target), reply, reason="swap" if build else "restart", pause=pause,
                              rollout=steps, step_seconds=step_seconds)


def run(sock: Path, args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "swap"}
    if args.build:
        req["build"] = os.path.abspath(args.build)
    if args.pause:
        req["pause"] = True
    if args.rollout:
        req["rollout"] = args.rollout
    if args.step is not None:
        req["step_seconds"] = args.step
    return client.stream(sock, req, args.json, first=args.timeout)
