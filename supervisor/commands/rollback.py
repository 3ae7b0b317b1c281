"""rollback: swap back to the build that served before the last release."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..errors import BluegreenError
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "rollback", "swap back to the build that served before the last release", order=20,
    description="Swap back to the build that served before the last release (a swap BUILD or a rollback). "
                "Restarts and crash recoveries never change it. Within release.keep_warm seconds of the last release "
                "the old build still runs: the rollback is then one routing change, with no start and no readiness "
                "wait.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw reply lines")


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    from .. import builds  # the daemon's side (zipfile and its codecs are not the CLI's)

    previous = daemon.app.keeper.state.previous_build
    if not previous:
        raise BluegreenError("there is no previous build to roll back to (no swap has completed yet)",
                             code="no_previous")
    return await daemon.app.run_swap(builds.check_build(Path(previous)), reply, reason="rollback")


def run(sock: Path, args: argparse.Namespace) -> int:
    return client.stream(sock, {"cmd": "rollback"}, args.json, first=args.timeout)
