"""The control verbs. Each module here is one verb and holds all of it:

    SPEC                              its wire spec (name, arguments, help)
    add_arguments(parser)             its CLI arguments (optional)
    async handle(daemon, reply, ...)  what the daemon does
    run(socket, args) -> exit code    what the CLI sends and prints

The protocol's command table and the CLI's subcommands are built from these modules, so a
new verb is one new module here and nothing else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType


@functools.cache
def load() -> dict[str, ModuleType]:
    """Every verb module, by name, in the order their SPECs give."""
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    return {m.SPEC.name: m for m in sorted(modules, key=lambda m: m.SPEC.order)}
