"""The runtime switch: a FrontProxy that moves traffic by changing a routing table inside the
managed nginx (a lua shared dict), with no reload, so no keep-alive connection is reset and no
old worker keeps answering from the old build.

A route is: write the route file (what nginx seeds the table from when it starts or reloads)
atomically, with the previous one staged for a rename back -> PUT the port on the control
socket in the prefix (mode 0600; the public listener answers 404 for the control path) ->
nginx answers with the table's value, which must be the port: that read-back confirms it.
The previous routing has let go once nginx counts no request in flight to the old port.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .config import Config
from .errors import NginxError
from .fsutil import UndoableFile
from .nginx import CONTROL, ReloadSwitch
from .nginx_process import ManagedNginx

TIMEOUT = 5.0
POLL = 0.005


class RuntimeSwitch:
    mode = "runtime"

    def __init__(self, config: Config, managed: ManagedNginx) -> None:
        self.managed = managed
        self.route_file = UndoableFile(managed.route_path)
        self.previous: int | None = None  # the port routed before the last route, until it lets go
        self.undo_port: int | None = None
        # nginx's own config still changes by a reload (a daemon upgrade), never a swap.
        self.reloader = ReloadSwitch(config, managed)

    async def route(self, port: int) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            # The file first: an nginx restarted from now on comes back routing to `port`. Not
            # fsynced: after a power loss nothing runs, and every start writes it again.
            previous = self.route_file.replace(f"{port}\n".encode(), durable=False)
        except OSError as e:
            raise NginxError(f"cannot write {self.route_file.path}: {e.strerror}; traffic is unchanged "
                             "(check free disk space)", code="upstream_write_failed") from e
        t1 = time.monotonic()
        try:
            await self._set(port)
        except BaseException:
            self.route_file.restore()
            raise
        before = (previous or b"").strip()
        self.previous = self.undo_port = int(before) if before.isdigit() else None
        return {"port": port, "write": round(t1 - t0, 4), "set": round(time.monotonic() - t1, 4), "mode": self.mode}

    async def route_back(self, port: int) -> dict[str, Any]:
        """Back to `port` by a rename of the staged route file and one table change: no disk space needed."""
        if self.undo_port != port or not self.route_file.armed:
            self.forget_undo()
            return await self.route(port)
        t0 = time.monotonic()
        self.route_file.restore()
        await self._set(port)
        self.undo_port = None
        return {"port": port, "set": round(time.monotonic() - t0, 4), "mode": self.mode}

    def forget_undo(self) -> None:
        self.route_file.forget()
        self.undo_port = None

    def clean_stale_temp(self) -> None:
        self.route_file.clean_stale()
        self.reloader.clean_stale_temp()

    async def apply_config(self, port: int) -> dict[str, Any]:
        self.route_file.replace(f"{port}\n".encode())
        self.route_file.forget()
        result = await self.reloader.apply_config(port)
        await self._set(port)  # a reload keeps the live table: make sure it names `port`
        return result

    async def routed_port(self) -> int | None:
        try:
            status, body = await self._call("GET", f"{CONTROL}route")
        except NginxError:
            return None
        return int(body) if status == 200 and body.isdigit() else None

    async def inflight(self, port: int) -> int:
        status, body = await self._call("GET", f"{CONTROL}inflight?port={port}")
        if status != 200 or not body.lstrip("-").isdigit():
            raise NginxError(f"nginx's control socket answered {status} {body[:80]!r} for the in-flight count",
                             code="nginx_down")
        return max(0, int(body))

    async def let_go(self, deadline: float) -> int:
        """Wait until nginx counts no request in flight to the port routed before the last route."""
        old = self.previous
        if old is None:
            return 0
        left = await self._inflight_or_zero(old)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(POLL * 2)
            left = await self._inflight_or_zero(old)
        return left

    async def _inflight_or_zero(self, port: int) -> int:
        try:
            return await self.inflight(port)
        except NginxError:
            return 0  # nginx is gone (restarted): nothing it counted is in flight any more

    async def _set(self, port: int) -> None:
        status, body = await self._call("PUT", f"{CONTROL}route", str(port).encode())
        if status != 200 or body != str(port):
            raise NginxError(f"nginx did not take the route to port {port}: it answered {status} {body[:80]!r}",
                             code="nginx_reload_failed")

    async def _call(self, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
        """One HTTP/1.0 request on the control socket; (status, body)."""
        sock = str(self.managed.control_path)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), TIMEOUT)
            writer.write(f"{method} {path} HTTP/1.0\r\nHost: bluegreen\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            data = await asyncio.wait_for(reader.read(), TIMEOUT)  # HTTP/1.0: nginx closes after the answer
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            raise NginxError(f"nginx's control socket {sock} does not answer ({e!r}); is the managed nginx running?",
                             code="nginx_down") from None
        head, _, text = data.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise NginxError(f"nginx's control socket gave an unreadable answer: {data[:80]!r}",
                             code="nginx_down") from None
        return status, text.decode("utf-8", "replace").strip()
