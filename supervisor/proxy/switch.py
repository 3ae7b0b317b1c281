"""Which switch an app gets: the runtime switch (nginx's lua table, no reload) where nginx can run
it and the config asks for it, else reloads."""

from __future__ import annotations

from ..config.host import lua_missing
from ..config.schema import Config
from .front import FrontProxy
from .managed import ManagedNginx
from .master import Master
from .reload import ReloadSwitch
from .runtime import RuntimeSwitch


def make(config: Config, master: Master, managed: ManagedNginx | None) -> tuple[FrontProxy, str]:
    """The switch nginx.switch asks for, and why it was chosen (for status and the start-up log)."""
    wanted = config.nginx.switch
    if config.app.protocol == "tcp":
        return ReloadSwitch(config, master), ("reloads (a TCP service: nginx's stream module has no lua in Debian; "
                                              "every reload is tested and confirmed)")
    if managed is None:
        if wanted == "runtime":
            return RuntimeSwitch.external(config, master), ("routing table in your nginx's shared memory, changed "
                                                            "without a reload (nginx.switch = \"runtime\")")
        return ReloadSwitch(config, master), "reloads your nginx (the default with your own nginx)"
    missing = lua_missing(config.nginx.binary) if wanted in ("runtime", "auto") else None
    if wanted == "runtime" or (wanted == "auto" and missing is None):
        managed.runtime = True
        return RuntimeSwitch.managed(config, managed), "routing table in nginx's shared memory, changed without a reload"
    if wanted == "auto":
        return ReloadSwitch(config, master), f"reloads, because {missing}"
    return ReloadSwitch(config, master), "reloads (nginx.switch = \"reload\")"
