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
import os
from types import ModuleType

from ..protocol import CommandSpec


@functools.cache
def names() -> tuple[str, ...]:
    """Every verb's name: its module's (a listing, not pkgutil: pkgutil loads inspect, which alone
    costs the CLI a tenth of its start)."""
    return tuple(sorted(f[:-3] for f in os.listdir(__path__[0]) if f.endswith(".py") and not f.startswith("_")))


def one(name: str) -> ModuleType:
    """One verb's module (the CLI running `status` loads no other verb)."""
    if name not in names():
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


@functools.cache
def load() -> dict[str, ModuleType]:
    """Every verb module, by name, in the order their SPECs give."""
    modules = [one(name) for name in names()]
    return {m.SPEC.name: m for m in sorted(modules, key=lambda m: m.SPEC.order)}


def specs() -> dict[str, CommandSpec]:
    """The protocol's command table: every verb's wire spec, by name."""
    return {name: module.SPEC for name, module in load().items()}
