"""The client side of the control socket, shared by every verb: send one request, read the
reply lines, print phases and errors, and turn the outcome into an exit code.

Exit codes: 0 done; 1 the operation failed and traffic is where it was (unchanged, or
switched back); 2 usage or config error; 3 the daemon cannot be reached (or does not answer);
4 the operation failed after traffic moved to the new build (the message says what serves).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from . import protocol
from .errors import Unreachable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_MOVED = 0, 1, 2, 3, 4
FIRST_REPLY = 10.0  # seconds a daemon has to answer at all: a hung one is told apart from a slow swap
SLOW_PHASES = {"ready": "waiting for the standby to be ready...", "rollout": "a growing share of users, watched...",
               "watch": "watching the new build (the old one still runs)...", "drain": "waiting for in-flight requests to finish...",
               "before_switch": "running hooks.before_switch...", "after_switch": "running hooks.after_switch..."}


def err(text: str) -> None:
    print(f"bluegreen: {text}", file=sys.stderr)


def request(sock_path: Path, req: dict[str, Any], first: float = FIRST_REPLY) -> Iterator[dict[str, Any]]:
    """Send one request; yield every reply line (progress events, then the final one).

    The daemon has `first` seconds to send its first line; after that, lines may take as long
    as the phase they report (a readiness wait, a drain).
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(sock_path))
    except FileNotFoundError:
        s.close()
        raise Unreachable(f"no daemon socket at {sock_path}: is `bluegreen daemon` running with this config?") from None
    except (ConnectionRefusedError, socket.timeout):
        s.close()
        raise Unreachable(f"no daemon answers on {sock_path} (stale socket?): start `bluegreen daemon`") from None
    except PermissionError:
        s.close()
        raise Unreachable(f"permission denied on {sock_path}: run as the daemon's user") from None
    s.settimeout(first)
    with s, s.makefile("rb") as f:
        try:
            s.sendall(protocol.encode(req))
            for line in f:
                s.settimeout(None)
                msg = protocol.parse_reply(line)
                yield msg
                if "ok" in msg:
                    return
        except socket.timeout:
            raise Unreachable(f"the daemon on {sock_path} is not answering (no reply within {first:g}s): is it "
                              "hung or stopped? Check its log and `ps`; --timeout waits longer") from None
        except ConnectionError as e:
            raise Unreachable(f"the connection to the daemon broke ({e.strerror or e}); see its log") from None
    raise Unreachable("the daemon closed the connection without a final reply; see its log")



def final(sock_path: Path, req: dict[str, Any], first: float = FIRST_REPLY) -> dict[str, Any]:
    """Send one request and return only its final reply line."""
    return list(request(sock_path, req, first=first))[-1]


def hold_line(h: dict[str, Any]) -> str:
    """`held 412 requests (the longest 0.42 s), 0 timed out; 3 lost`: a report() in words."""
    text = f"held {h['held']} request(s) (the longest {h['held_longest']:g} s), {h['hold_timeouts']} timed out"
    if h.get("turned_away"):
        text += f", {h['turned_away']} turned away at once (hold.max_requests were held)"
    if h.get("still_held"):
        text += f", {h['still_held']} still held"
    if h.get("lost"):
        text += f"; {h['lost']} lost (the app had them when it died)"
    if h.get("nginx_restarted"):
        text += "; nginx restarted meanwhile: what its old workers held or lost is not in these counts"
    return text


def drain_line(event: dict[str, Any]) -> str:
    """What the drain did to traffic: when nginx let go, what was left running, what was closed."""
    text = f"nginx let go of the old build after {event['workers_wait']:.3f}s"
    if event["timed_out"]:
        text += f", {event['still_open']} request(s) still running at drain.timeout"
    cut = event.get("long_lived_cut") or {}
    if cut:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(cut.items()))
        clean = event.get("long_lived_clean", 0)
        why = event.get("not_clean_why") or "cut"
        how = ("with their protocol's goodbye" if clean == sum(cut.values()) else
               f"{clean} with their protocol's goodbye, {sum(cut.values()) - clean} {why}" if clean else why)
        text += (f"; closed {sum(cut.values())} long-lived connection(s) at the grace ({kinds}), {how}: their "
                 "clients reconnect")
    if event.get("closed_between_calls"):
        text += (f"; closed {event['closed_between_calls']} TCP connection(s) between two calls: their clients' "
                 "next call goes to the new build")
    if event.get("calls_cut"):
        text += f"; {calls_cut(event)}"
    if event.get("calls_unknown") or event.get("closed_unconfirmed"):
        text += f"; {calls_unknown(event)}"
    if event.get("not_websockets"):
        text += (f"; {event['not_websockets']} request(s) that asked for a WebSocket were never switched to one by "
                 "nginx: drained as requests")
    if event.get("long_lived_ended"):
        text += f"; {event['long_lived_ended']} long-lived connection(s) ended by themselves"
    if event.get("long_lived_left"):
        text += f"; {event['long_lived_left']} long-lived connection(s) could not be closed ({event['cut_error']})"
    return text


def calls_cut(event: dict[str, Any]) -> str:
    """How many of a TCP service's calls the drain cut, and how (the swap's warning says the same)."""
    how = []
    if event.get("calls_cut_in_flight"):
        how.append(f"{event['calls_cut_in_flight']} in flight at drain.long_lived_grace (its connection never rested)")
    if event.get("calls_cut_arrived"):
        how.append(f"{event['calls_cut_arrived']} sent as its connection was being closed")
    return f"CUT {event['calls_cut']} call(s): " + ", ".join(how) + "; their clients got an error"


def drain_warnings(event: dict[str, Any]) -> list[str]:
    """What a TCP service's drain cost, said as the swap's warnings (and history's)."""
    return ([calls_cut(event)] if event.get("calls_cut") else []) + (
        [calls_unknown(event)] if event.get("calls_unknown") or event.get("closed_unconfirmed") else [])


def calls_unknown(event: dict[str, Any]) -> str:
    """A TCP service's connections whose close nothing proved harmless: up to one call each may be lost."""
    unknown, unconfirmed = event.get("calls_unknown", 0), event.get("closed_unconfirmed", 0)
    why = ([f"{unknown} closed at drain.long_lived_grace without proof that no call was in flight"] * bool(unknown)
           + [f"{unconfirmed} closed between two calls whose clients had not come back to them within a second (a "
              "client that calls on a closed connection without checking it first loses that call)"] * bool(unconfirmed))
    return f"up to {unknown + unconfirmed} call(s) may have been lost, not counted: " + "; ".join(why)


def ago(t: float | None) -> str:
    if not t:
        return "-"
    s = int(time.time() - t)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _describe(event: dict[str, Any]) -> str:
    name = event["event"]
    if name == "prepare":
        return f"{event['slot']} :{event['port']}"
    if name == "start":
        return f"pid {event['pid']}, log {event['log']}"
    if name == "ready":
        return f"{event['target']} ({event['checks']} checks)"
    if name == "check":
        lines = [f"{c['check']}: HTTP {c['status']} ({c['ms']:.0f}ms) ok" for c in event["checks"]]
        return "\n           ".join(lines)
    if name == "switch" and "set" in event:
        return f"nginx -> :{event['port']} (routing table set and read back in {event['set'] * 1000:.1f}ms, no reload)"
    if name == "switch" and "test" in event:
        return (f"nginx -> :{event['port']} (test {event['test'] * 1000:.0f}ms, reload {event['reload'] * 1000:.0f}ms, "
                f"confirm {event['confirm'] * 1000:.0f}ms)")
    if name == "drain":
        return event["skipped"] if "skipped" in event else drain_line(event)
    if name == "stop":
        return f"pid {event['pid']} {event['how']}"
    if name == "watch":
        return f"the new build held for {event['seconds']:.1f}s ({event['verdict']})"
    if name == "rollout":
        at = event.get("promoted_at")
        return f"promoted at {at} % of users" if at is not None else f"{len(event['steps'])} step(s) passed"
    if name == "paused":
        return f"promoted after {event['paused_for']:.1f}s of preview"
    if name in ("before_switch", "after_switch"):
        return f"hooks.{name} exited 0"
    return ""


def stream(sock: Path, req: dict[str, Any], as_json: bool, out: TextIO = sys.stdout,
           first: float = FIRST_REPLY) -> int:
    final: dict[str, Any] = {}
    for msg in request(sock, req, first=first):
        if as_json:
            out.write(json.dumps(msg) + "\n")
        elif "event" in msg:
            if msg.get("status") == "output":  # a hook's output line
                out.write(f"  {msg['event']:<8} | {msg['line']}\n")
            elif msg.get("status") == "step":  # a rollout step passed
                out.write(f"  rollout  step {msg['step']}: {msg['share']} % of users for {msg['seconds']:.1f}s: pass "
                          f"({msg['verdict']})\n")
            elif msg.get("status") == "begin":
                if msg["event"] in SLOW_PHASES:  # say what we wait for; the others take milliseconds
                    out.write(f"  {msg['event']:<8} {SLOW_PHASES[msg['event']]}\n")
            else:
                out.write(f"  {msg['event']:<8} {msg['duration']:7.3f}s  {_describe(msg)}\n")
        out.flush()
        final = msg
    if not final.get("ok"):
        code = print_error(final, quiet=as_json)
        return code
    if not as_json:
        r = final["result"]
        if r.get("paused"):
            out.write(describe_pause(r["paused"]))
            return EXIT_OK
        a, sw = r["active"], r["swap"]
        total = (sw.get("finished_at") or 0) - sw["started_at"]
        out.write(f"done in {total:.2f}s: {a['slot']} :{a['port']} pid {a['pid']} serves {a['build']}\n")
        if (sw.get("details") or {}).get("warm"):
            out.write(f"used the warm build (pid {a['pid']}, kept running since the last release): one routing "
                      "change, no start, no readiness wait\n")
        kept = (sw.get("details") or {}).get("stop", {}).get("warm_until")
        if kept:
            out.write(f"the old build stays warm until {clock(kept)}: `bluegreen rollback` before then is one "
                      "routing change\n")
        for w in sw.get("warnings") or []:
            out.write(f"warning: {w}\n")
    return EXIT_OK


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def describe_pause(p: dict[str, Any]) -> str:
    """What a paused swap offers, and the two ways on."""
    sb = p["standby"]
    lines = [
        f"paused: {sb['build']} runs on {sb['slot']} :{sb['port']} (pid {sb['pid']}) for preview requests only; "
        "everyone else stays on the active build",
        f"  preview: send the header '{p['header']}' or the cookie '{p['cookie']}' (or test :{sb['port']} directly)",
    ]
    if p.get("needs"):
        lines.append(f"  (the preview route needs {p['needs']})")
    lines += [
        "  bluegreen promote   switch everyone to it (drain and stop the old build)",
        "  bluegreen abort     stop it; traffic never moved",
        f"  aborted on its own at {clock(p['until'])} (release.pause_timeout)",
    ]
    return "\n".join(lines) + "\n"


TRAFFIC = {
    "unchanged": "traffic is unchanged: the old build serves",
    "restored": "traffic is back on the old build",
    "moved": "traffic moved: the new build serves",
}


def print_error(final: dict[str, Any], quiet: bool = False) -> int:
    """Say what failed and where traffic is; the exit code follows where traffic is."""
    e = final.get("error") or {}
    if not quiet:
        phase = f" in phase {e['phase']}" if e.get("phase") else ""
        err(f"failed{phase} [{e.get('code')}]: {e.get('message')}")
        for r in e.get("results") or []:  # smoke checks: one line each
            got = f"HTTP {r['status']}" if r["status"] is not None else r["got"]
            err(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {got} (expected HTTP {r['expected']})")
        if e.get("traffic") in TRAFFIC:
            err(TRAFFIC[e["traffic"]])
    if e.get("code") in ("bad_request", "config"):
        return EXIT_USAGE
    return EXIT_MOVED if e.get("traffic") == "moved" else EXIT_FAILED


def answering_pid(path: Path) -> int | None:
    """The pid of the process that accepts connections on the Unix socket `path` (0 if it
    cannot be told), or None if nothing answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError:
            return 0  # it exists but we may not connect (permissions): assume it is alive
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
