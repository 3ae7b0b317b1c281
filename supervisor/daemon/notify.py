"""systemd's notify protocol (sd_notify(3)), for `Type=notify` units: READY=1 once the daemon
serves, STATUS= with what it does (the phase of a running swap), STOPPING=1 at shutdown, and
WATCHDOG=1 pings when the unit sets WatchdogSec= (WATCHDOG_USEC).

No libsystemd: one datagram per message to $NOTIFY_SOCKET (a path, or "@name" for the abstract
namespace). Without NOTIFY_SOCKET every call does nothing, so the same daemon runs under any
service manager, or none.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("bluegreen")


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):  # the pings are meant for us
            self.watchdog_usec = int(usec)
        self.failed = False
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two pings: half the unit's WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str) -> None:
        if not self.address:
            return
        data = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(data, self.address)
            self.failed = False
        except OSError as e:
            if not self.failed:  # said once, not at every ping
                log.warning("cannot notify systemd on %s: %s", self.address.replace("\0", "@"), e)
            self.failed = True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(STATUS=status)

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping")

    def ping(self) -> None:
        self.send(WATCHDOG="1")
