"""help: the commands this daemon understands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec
from . import specs

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec("help", "list the commands", order=60,
                   description="List the commands the running daemon understands on its socket.")


async def handle(daemon: Daemon, reply: Any) -> dict[str, str]:
    return {name: spec.help for name, spec in specs().items()}


def run(sock: Path, args: argparse.Namespace) -> int:
    reply = client.final(sock, {"cmd": "help"}, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    for name, text in reply["result"].items():
        print(f"  {name:<10} {text}")
    return client.EXIT_OK
