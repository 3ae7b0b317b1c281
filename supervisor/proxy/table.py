"""The runtime switch's routing table inside nginx, as the daemon reaches it: HTTP/1.0 requests
on the control socket (a Unix socket only the daemon's user can enter), one per question or
change, each answered with the table's value so that every change is read back.

    GET    /.bluegreen/route          the port          PUT a port: route there (ends preview, split)
    GET    /.bluegreen/preview        the preview port  PUT a port / DELETE
    PUT    /.bluegreen/split          "candidate share gen" (DELETE: all off, counters dropped)
    GET    /.bluegreen/state          "port preview candidate share gen"
    GET    /.bluegreen/stats?gen=G    "port kind count" lines
    GET    /.bluegreen/inflight?port=P  "worker-pid count long" lines
    GET    /.bluegreen/handlers       how many control requests the shared log handler counted
    GET    /.bluegreen/hold           "held holding hold_timeouts held_ms held_longest lost pause down"
                                      PUT "pause S", "resume", "down PORT", "up"
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..errors import NginxError
from .counters import Counters, Hold
from .render import CONTROL
from ..aio import within

TIMEOUT = 5.0


class Table:
    def __init__(self, control: Path, hint: str = "") -> None:
        self.path = control
        self.hint = hint  # what else the control socket needs, said when it does not answer

    async def call(self, method: str, name: str, body: bytes = b"") -> tuple[int, str]:
        """One HTTP/1.0 request on the control socket; (status, body)."""
        sock = str(self.path)
        try:
            reader, writer = await within(asyncio.open_unix_connection(sock), TIMEOUT)
            writer.write(f"{method} {CONTROL}{name} HTTP/1.0\r\nHost: bluegreen\r\nContent-Length: {len(body)}\r\n\r\n"
                         .encode() + body)
            data = await within(reader.read(), TIMEOUT)  # HTTP/1.0: nginx closes after the answer
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            raise NginxError(f"nginx's control socket {sock} does not answer ({e!r}); is nginx running, with the "
                             f"lua module loaded{self.hint}?", code="nginx_down") from None
        head, _, text = data.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise NginxError(f"nginx's control socket gave an unreadable answer: {data[:80]!r}",
                             code="nginx_down") from None
        return status, text.decode("utf-8", "replace").strip()

    async def change(self, method: str, name: str, body: bytes, want: str, what: str) -> None:
        """A change nginx must confirm by answering `want` (the table's value read back)."""
        status, answer = await self.call(method, name, body)
        if status != 200 or answer != want:
            raise NginxError(f"nginx did not take {what}: it answered {status} {answer[:80]!r}",
                             code="nginx_reload_failed")

    async def read(self, name: str, what: str) -> str:
        status, body = await self.call("GET", name)
        if status != 200:
            raise NginxError(f"nginx's control socket answered {status} {body[:80]!r} for {what}", code="nginx_down")
        return body

    async def state(self) -> tuple[int, int, tuple[int, int, int]]:
        """(port, preview, (candidate, share, gen)), 0 for unset."""
        parts = (await self.read("state", "the routing state")).split()
        if len(parts) != 5 or not all(p.isdigit() for p in parts):
            raise NginxError(f"nginx's control socket gave an unreadable routing state {' '.join(parts)[:80]!r}",
                             code="nginx_down")
        port, preview, cand, share, gen = (int(p) for p in parts)
        return port, preview, (cand, share, gen)

    async def stats(self, gen: int) -> dict[int, Counters]:
        """What nginx counted per upstream port in watch generation `gen`."""
        raw: dict[int, dict[str, int]] = {}
        for line in (await self.read(f"stats?gen={gen}", "the counters")).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
                raw.setdefault(int(parts[0]), {})[parts[1]] = int(parts[2])
        return {port: Counters(requests=k.get("n", 0), http_5xx=k.get("5xx", 0), upstream_errors=k.get("err", 0),
                               latency={int(name[1:]): n for name, n in k.items() if name[:1] == "l"
                                        and name[1:].isdigit()})
                for port, k in raw.items()}

    async def inflight(self, port: int) -> dict[int, tuple[int, int]]:
        """Requests in flight to `port` and how many of them are long-lived, per nginx worker pid
        that ever sent one there."""
        body = await self.read(f"inflight?port={port}", "the in-flight count")
        counts = [line.split() for line in body.splitlines()]
        if not all(len(c) == 3 and c[0].isdigit() and all(n.lstrip("-").isdigit() for n in c[1:]) for c in counts):
            raise NginxError(f"nginx's control socket gave an unreadable in-flight count {body[:80]!r}",
                             code="nginx_down")
        return {int(pid): (int(n), int(long)) for pid, n, long in counts}

    async def hold(self, change: str = "") -> Hold:
        """The hold server's counters, after `change` ("pause S", "resume", "down PORT", "up") if given."""
        if change:
            status, body = await self.call("PUT", "hold", change.encode())
            if status != 200:
                raise NginxError(f"nginx did not take the hold change {change!r}: it answered {status} {body[:80]!r}",
                                 code="nginx_reload_failed")
        else:
            body = await self.read("hold", "the hold counters")
        parts = body.split() + ["0"]  # (an nginx still running the program before hold_full: none turned away)
        try:
            held, holding, timed_out, held_ms, longest, lost, pause, down, full = (float(p) for p in parts[:9])
        except ValueError:
            raise NginxError(f"nginx's control socket gave unreadable hold counters {body[:80]!r}",
                             code="nginx_down") from None
        return Hold(int(held), int(holding), int(timed_out), int(held_ms), int(longest), int(lost), pause, int(down),
                    int(full))
