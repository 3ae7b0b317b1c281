"""Where a config's daemon is reached: its control socket, from the config file alone.

The CLI's verbs need nothing else of a config, so they read only this (the TOML and two keys)
instead of the whole schema: `bluegreen status` then starts about as fast as Python does.
config/schema.py derives the same paths through the same functions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

STATE_DIR = "run"  # daemon.state_dir's default
LOG_NAMES = ("active", "blue", "green", "nginx", "daemon")  # what `bluegreen logs` shows


def toml() -> Any:
    """The TOML reader (tomli where the stdlib's tomllib is missing), loaded when a config is read."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on Python 3.10
        import tomli as tomllib
    return tomllib


def rel(base: Path, p: str) -> Path:
    """A path of the config, relative to the config file's folder."""
    return (base / os.path.expanduser(p)).absolute()


def socket_path(daemon: dict[str, Any], base: Path) -> Path:
    """daemon.socket, else <state_dir>/bluegreen.sock."""
    if daemon.get("socket"):
        return rel(base, daemon["socket"])
    return rel(base, daemon.get("state_dir", STATE_DIR)) / "bluegreen.sock"


def control_socket(config: Path) -> Path | None:
    """The socket a config's daemon listens on; None when the file cannot say it plainly (missing,
    not TOML, a key of the wrong type): then the caller loads the whole config, which names the
    problem."""
    tomllib = toml()
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict) or not all(isinstance(daemon.get(k, ""), str) for k in ("socket", "state_dir")):
        return None
    if "state_dir" in daemon and not daemon["state_dir"]:
        return None
    return socket_path(daemon, config.absolute().parent)
