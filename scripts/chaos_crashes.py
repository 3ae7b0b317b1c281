"""Crashes under load, side by side in one run: the active app SIGKILLed every few seconds while
an open-loop load runs (half fresh connections, half keep-alive, one request in ten slow), first
with nothing held (hold.timeout = 0: nginx answers 502 while no build can, bluegreen before the
hold), then with the hold (the default), then with the hold and a hot spare (app.spare = true),
on the same schedule. Each failed request is put down to its cause: sent before a killed app's
process was gone and still running then (it was inside the killed app), or sent after (nothing could
answer it). nginx's own count of what the dead apps had (`lost`) is printed beside the clients'
count. With --app tomcat, the Tomcat example (a boot of seconds): the hold, then the hold and a
spare.

    scripts/chaos --crashes [--duration 120] [--kill-every 10] [--rate 100] [--app node|tomcat]
    scripts/chaos --crashes --pause 5     `bluegreen pause` for 5 s under the same load, then `resume`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench import OpenLoopLoad  # noqa: E402
from conftest import render_config  # noqa: E402
from helpers import DaemonRun, dump_toml, example_config, free_ports, make_build  # noqa: E402


def write_config(d: Path, app: str, hold_timeout: float, spare: bool,
                 held_at_most: int = 200) -> tuple[Path, int, int, int]:
    """The run's config: the example Node app or the Tomcat example, restarted without end (every
    kill is a crash to recover from), holding up to `hold_timeout`, with a spare or not."""
    import tomllib

    listen, blue, green = free_ports(3)
    config = d / "bluegreen.toml"
    if app == "tomcat":
        data = tomllib.loads(example_config(ROOT / "examples" / "tomcat" / "bluegreen.toml", config, listen,
                                            (blue, green)).read_text())
    else:
        data = tomllib.loads(render_config(d, build=make_build(d / "releases", "v1"), ports=(blue, green),
                                           listen=listen, drain_timeout=10, stop_timeout=5))
    data["app"].update(spare=spare, restart={"attempts": 1000, "backoff": 0.1, "backoff_max": 0.5})
    data["hold"] = {"timeout": hold_timeout, "max_requests": held_at_most}
    # Each held request takes about three of nginx's connections: raised together.
    data["nginx"]["worker_connections"] = max(1024, 4 * held_at_most)
    config.write_text(dump_toml(data))
    return config, listen, blue, green


async def one_run(label: str, hold_timeout: float, args: argparse.Namespace, spare: bool = False) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="bg-crashes-"))
    config, listen, blue, green = write_config(d, args.app, hold_timeout, spare)
    run = DaemonRun(dir=d, config=config, listen_port=listen, ports=(blue, green))
    await asyncio.to_thread(run.start)
    if spare:
        await spare_ready(run)
    load = OpenLoopLoad(listen, args.rate)
    if args.app == "tomcat":
        load.slow_path = load.slow_path.replace("/slow", "/slow.jsp")
    task = asyncio.ensure_future(load.run())
    kills: list[float] = []
    took_spare: list[bool] = []  # each kill: the spare served next (no boot)
    gaps: list[float] = []
    try:
        await asyncio.sleep(min(args.kill_every / 2, 3))
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            t0 = time.monotonic()
            st = await asyncio.to_thread(run.status)
            ready = not spare or (st and (st.get("spare") or {}).get("state") == "ready")
            if st and st["active"] and st["active"]["alive"] and st["daemon"]["status"] == "serving" and ready:
                pid = st["active"]["pid"]
                at = time.time()
                os.kill(pid, signal.SIGKILL)
                while not gone(pid):  # dying: the kernel tears it down for a moment (the daemon reaps it)
                    await asyncio.sleep(0.001)
                kills.append(time.time())  # from here nothing of it runs
                gaps.append(await serving_again(run, pid) - at)
                took_spare.append(bool(spare and (await asyncio.to_thread(run.status))["active"]["pid"] == st["spare"]["pid"]))
            await asyncio.sleep(max(0.0, args.kill_every - (time.monotonic() - t0)))
        await asyncio.sleep(2)  # the last restart serves under load
    finally:
        await load.stop()
        task.cancel()
    history = [json.loads(line) for line in (await asyncio.to_thread(run.cli, "history", "--json", "-n", "1000"))
               .stdout.splitlines()]
    await asyncio.to_thread(run.stop)
    shutil.rmtree(d, ignore_errors=True)
    held = [e["held"] for e in history if e.get("reason") == "recover" and e.get("held")]
    failed = [r for r in load.results if r.kind != "ok"]
    inside = [r for r in failed if any(r.start < k and r.end >= k - 0.1 for k in kills)]  # (a kill: at most ms)
    return {"label": label, "requests": len(load.results), "failed": len(failed), "inside": len(inside),
            "after": len(failed) - len(inside), "kinds": kinds(failed), "kills": len(kills),
            "gap": sum(gaps), "held": sum(h["held"] for h in held),
            "longest": max((h["held_longest"] for h in held), default=0.0),
            "timeouts": sum(h["hold_timeouts"] for h in held), "lost": sum(h["lost"] for h in held),
            "counted": bool(held), "spare": f"{sum(took_spare)} of {len(took_spare)}" if spare else "-"}


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def spare_ready(run: DaemonRun) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        st = await asyncio.to_thread(run.status)
        if st and (st.get("spare") or {}).get("state") == "ready":
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"no spare was ready within 180 s:\n{run.output()}")


async def serving_again(run: DaemonRun, dead: int) -> float:
    """When the status first shows another live active app (polled every 50 ms)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = await asyncio.to_thread(run.status)
        if st and st["active"] and st["active"]["pid"] != dead and st["active"]["alive"] \
                and st["daemon"]["status"] == "serving":
            return time.time()
        await asyncio.sleep(0.05)
    raise SystemExit(f"no replacement served within 60 s of killing pid {dead}:\n{run.output()}")


async def pause_run(args: argparse.Namespace) -> int:
    """`pause` for args.pause seconds under the open-loop load, then `resume`: what failed, and how
    long the requests sent while paused waited."""
    d = Path(tempfile.mkdtemp(prefix="bg-pause-"))
    most = int(args.rate * (args.pause + 1)) + 50  # everything sent while paused is held at once
    config, listen, blue, green = write_config(d, args.app, 10, False, held_at_most=most)
    run = DaemonRun(dir=d, config=config, listen_port=listen, ports=(blue, green))
    await asyncio.to_thread(run.start)
    load = OpenLoopLoad(listen, args.rate)
    task = asyncio.ensure_future(load.run())
    try:
        await asyncio.sleep(2)
        began = time.time()
        paused = await asyncio.to_thread(run.cli, "pause")
        await asyncio.sleep(args.pause)
        resumed = await asyncio.to_thread(run.cli, "resume")
        ended = time.time()
        await asyncio.sleep(3)
    finally:
        await load.stop()
        task.cancel()
        await asyncio.to_thread(run.stop)
        shutil.rmtree(d, ignore_errors=True)
    during = [r for r in load.results if began <= r.start < ended and not r.slow]
    failed = [r for r in load.results if r.kind != "ok"]
    print(f"\n`bluegreen pause` for {args.pause:g} s under {args.rate:g} requests/s open loop (half fresh, half "
          "keep-alive, one in ten slow), then `resume`; the example Node app, managed nginx, runtime switch, "
          f"hold.max_requests = {most}, nginx.worker_connections = {max(1024, 4 * most)}\n")
    print("| requests | sent while paused | failed | longest wait of those sent while paused | resume said |")
    print("|---|---|---|---|---|")
    longest = max((r.end - r.start for r in during), default=0.0)
    print(f"| {len(load.results)} | {len(during)} | {len(failed)} ({kinds(failed)}) | {longest:.2f} s | "
          f"{resumed.stdout.strip().splitlines()[-1] if resumed.stdout.strip() else resumed.stderr.strip()} |")
    ok = paused.returncode == 0 and resumed.returncode == 0 and not failed
    print("chaos --crashes --pause: " + ("PASS: nothing failed; every request sent while paused was answered after "
                                         "the resume" if ok else "FAIL"))
    return 0 if ok else 1


def kinds(results: list[Any]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[f"{r.client} {r.kind}"] = counts.get(f"{r.client} {r.kind}", 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crashes", action="store_true", help="(this mode)")
    parser.add_argument("--duration", type=float, default=120, help="seconds of kills (default 120)")
    parser.add_argument("--kill-every", type=float, default=10, help="seconds between two kills (default 10)")
    parser.add_argument("--rate", type=float, default=100, help="requests per second, open loop (default 100)")
    parser.add_argument("--app", choices=("node", "tomcat"), default="node", help="the example app (default node)")
    parser.add_argument("--pause", type=float, default=0, metavar="SECONDS",
                        help="instead: `bluegreen pause` for SECONDS under the load, then `resume`")
    args = parser.parse_args(argv)
    if args.pause:
        return asyncio.run(pause_run(args))
    rows = [] if args.app == "tomcat" else [asyncio.run(one_run("nothing held (hold.timeout = 0)", 0, args))]
    rows += [asyncio.run(one_run("held (hold.timeout = 10)", 10, args)),
             asyncio.run(one_run("held, with a spare (app.spare = true)", 10, args, spare=True))]
    what = "the Tomcat example" if args.app == "tomcat" else "the example Node app"
    print(f"\nkill -9 of the active app every {args.kill_every:g} s for {args.duration:g} s, {args.rate:g} requests/s "
          f"open loop (half fresh, half keep-alive), one in ten slow (1 s); {what}, managed nginx, runtime switch\n")
    print("| run | kills | requests | failed | of which inside the killed app | sent after a kill | nginx counted "
          "lost | held | longest hold | held past hold.timeout | replacement serving after | spare served |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nginx = [str(r["lost"]), str(r["held"]), f"{r['longest']:.3f} s", str(r["timeouts"])] if r["counted"] else \
            ["-"] * 4  # nothing held: no hold server to count
        print(f"| {r['label']} | {r['kills']} | {r['requests']} | {r['failed']} | {r['inside']} | {r['after']} | "
              + " | ".join(nginx) + f" | {r['gap'] / max(1, r['kills']):.2f} s (mean) | {r['spare']} |")
    for r in rows:
        print(f"{r['label']}: failures by client and kind: {r['kinds']}")
    held = rows[-2:]  # the hold, and the hold with a spare
    ok = all(r["after"] == 0 and r["failed"] == r["lost"] for r in held)
    print("chaos --crashes: " + ("PASS: with the hold (and with a spare), no request sent after a kill failed, and "
                                 "every failure was one nginx counted lost" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
