"""cancel: stop a running swap before it switches traffic (its standby is stopped)."""

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
    "cancel", "stop a running swap before it switches traffic (its standby is stopped)", order=30,
    description="Cancel the running swap if it has not switched nginx yet: its standby is stopped (whole process "
                "tree) and traffic stays where it is.",
)


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    import logging

    from ..release.phases import Phase  # the daemon's side: not imported by the CLI

    app = daemon.app
    task, record = app.swap_task, app.swap
    if task is None or task.done() or record is None:
        raise BluegreenError("no swap is running", code="no_swap")
    if record.phase is not None and not Phase(record.phase).cancellable:
        raise BluegreenError(
            f"the swap is past the switch (phase: {record.phase}): the new build serves; "
            "let it finish draining, then `bluegreen rollback` if needed",
            code="too_late", phase=record.phase,
        )
    logging.getLogger("bluegreen").info("cancelling the %s to %s in phase %s", record.reason, record.build, record.phase)
    task.cancel()
    import asyncio  # the daemon's side (the CLI does not load asyncio)

    await asyncio.gather(task, return_exceptions=True)
    return {"cancelled": record.build, "phase": record.error.get("phase") if record.error else None,
            "active": app.active.to_dict() if app.active else None}


def run(sock: Path, args: argparse.Namespace) -> int:
    # The reply comes once the standby is stopped: up to app.stop.timeout.
    reply = client.final(sock, {"cmd": "cancel"}, first=max(args.timeout, 600))
    if not reply.get("ok"):
        return client.print_error(reply)
    print(f"cancelled the swap to {reply['result']['cancelled']} (phase {reply['result']['phase']}); traffic unchanged")
    return client.EXIT_OK
