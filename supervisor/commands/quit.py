"""quit: stop the daemon; with keep, the app and managed nginx keep serving for the next daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "quit", "stop the daemon; with --keep-serving the app and managed nginx keep serving for the next daemon",
    {"keep": (bool, False)}, order=50,
    description="Stop the daemon. By default it stops the app and the managed nginx, like SIGTERM. With "
                "--keep-serving they keep serving and the next `bluegreen daemon` adopts them without a restart "
                "(use it to upgrade or restart bluegreen itself).",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-serving", action="store_true", help="leave the app and the managed nginx running")


async def handle(daemon: Daemon, reply: Any, keep: bool = False) -> dict[str, Any]:
    daemon.quit(keep)
    return {"stopping": True, "keep_serving": daemon.app.keep_serving, "managed": daemon.app.managed is not None}


def run(sock: Path, args: argparse.Namespace) -> int:
    reply = client.final(sock, {"cmd": "quit", "keep": args.keep_serving}, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    result = reply["result"]
    managed = result.get("managed", True)
    if result["keep_serving"]:
        print("the daemon is stopping; the app" + (" and its managed nginx keep" if managed else " keeps") + " serving")
    else:
        print("the daemon is stopping, with the app" + (" and its managed nginx" if managed else
                                                         " (your nginx is yours: it keeps running)"))
    return client.EXIT_OK
