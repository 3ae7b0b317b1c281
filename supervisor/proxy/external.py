"""The user's own nginx (nginx.mode external): its master found by its pid file, tested and
reloaded with the configured commands."""

from __future__ import annotations

import psutil

from ..config.schema import Config
from ..errors import NginxError
from ..processes import procs
from .master import ErrorLog, run_command


class ExternalMaster:
    """A system nginx the user runs; its main config includes our upstream file."""

    def __init__(self, config: Config) -> None:
        assert config.nginx.upstream_file and config.nginx.pid_file
        self.n = config.nginx
        self.upstream_path = config.nginx.upstream_file
        self.pid_file = config.nginx.pid_file
        self.log = ErrorLog(config.nginx.error_log)

    def test_argv(self) -> list[str]:
        return list(self.n.test_command)

    def master_pid(self) -> int:
        try:
            text = self.pid_file.read_text().strip()
        except OSError as e:
            raise NginxError(
                f"cannot read nginx's pid file {self.pid_file}: {e.strerror}; is nginx running? "
                "(check nginx.pid_file matches the `pid` directive)",
                code="nginx_down",
            ) from e
        if not text.isdigit():
            raise NginxError(
                f"nginx's pid file {self.pid_file} is empty or invalid ({text[:20]!r}); is nginx running? "
                "(`nginx -t` leaves an empty pid file when no master runs)",
                code="nginx_down",
            )
        pid = int(text)
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:
            name = ""
        if "nginx" not in name or not procs.alive(pid):
            raise NginxError(
                f"nginx's pid file {self.pid_file} names pid {pid}, which is not a running nginx (stale pid file); "
                "start nginx, or fix nginx.pid_file",
                code="nginx_down",
            )
        return pid

    async def send_reload(self, master: int) -> None:
        await run_command(list(self.n.reload_command), "nginx reload", "nginx_reload_failed",
                          timeout=self.n.reload_timeout)
