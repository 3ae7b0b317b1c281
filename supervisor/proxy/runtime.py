"""The runtime switch: a FrontProxy that moves traffic by changing a routing table inside nginx
(a lua shared dict), with no reload, so no keep-alive connection is reset and no old worker keeps
answering from the old build. The same nginx part (nginx.render_runtime) serves the managed nginx and
a user's own nginx, which includes it from the upstream file.

A route is: write the route file (what nginx seeds the table from when it starts or reloads)
atomically, with the previous one staged for a rename back -> PUT the port on the control
socket (in a 0700 directory; the managed public listener answers 404 for the control path) ->
nginx answers with the table's value, which must be the port: that read-back confirms it.
The previous routing has let go once nginx counts no request in flight to the old port.
The same table holds a split (a share of users to a candidate port, by a stable hash of the
rollout cookie) and, per watch generation, counters of what each port answered (verdict.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from ..aio import shielded
from ..config.schema import Config
from ..errors import NginxError
from ..fsutil import UndoableFile
from .counters import Counters, Hold
from .front import RoutingLock, StagedRoute, routing
from .managed import ManagedNginx
from .master import Master, worker_title
from .reload import ReloadSwitch
from .render import HOLD, free_loopback_port, hold_port_in, render_lua_handlers, runtime_part
from .table import Table

log = logging.getLogger("bluegreen")

POLL = 0.005


def route_file_of(upstream: Path) -> Path:
    """Where the runtime switch keeps the port a fresh nginx routes to, in your nginx: a dotfile
    beside the upstream file (no `include *.conf` picks it up)."""
    return upstream.with_name(f".{upstream.name}.route")


class SharedHandlers:
    """The runtime switch's http-level request handlers in a file of their own
    (nginx.lua_handlers_file), which every app's daemon in one nginx writes with the same text;
    nginx allows them once. No file: they are in the app's own part."""

    def __init__(self, path: Path | None) -> None:
        self.file = UndoableFile(path) if path else None
        self.text = render_lua_handlers().encode()
        self.wrote = False

    def stale(self) -> bool:
        return self.file is not None and self.file.read() != self.text

    def write(self) -> None:
        """Write the file if it differs (then `commit_or_undo` keeps it or puts the previous one back)."""
        self.wrote = False
        if self.file is None or not self.stale():
            return
        try:
            self.file.replace(self.text)
        except OSError as e:
            raise NginxError(f"cannot write {self.file.path}: {e.strerror}; nginx is unchanged",
                             code="upstream_write_failed") from e
        self.wrote = True

    def commit_or_undo(self, kept: bool) -> None:
        if self.file is not None and self.wrote:
            if kept:
                self.file.forget()
            else:
                self.file.restore()
        self.wrote = False

    def missing(self, undone: str) -> NginxError:
        path = self.file.path if self.file else None
        return NginxError(f"nginx does not run bluegreen's request handlers from {path} (nginx.lua_handlers_file): "
                          f"include that file once in nginx's http block (a glob like include "
                          f"{path.parent if path else ''}/*.conf; does), then restart the daemon; {undone}",
                          code="handlers_missing")


class RuntimeSwitch(StagedRoute):
    mode = "runtime"
    durable = False  # the route file: written again at every start

    def traffic_split(self) -> "RuntimeSwitch":
        return self

    def __init__(self, config: Config, master: Master, route: Path, control: Path, preload: bool = True,
                 hold_port: Callable[[], int] = lambda: 0, new_hold_port: Callable[[], None] = lambda: None) -> None:
        self.control_path = control
        self.table = Table(control)
        self.route_file = self.staged = UndoableFile(route)
        self.handlers = SharedHandlers(config.nginx.lua_handlers_file)
        self.part = lambda: runtime_part(config, route, control, handlers=self.handlers.file is None, preload=preload,
                                         hold_port=hold_port())
        self.holds = config.app.protocol == "http" and config.hold.timeout > 0  # a hold server in the part
        self.hold_port, self.new_hold_port = hold_port, new_hold_port
        # What nginx was last told, confirmed: all traffic, the preview, the split (candidate,
        # share, counters generation). A restarted nginx forgets all but the port (route file).
        self.port: int | None = None
        self.preview_port: int | None = None
        self.preview_token = ""  # what a preview request's header or cookie must say ("": 1)
        self.split_state: tuple[int, int, int] | None = None
        self.lock = RoutingLock()
        # nginx's own config (the part in the upstream file) changes by a reload, never at a swap.
        self.reloader = ReloadSwitch(config, master, render=lambda port: self.text)
        self.reloader.lock = self.lock

    @property
    def text(self) -> str:
        """The part nginx includes (its hold server's port may change while nginx is down)."""
        return self.part()

    @classmethod
    def managed(cls, config: Config, nginx: ManagedNginx) -> "RuntimeSwitch":
        nginx.hold_port = hold_port_in(nginx.upstream_path)
        return cls(config, nginx, nginx.route_path, nginx.control_path, preload=False,  # its conf loads the lua
                   hold_port=lambda: nginx.hold_port,
                   new_hold_port=lambda: setattr(nginx, "hold_port", free_loopback_port()))

    @classmethod
    def external(cls, config: Config, master: Master) -> "RuntimeSwitch":
        """In the user's nginx: its master (root) creates the control socket in a directory only
        the daemon's user can enter. The route file lies beside the upstream file, where nginx's
        workers (www-data on Debian) can read it when a restarted nginx seeds its table."""
        where = config.daemon.state_dir / "switch"
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        where.chmod(0o700)
        port = _HoldPort(hold_port_in(master.upstream_path))
        switch = cls(config, master, route_file_of(master.upstream_path), where / "control.sock",
                     hold_port=port.get, new_hold_port=port.renew)
        switch.table.hint = (f" and {config.nginx.upstream_file} included in its http block "
                             "(see docs/nginx.md#the-runtime-switch-with-your-own-nginx-external-mode)")
        return switch

    def config_stale(self) -> bool:
        return self.reloader.upstream.read() != self.text.encode() or self.handlers.stale()

    def text_for(self, port: int) -> bytes:
        return f"{port}\n".encode()

    def port_in(self, data: bytes | None) -> int | None:
        text = (data or b"").strip()
        return int(text) if text.isdigit() else None

    async def apply(self, port: int) -> dict[str, Any]:
        """One table change, read back. The file was written first: an nginx restarted from now
        on comes back routing to `port` (not fsynced: after a power loss nothing runs, and every
        start writes it again)."""
        t0 = time.monotonic()
        await self._set(port)
        return {"port": port, "set": round(time.monotonic() - t0, 4), "mode": self.mode}

    async def recover(self, port: int | None) -> None:
        """nginx may have taken the route before the failure (a cancel, an answer too late): the
        table goes back with the file, or the standby about to stop would serve."""
        if port is None:
            return
        try:
            await shielded(self._set(port))
        except BaseException as e:
            log.error("could not put nginx's route back to port %s: %r", port, e)

    def clean_stale_temp(self) -> None:
        self.route_file.clean_stale()
        self.reloader.clean_stale_temp()  # not the shared handlers file's: another daemon may be writing it

    @routing
    async def apply_config(self, port: int) -> dict[str, Any]:
        """Load the nginx part (a reload: a first start in the user's nginx, a daemon upgrade)."""
        self.route_file.replace(f"{port}\n".encode())
        self.route_file.forget()
        self.handlers.write()
        try:
            result = await self._reload_with_handlers(port)
        except NginxError as e:
            if 'unknown "bluegreen_request" variable' in e.message and self.handlers.file is not None:
                # the handlers file declares it: nginx -t found the include missing before any reload
                raise self.handlers.missing("nginx -t refused the config (unknown \"bluegreen_request\" variable): "
                                            "nothing was reloaded, your previous config is back") from None
            if "unknown directive" in e.message and "lua" in e.message:
                e.message += (f"; the runtime switch needs nginx's lua module loaded{self.table.hint}: apt-get install "
                              "libnginx-mod-http-lua (Debian's nginx loads it from /etc/nginx/modules-enabled/), "
                              'or set nginx.switch = "reload"')
            elif "is duplicate" in e.message:
                e.message += ("; another app's runtime switch (or your own lua) already has these handlers in this "
                              "nginx: for several apps, set nginx.lua_handlers_file to the same path in every app's "
                              "config and include that file once in http {} (see docs/nginx.md#several-apps-on-one-host)")
            elif "is not allowed here" in e.message:
                e.message += (f"; include {self.reloader.upstream.path} once, directly in the http block "
                              "(outside any server or location)")
            raise
        await self._set(port)  # a reload keeps the live table: make sure it names `port`
        try:  # a socket the reload created is 0666 (nginx's choice); its 0700 directory guards it too
            self.control_path.chmod(0o600)
        except OSError:
            pass  # not ours to change (your nginx's root master made it)
        return result

    async def _reload_with_handlers(self, port: int) -> dict[str, Any]:
        """The reload; a handlers file written for it is put back if nginx refuses it, or if
        nginx turns out not to include it (then the reload is undone too). A hold server's port
        taken meanwhile by another process is changed for a free one, and the reload tried again."""
        try:
            result = await _reload_with_a_free_hold_port(self, port)
            if self.handlers.file is not None:
                await self._require_handlers()
        except BaseException:
            self.handlers.commit_or_undo(kept=False)
            raise
        self.handlers.commit_or_undo(kept=True)
        self.reloader.forget_undo()  # kept: the staged copy of your previous file goes
        return result

    async def _require_handlers(self) -> None:
        """nginx runs the shared handlers file, or without them no request would ever count out
        (every drain would wait its whole timeout): put the previous config back and say so.
        The probe: a control request is counted by the log handler once it has ended, which is
        before nginx closes the connection, so a second request sees the count go up."""
        before = await self.table.call("GET", "handlers")
        after = await self.table.call("GET", "handlers")
        if before[0] == after[0] == 200 and before[1].isdigit() and after[1].isdigit() and int(after[1]) > int(before[1]):
            return
        try:
            await self.reloader.undo()
            undone = "your previous config is back"
        except NginxError as e:
            undone = f"putting your previous config back failed too: {e.message}"
        raise self.handlers.missing(undone)

    @routing
    async def preview(self, port: int | None, token: str = "") -> dict[str, Any]:
        """Send preview requests (their header or cookie equal to `token`, or to 1 without one) to
        `port` (None: nobody): one table change, read back."""
        t0 = time.monotonic()
        want = "" if port is None else f"{port} {token}".strip()
        if port is None:  # intent first: an nginx that cannot be told now is told by reconcile
            self.preview_port, self.preview_token = None, ""
        await self.table.change("PUT" if port else "DELETE", "preview", want.encode(), want,
                                f"the preview {port or '(off)'}")
        self.preview_port, self.preview_token = port, token if port else ""
        return {"preview": port, "set": round(time.monotonic() - t0, 4), "mode": self.mode}

    @routing
    async def split(self, candidate: int | None, share: int, gen: int) -> dict[str, Any]:
        """Users whose bucket is below `share` (0-100) go to `candidate`; requests are counted
        under watch generation `gen` (candidate None: only count). Read back to confirm."""
        t0 = time.monotonic()
        want = f"{candidate or 0} {share if candidate else 0} {gen}"
        await self.table.change("PUT", "split", f"{candidate or 0} {share} {gen}".encode(), want, f"the split {want}")
        self.split_state = (candidate or 0, share if candidate else 0, gen)
        return {"candidate": candidate, "share": share, "gen": gen, "set": round(time.monotonic() - t0, 4)}

    @routing
    async def end_split(self) -> None:
        """No split, no watch; the counters are dropped. Intent first: if nginx cannot be told now
        (restarting), reconcile tells it, and never puts back a split whose candidate is gone."""
        self.split_state = None
        await self.table.change("DELETE", "split", b"", "0 0 0", "the end of the split")

    async def stats(self, gen: int) -> dict[int, Counters]:
        """What nginx counted per upstream port in watch generation `gen`."""
        return await self.table.stats(gen)

    async def hold(self, change: str = "") -> Hold | None:
        """The hold server's counters (after `change`); None for an app with none (gRPC)."""
        return await self.table.hold(change) if self.holds else None

    async def routed_port(self) -> int | None:
        try:
            status, body = await self.table.call("GET", "route")
        except NginxError:
            return None
        return int(body) if status == 200 and body.isdigit() else None

    async def inflight(self, port: int, short_only: bool = False) -> int:
        """Requests nginx has in flight to `port` (`short_only`: not counting the long-lived ones),
        counted by the workers that still run (a worker killed mid-request never counted its
        requests out; they died with it)."""
        counts = await self.table.inflight(port)
        return sum(max(0, n - (long if short_only else 0)) for pid, (n, long) in counts.items() if worker_title(pid))

    async def wait_released(self, port: int, deadline: float) -> int:
        """Wait until nginx counts no short request in flight to `port` (the drain closes the
        long-lived ones at their grace)."""
        left = await self._inflight_or_zero(port)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(POLL * 2)
            left = await self._inflight_or_zero(port)
        return left

    async def _inflight_or_zero(self, port: int) -> int:
        try:
            return await self.inflight(port, short_only=True)
        except NginxError:
            return 0  # nginx is gone (restarted): nothing it counted is in flight any more

    async def _set(self, port: int) -> None:
        """Route to `port`; nginx ends any preview and split at the same time (the counters
        generation stays)."""
        await self.table.change("PUT", "route", str(port).encode(), str(port), f"the route to port {port}")
        self.port, self.preview_port, self.preview_token = port, None, ""
        if self.split_state is not None:
            self.split_state = (0, 0, self.split_state[2])

    @routing
    async def reconcile(self) -> str | None:
        """Compare nginx's table with what it was told; a restarted nginx (empty table, port
        seeded from the route file) gets the preview and the split back."""
        if self.port is None:
            return None
        port, preview, split = await self.table.state()
        preview_to, token_to, split_to = self.preview_port, self.preview_token, self.split_state
        # nginx routes as it was told, nothing more: what a restart lost is set again, and what it
        # was never told (or was told to end while it could not hear) is taken away.
        if (port, preview, split) == (self.port, preview_to or 0, split_to or (0, 0, 0)):
            return None
        if port != self.port or (split_to is not None and split != split_to):
            await self._set(self.port)  # (a route ends any split and preview: set them after it)
            port, preview, split = self.port, 0, (0, 0, split[2])
        if preview != (preview_to or 0):
            await self.preview(preview_to, token_to)
        if split_to is not None and split != split_to:
            await self.split(split_to[0] or None, split_to[1], split_to[2])
        elif split_to is None and split != (0, 0, 0):
            await self.end_split()
        return (f"port {self.port}" + (f", preview to {preview_to}" if preview_to else "")
                + (f", {split_to[1]} % to {split_to[0]}" if split_to and split_to[0] else "")
                + (f", counters generation {split_to[2]}" if split_to else ""))


class _HoldPort:
    """The hold server's port in your nginx: kept across starts, changed if another process took it."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self) -> int:
        return self.port

    def renew(self) -> None:
        self.port = free_loopback_port()


async def _reload_with_a_free_hold_port(switch: RuntimeSwitch, port: int) -> dict[str, Any]:
    """The reload; if another process took the hold server's port, once more on a free one."""
    try:
        return await switch.reloader.apply_config(port)
    except NginxError as e:
        if not switch.holds or f"bind() to {HOLD}:{switch.hold_port()} failed" not in e.message:
            raise
        log.warning("the hold server's port %d is taken: another one, and nginx reloaded again", switch.hold_port())
        switch.new_hold_port()
        return await switch.reloader.apply_config(port)
