"""Every error bluegreen reports, with the stable code that clients and scripts match on.

    BluegreenError                 (code)
    ├── ConfigError                config          bad or missing configuration
    ├── RequestError               bad_request     a malformed request on the control socket
    ├── Busy                       busy            a swap is already running
    ├── NotReadyYet                starting        the daemon has no active slot yet
    ├── BuildError                 build_invalid   the build path does not exist / is no directory
    ├── PortInUse                  port_in_use     a foreign process holds the standby port (or nginx.listen)
    ├── AppError                   app_exited      the app process died (at start, before ready, after the switch)
    │   │                          not_ready       the readiness check never passed in time
    │   │                          start_failed    the command could not be executed at all
    │   └── AppDied                app_exited      the new build died while the old one still ran (preview, rollout
    │                                              step, drain, watch, after_switch): traffic went back at once
    ├── ChecksFailed               checks_failed   a smoke check ([[release.checks]]) failed on the standby
    ├── HookFailed                 hook_failed     a hook ([hooks]) failed, timed out or could not run
    ├── RolloutAborted             rollout_aborted a rollout step judged the new build unhealthy: everyone is back on the old
    │                              rollout_unavailable  a rollout needs the runtime switch
    │                              (a step that reaches no verdict within rollout.step_timeout is aborted too)
    ├── Aborted                    aborted         a paused swap was aborted (bluegreen abort, the active build died)
    │                              pause_timeout   a paused swap saw no promote or abort within release.pause_timeout
    ├── NginxError                 nginx_test_failed      `nginx -t` rejected the config
    │                              nginx_reload_failed    the reload was not confirmed
    │                              nginx_down             the master is not running
    │                              nginx_leftover         a master from an earlier run holds the prefix
    │                              upstream_write_failed  the upstream file could not be written
    │                              handlers_missing       nginx does not include nginx.lua_handlers_file
    │                              watch_failed           a watch could not read nginx's counters (traffic went back)
    ├── StateError                 state_write_failed     state.json could not be written
    │                              state_invalid          state.json is corrupt
    ├── Unreachable                unreachable     (client side) no daemon answers on the socket
    ├── LogsError                  no_log          (client side) `bluegreen logs` names a log that does not exist yet
    └── BluegreenError itself      locked          another daemon holds the state dir
                                   socket_in_use   another daemon answers on daemon.socket
                                   forbidden       the socket peer is not allowed
                                   no_previous     rollback with nothing to roll back to
                                   no_swap         cancel with no swap running
                                   not_paused      promote or abort with no swap paused; resume with no pause
                                   cannot_hold     pause or resume where nothing is held (reload switch, not HTTP)
                                   too_late        cancel after the switch
                                   cancelled       the swap was cancelled
                                   interrupted     (history, status) the daemon was killed mid-swap; the next one undid it
                                   shutting_down   the daemon stopped while serving the request
                                   internal        a bug: see the daemon log

A failed swap's error also carries `traffic`: "unchanged", "restored" or "moved".
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


class AppDied(AppError):
    """The new build died after the switch, while the old one was still draining."""


class ChecksFailed(BluegreenError):
    code = "checks_failed"


class HookFailed(BluegreenError):
    code = "hook_failed"


class RolloutAborted(BluegreenError):
    code = "rollout_aborted"


class Aborted(BluegreenError):
    code = "aborted"


class NginxError(BluegreenError):
    code = "nginx_reload_failed"


class StateError(BluegreenError):
    code = "state_write_failed"


class Unreachable(BluegreenError):
    code = "unreachable"


class LogsError(BluegreenError):
    """`bluegreen logs` has nothing to show (a slot that never ran, no such log yet)."""

    code = "no_log"
