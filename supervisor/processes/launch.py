"""Starting an app on a slot: its placeholders, its slot directory and environment, its port.

Every app process gets BLUEGREEN_STATE_DIR and BLUEGREEN_SLOT in its environment; the
markers let a later stop, or a later daemon, find whatever it left behind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .. import builds
from ..config.schema import Config, expand
from ..errors import PortInUse
from . import sockets, slots

log = logging.getLogger("bluegreen")


class Launcher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.daemon.state_dir

    def context(self, slot: str, build: Path) -> dict[str, str]:
        """The placeholders of app.command, app.cwd, app.env and the check URLs."""
        return {
            "port": str(self.config.app.port(slot)),
            "slot": slot,
            "build": str(build),
            "build_name": build.name,
            "slot_dir": str(self.state_dir / "slots" / slot),
        }

    def url(self, template: str | None, app: slots.AppProcess) -> str | None:
        return expand(template, self.context(app.slot, app.build)) if template else None

    async def spawn(self, slot: str, build: Path) -> slots.AppProcess:
        app = self.config.app
        ctx = self.context(slot, build)
        slot_dir = Path(ctx["slot_dir"])
        slot_dir.mkdir(parents=True, exist_ok=True)
        slots.lay_out(slot_dir, app.dirs, app.files, ctx)
        cwd = builds.workdir(build) if app.cwd == "{build}" else Path(expand(app.cwd, ctx))
        if not cwd.is_absolute():
            cwd = self.config.path.parent / cwd
        env = {k: expand(v, ctx) for k, v in app.env.items()}
        env.update(BLUEGREEN_SLOT=slot, BLUEGREEN_PORT=ctx["port"], BLUEGREEN_BUILD=str(build),
                   BLUEGREEN_STATE_DIR=str(self.state_dir))
        return await slots.spawn(
            [expand(a, ctx) for a in app.command], cwd, env,
            slot=slot, port=app.port(slot), build=build, log_path=self.log_path(slot),
            logs=self.config.logs,
        )

    def log_path(self, slot: str) -> Path:
        return self.state_dir / "logs" / f"{slot}.log"

    async def free_port(self, port: int, keep: set[int], cleared: Callable[[str], None]) -> None:
        """Make sure `port` is free for a new app: a leftover of ours holding it (a server its start
        script left behind, a process a killed daemon never recorded) is stopped, never one of
        `keep`; anything else is the user's, and named."""
        if not sockets.listening(port):
            return
        holders = sockets.listening_pids(port) - keep
        s = self.config.app.stop
        for what in await slots.clear_leftovers(self.state_dir, holders, s.signal, s.timeout):
            log.warning("port %d was held by a leftover of this daemon's apps; stopped it: %s", port, what)
            cleared(what)
        if sockets.listening(port):
            raise PortInUse(f"port {port} is already in use by {sockets.port_holder(port)}; stop that process or "
                            "change app.ports", port=port)
