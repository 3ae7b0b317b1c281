"""history: every swap, rollback, automatic revert and crash restart, with who asked for it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import client
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

SPEC = CommandSpec(
    "history", "every swap, rollback, revert and crash restart: when, who, from -> to, outcome, phases",
    {"n": (int, False)}, order=45,
    description="List the latest releases and restarts, oldest first: when it ended, who asked (the socket "
                "peer's user, or bluegreen itself for a crash restart), from which build to which, how it ended "
                "(done, failed: traffic never moved, reverted: traffic came back to the old build, failed_moved) "
                "and how long each phase took. Kept in daemon.state_dir/history.jsonl, rotated like the logs.",
)
MAX = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=_count, default=20, metavar="N", help=f"how many (default 20, at most {MAX})")
    p.add_argument("--json", action="store_true", help="one JSON object per line, as stored")


def _count(v: str) -> int:
    if not v.isdigit() or int(v) > MAX:
        raise argparse.ArgumentTypeError(f"expected a number of entries from 0 to {MAX}, got {v!r}")
    return int(v)


async def handle(daemon: Daemon, reply: Any, n: int = 20) -> dict[str, Any]:
    entries, skipped = daemon.history.last(max(0, min(n, MAX)))
    return {"entries": entries, "skipped": skipped}


def run(sock: Path, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    reply = client.final(sock, {"cmd": "history", "n": args.n}, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    entries = reply["result"]["entries"]
    if args.json:
        for e in entries:
            out.write(json.dumps(e) + "\n")
    else:
        out.write(format_history(entries))
    if reply["result"].get("skipped"):
        print(f"bluegreen: {reply['result']['skipped']} damaged line(s) of history.jsonl skipped (not a history "
              "entry: cut by a crash, or edited)", file=sys.stderr)
    return client.EXIT_OK


def format_history(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no swap yet\n"
    lines = [f"{'ENDED':<19}  {'WHAT':<8}  {'WHO':<12}  {'FROM -> TO':<30}  {'OUTCOME':<12}  TOOK"]
    for e in entries:
        by = e.get("by") or {}
        who = clean(by.get("user", "?")) if "uid" in by else f"({clean(by.get('why', 'bluegreen'))})"
        moved = f"{clean(Path(e['from']).name) if e.get('from') else '-'} -> {clean(Path(e['to']).name)}"
        took = f"{e['at'] - e['started_at']:.2f}s"
        lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['at'])):<19}  {clean(e['reason']):<8}  "
                     f"{who:<12}  {moved:<30}  {clean(e['outcome']):<12}  {took}")
        phases = " ".join(f"{clean(k)} {v:.3f}" for k, v in e.get("durations", {}).items())
        if phases:  # (none for a swap the next daemon finished)
            lines.append(f"{'':<21}{phases}")
        decided = e.get("decided")
        if decided:
            who = clean((decided.get("by") or {}).get("user", "?"))
            done = {"promote": "promoted", "abort": "aborted"}.get(decided["what"], clean(decided["what"]))
            lines.append(f"{'':<21}{done} by {who} at "
                         f"{time.strftime('%H:%M:%S', time.localtime(decided['at']))}")
        held = e.get("held")
        if isinstance(held, dict):
            try:
                lines.append(f"{'':<21}{clean(client.hold_line(held))}")
            except (KeyError, TypeError, ValueError):
                pass  # an edited line: the rest of the entry still shows
        if e.get("error"):
            lines.append(f"{'':<21}{clean(e['error'].get('code') or '?')}: {clean(e['error']['message'])}")
    return "\n".join(lines) + "\n"


def clean(text: Any, limit: int = 200) -> str:
    """A stored string as the terminal may show it: no control characters (an edited file could
    hold escape sequences), at most `limit` characters."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + "…"
