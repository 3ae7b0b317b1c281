import os, signal, time, httpx, threading, subprocess
from helpers import wait_until, running
from shapes import app_build, start_on

def test_dbg(make_daemon, releases):
    health = '[app.health]\nurl = "http://127.0.0.1:{port}/health"\ninterval = 0.2\ntimeout = 0.5\nfailures = 2\n'
    run, _ = start_on("managed", make_daemon, releases.parent, app_build(releases, "v1", boot_ms=500), health)
    sock = run.dir / "run/nginx/control.sock"
    hold = lambda: subprocess.run(["curl", "-s", "--unix-socket", str(sock), "http://x/.bluegreen/hold"], capture_output=True, text=True).stdout
    pid = run.status()["active"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: any(e["event"] == "unhealthy" for e in run.status()["events"]), 30, "found hung")
    print("HOLD", hold())
    try:
        r = httpx.get(f"http://127.0.0.1:{run.listen_port}/", timeout=8)
        print("R", r.status_code, r.text)
    except Exception as e:
        print("EXC", e)
    print("HOLD", hold())
    st = run.status()
    print(st["events"][-4:], st.get("swap"), st["active"]["pid"], pid)
    print(run.output()[-2000:])
    os.kill(pid, signal.SIGCONT)
