"""status: what serves, the standby, nginx, the running and the last swap, recent events."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import __version__, client
from ..client import ago as _ago
from ..errors import BluegreenError
from ..protocol import CommandSpec

if TYPE_CHECKING:
    from ..daemon.process import Daemon

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
    hold = None
    try:
        counts = await app.proxy.hold() if n["running"] else None
    except BluegreenError:
        counts = None
    if counts is not None:  # nginx's own counters: what it holds now, and since its master started
        hold = {"holding": counts.holding, "held": counts.held, "hold_timeouts": counts.timed_out,
                "turned_away": counts.full,
                "lost": counts.lost, "down": counts.down or None, "nginx_paused": counts.paused > 0,
                "paused": ({"since": app.holding.paused[0], "hold": app.holding.paused[1]}
                           if app.holding.paused else None)}
    state, warm = app.keeper.state, app.release.warm
    return {
        "daemon": {"pid": os.getpid(), "version": __version__, "status": str(app.status),
                   "since": daemon.started_at, "config": str(app.config.path), "state_dir": str(app.state_dir),
                   "failure": app.failure, "restarts": app.restarts, "warning": app.warning,
                   "state_saved": not app.keeper.unsaved, "state_error": app.keeper.error},
        "events": state.events[-10:],
        "active": _with_rss(app.active.to_dict()) if app.active else None,
        "standby": _with_rss(app.standby.to_dict()) if app.standby else None,
        # a committed swap's old build, still running (drain, watch, after_switch, stop): the way back
        "retiring": _with_rss(app.retiring.to_dict()) if app.retiring and app.retiring.alive() else None,
        "previous_build": state.previous_build,
        "swap": app.swap.to_dict() if app.swap is not None and app.swapping() else None,
        "paused": app.release.pause_info(),
        "rollout": app.release.rollouts.rolling.info() if app.release.rollouts.rolling else None,
        "warm": {**_with_rss(warm.app.to_dict()), "until": warm.until} if warm and warm.usable() else None,
        "spare": _spare(app.spare.info()),
        "last_swap": state.last_swap,
        "history": state.history[-10:],
        "nginx": n,
        "hold": hold,
    }


def _spare(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spare's state (ready, starting, waiting, given up) and, if one runs, its process."""
    if info is None or "process" not in info:
        return info
    proc = info.pop("process")
    return {**_with_rss(proc.to_dict()), **info}


MEASURED_FOR = 1.0  # seconds an app's memory is reused by the next status
_rss: dict[int, tuple[float, int | None]] = {}  # pid -> (when, its tree's memory)


def _with_rss(p: dict[str, Any]) -> dict[str, Any]:
    """The resident memory of the app's whole tree (a start script's server included), and the
    long-lived connections (WebSockets, listed paths, TCP) open to it, by kind. Finding the tree
    reads every process on the host: measured once per MEASURED_FOR, so that a burst of status
    commands (a monitoring loop) costs one scan; the connections are one netlink dump, each time."""
    import psutil  # the daemon's side: not imported by the CLI

    from ..processes import sockets

    p["long_lived"] = sockets.long_lived(p["port"])
    now = time.monotonic()
    when, rss = _rss.get(p["pid"], (0.0, None))
    if now - when >= MEASURED_FOR:
        try:
            root = psutil.Process(p["pid"])
            rss = sum(q.memory_info().rss for q in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = None
        for pid in [pid for pid, (t, _) in _rss.items() if now - t >= MEASURED_FOR]:
            del _rss[pid]  # processes gone or not asked about: forgotten
        _rss[p["pid"]] = (now, rss)
    p["rss"] = rss
    return p


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


def table(rows: list[list[str]]) -> list[str]:
    """A boxed table, like `pm2 ls`: the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def rule(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def row(r: list[str]) -> str:
        return "│" + "│".join(f" {c:<{w}} " for c, w in zip(r, widths)) + "│"

    return [rule("┌", "┬", "┐"), row(rows[0]), rule("├", "┼", "┤"), *map(row, rows[1:]), rule("└", "┴", "┘")]


def _process_row(role: str, p: dict[str, Any], state: str) -> list[str]:
    mem = f"{p['rss'] / 1048576:.1f} MB" if p.get("rss") else "-"
    return [role, p["slot"], str(p["port"]), str(p["pid"]), Path(p["build"]).name, _ago(p["since"]), mem,
            state if p.get("alive") else "DEAD"]


def _rows(st: dict[str, Any], where: str) -> list[list[str]]:
    """The processes' table: active, standby, the old build still running, warm, nginx."""
    rows = [["role", "slot", "port", "pid", "build", "uptime", "memory", "status"]]
    a, sb, w, n = st.get("active"), st.get("standby"), st.get("warm"), st["nginx"]
    if a:
        rows.append(_process_row("active", a, "serving"))
    if sb:
        ro = st.get("rollout")
        rows.append(_process_row("standby", sb, "paused" if st.get("paused") else
                                 f"rollout {ro['share']} %" if ro else "starting"))
    if st.get("retiring"):
        phase = (st.get("swap") or {}).get("phase")
        rows.append(_process_row("old", st["retiring"], "draining" if phase == "drain" else
                                 "no traffic; the way back" if phase in ("watch", "after_switch") else "stopping"))
    if w:
        rows.append(_process_row("warm", w, "no traffic"))
    sp = st.get("spare")
    if sp and sp.get("pid"):
        rows.append(_process_row("spare", sp, "ready, no traffic" if sp["state"] == "ready" else sp["state"]))
    rows.append(["nginx", n["mode"], where.rsplit(":", 1)[-1] if n.get("listen") else "-",
                 str(n.get("master_pid") or "-"), f"switch: {n.get('switch')}", "", "",
                 "running" if n.get("running") else "DOWN"])
    return rows


def _crash_lines(st: dict[str, Any]) -> list[str]:
    """What nginx holds (a pause, a crash's outage), and why no spare runs, if one is asked for."""
    lines, h, sp = [], st.get("hold"), st.get("spare")
    if h and h.get("paused"):
        lines.append(f"PAUSED   for {_ago(h['paused']['since'])}: nginx holds every new request ({h['holding']} now, each "
                     f"up to {h['paused']['hold']:g} s, then 503); bluegreen resume")
    elif h and (h["holding"] or h.get("down")):
        lines.append(f"holding  {h['holding']} request(s) in nginx until a build answers"
                     + (f" (port {h['down']} is down)" if h.get("down") else ""))
    if sp and not sp.get("pid"):
        lines.append(f"spare    none {'(GIVEN UP) ' if sp['state'] == 'given up' else ''}now: {sp.get('why')}")
    return lines


def format_status(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"bluegreen {d['status']}, daemon pid {d['pid']}, up {_ago(d['since'])} (v{d['version']}, {d['config']})"]
    a, w, n = st.get("active"), st.get("warm"), st["nginx"]
    where = n.get("listen") or n.get("upstream_file") or ""
    rows = _rows(st, where)
    lines += table(rows)
    if a:
        lines.append(f"active   {a['slot']} serves {a['build']}" + ("" if a.get("alive") else "  ** NOT RUNNING **"))
    else:
        lines.append("active   none")
    lines.append(f"nginx    {n['mode']} {where}, " + (f"master pid {n['master_pid']}" if n.get("running")
                                                        else f"NOT RUNNING: {n.get('error')}"))
    lines.append(f"switch   {n.get('switch')}: {n.get('switch_why')}")
    for role in ("active", "standby", "retiring", "warm"):
        lived = (st.get(role) or {}).get("long_lived")
        if lived:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(lived.items()))
            lines.append(f"long     {st[role]['slot']} ({'old' if role == 'retiring' else role}) holds {counts}")
    if st.get("swap"):
        s = st["swap"]
        lines.append(f"swap     {s['reason']} to {s['build']} in progress, phase {s['phase']}")
    p = st.get("paused")
    if p:
        lines.append(f"paused   for {_ago(p['since'])}: preview requests ({p['header']}, or cookie {p['cookie']}) go "
                     f"to :{p['standby']['port']}; bluegreen promote | abort (aborted on its own at "
                     f"{client.clock(p['until'])})")
    lines += _crash_lines(st)
    ro = st.get("rollout")
    if ro:
        lines.append(f"rollout  step {ro['step']} of {ro['steps']}: {ro['share']} % of users on :{ro['port']}; "
                     f"{ro['verdict'] or 'no verdict yet'} (bluegreen promote | abort)")
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
        lines.append(f"state    NOT SAVED: {d.get('state_error') or 'state.json is stale (see the warning)'}")
    if d.get("warning"):
        lines.append(f"WARNING  {d['warning']}")
    for e in (st.get("events") or [])[-5:]:
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "event"))
        lines.append(f"event    {_ago(e['at'])} ago {e['event']} {detail}")
    if st.get("previous_build"):
        lines.append(f"previous {st['previous_build']}  (bluegreen rollback)")
    return "\n".join(lines) + "\n"
