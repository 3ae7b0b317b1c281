"""Every error bluegreen reports, with the stable code that clients and scripts match on.

    BluegreenError                 (code)
    ├── ConfigError                config          bad or missing configuration
    ├── RequestError               bad_request     a malformed request on the control socket
    ├── Busy                       busy            a swap is already running
    ├── NotReadyYet                starting        the daemon has no active slot yet
    ├── BuildError                 build_invalid   the build path does not exist / is no directory
    ├── PortInUse                  port_in_use     a foreign process holds the standby port
    ├── AppError                   app_exited      the app process died (at start, or before ready)
    │                              not_ready       the readiness check never passed in time
    │                              start_failed    the command could not be executed at all
    ├── NginxError                 nginx_test_failed    `nginx -t` rejected the config
    │                              nginx_reload_failed  the reload was not confirmed
    │                              nginx_down           the master is not running
    ├── StateError                 state_write_failed   state.json could not be written
    └── Unreachable                unreachable     (client side) no daemon answers on the socket
"""

from __future__ import annotations

from typing import Any


class BluegreenError(Exception):
    """An error with a stable `code` (for scripts) and a human `message` (for people)."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


class ConfigError(BluegreenError):
    code = "config"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RequestError(BluegreenError):
    code = "bad_request"


class Busy(BluegreenError):
    code = "busy"


class NotReadyYet(BluegreenError):
    code = "starting"


class BuildError(BluegreenError):
    code = "build_invalid"


class PortInUse(BluegreenError):
    code = "port_in_use"


class AppError(BluegreenError):
    code = "app_exited"


class NginxError(BluegreenError):
    code = "nginx_reload_failed"


class StateError(BluegreenError):
    code = "state_write_failed"


class Unreachable(BluegreenError):
    code = "unreachable"
