"""status: what serves, the standby, nginx, the running and the last swap, recent events."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import __version__, client
from ..client import ago as _ago
from ..errors import BluegreenError
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon import Daemon

SPEC = CommandSpec("status", "active and standby slots, the running swap, the last swap's phases", order=40,
                   description="Show what serves (slot, port, pid, build, uptime), the standby during a swap, "
                               "nginx's master, the running swap's phase (paused: for how long, and how to "
                               "preview), the warm old build, the last swap with per-phase durations, and what is "
                               "wrong right now.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the status as JSON")


async def handle(daemon: Daemon, reply: Any) -> dict[str, Any]:
    app = daemon.app
    n: dict[str, Any] = {"mode": app.config.nginx.mode, "switch": app.proxy.mode, "switch_why": app.switch_why}
    try:
        n["master_pid"] = app.master.master_pid()
        n["running"] = True
    except BluegreenError as e:
        n["running"] = False
        n["error"] = app.nginx_down or e.message
    if app.managed is not None:
        n["listen"] = app.config.nginx.listen
        n["prefix"] = str(app.managed.prefix)
    else:
        n["upstream_file"] = str(app.master.upstream_path)
    state, warm = app.ledger.state, app.release.warm
    return {
        "daemon": {"pid": os.getpid(), "version": __version__, "status": str(app.status),
                   "since": daemon.started_at, "config": str(app.config.path), "state_dir": str(app.state_dir),
                   "failure": app.failure, "restarts": app.restarts, "warning": app.warning,
                   "state_saved": not app.ledger.unsaved},
        "events": state.events[-10:],
        "active": app.active.to_dict() if app.active else None,
        "standby": app.standby.to_dict() if app.standby else None,
        "previous_build": state.previous_build,
        "swap": app.swap.to_dict() if app.swap is not None and app.swapping() else None,
        "paused": app.release.pause_info(),
        "rollout": app.release.rolling.info() if app.release.rolling else None,
        "warm": {**warm.app.to_dict(), "until": warm.until} if warm and warm.usable() else None,
        "last_swap": state.last_swap,
        "history": state.history[-10:],
        "nginx": n,
    }


def run(sock: Path, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    reply = client.final(sock, {"cmd": "status"}, first=args.timeout)
    if not reply.get("ok"):
        return client.print_error(reply)
    if args.json:
        json.dump(reply["result"], out, indent=2)
        out.write("\n")
    else:
        out.write(format_status(reply["result"]))
    return client.EXIT_OK


def format_status(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"daemon   pid {d['pid']} {d['status']}, up {_ago(d['since'])} (v{d['version']}, {d['config']})"]
    a = st.get("active")
    if a:
        health = "" if a.get("alive") else "  ** NOT RUNNING **"
        lines.append(f"active   {a['slot']} :{a['port']} pid {a['pid']} up {_ago(a['since'])}  {a['build']}{health}")
    else:
        lines.append("active   none")
    sb = st.get("standby")
    lines.append(f"standby  {sb['slot']} :{sb['port']} pid {sb['pid']}  {sb['build']}" if sb else "standby  none")
    n = st["nginx"]
    where = n.get("listen") or n.get("upstream_file")
    lines.append(f"nginx    {n['mode']} {where}, " + (f"master pid {n['master_pid']}" if n.get("running")
                                                        else f"NOT RUNNING: {n.get('error')}"))
    lines.append(f"switch   {n.get('switch')}: {n.get('switch_why')}")
    if st.get("swap"):
        s = st["swap"]
        lines.append(f"swap     {s['reason']} to {s['build']} in progress, phase {s['phase']}")
    p = st.get("paused")
    if p:
        lines.append(f"paused   for {_ago(p['since'])}: preview requests ({p['header']}, or cookie {p['cookie']}) go "
                     f"to :{p['standby']['port']}; bluegreen promote | abort (aborted on its own at "
                     f"{client.clock(p['until'])})")
    ro = st.get("rollout")
    if ro:
        lines.append(f"rollout  step {ro['step']} of {ro['steps']}: {ro['share']} % of users on :{ro['port']}; "
                     f"{ro['verdict'] or 'no verdict yet'} (bluegreen promote | abort)")
    w = st.get("warm")
    if w:
        lines.append(f"warm     {w['slot']} :{w['port']} pid {w['pid']} {w['build']} until {client.clock(w['until'])} "
                     "(bluegreen rollback: one routing change)")
    last = st.get("last_swap")
    if last:
        phases = " ".join(f"{k} {v:.3f}s" for k, v in last["durations"].items())
        lines.append(f"last     {last['reason']} to {last['build']}: {last['outcome']} {_ago(last['finished_at'])} ago")
        lines.append(f"         {phases}")
        if last.get("error"):
            lines.append(f"         error {last['error']['code']}: {last['error']['message'].splitlines()[0]}")
    if d.get("failure"):
        lines.append(f"FAILED   {d['failure']}")
    if d.get("state_saved") is False:
        lines.append("state    NOT SAVED: state.json is stale (see the warning)")
    if d.get("warning"):
        lines.append(f"WARNING  {d['warning']}")
    for e in (st.get("events") or [])[-5:]:
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event"))
        lines.append(f"event    {_ago(e['at'])} ago {e['event']} {detail}")
    if st.get("previous_build"):
        lines.append(f"previous {st['previous_build']}  (bluegreen rollback)")
    return "\n".join(lines) + "\n"
