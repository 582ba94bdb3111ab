"""logrotate rules for the log files the platform's own scripts write (templates/logrotate/)."""

from __future__ import annotations

import re
from typing import Any

from pyinfra.operations import apt, files

from roles._base import Role, RoleError, render, role_deploy

CONFIG = "/etc/logrotate.d/telemetry"
_SIZE = re.compile(r"^\d+[kMG]?$")


def render_config(ctx: dict[str, Any]) -> str:
    return render("logrotate/telemetry.j2", **ctx)


def context(data: Any) -> dict[str, Any]:
    """Template context from group data (also what tests/infra expects on a deployed host)."""
    size = str(data.get("logrotate_max_size"))
    if not _SIZE.match(size):
        raise RoleError(f"logrotate: logrotate_max_size {size!r} must look like 50M, 500k or 1G")
    keep = int(data.get("logrotate_keep"))
    if keep < 1:
        raise RoleError(f"logrotate: logrotate_keep must be at least 1, not {keep}")
    return {"log_dir": str(data.get("logrotate_log_dir")).rstrip("/"), "max_size": size, "keep": keep}


class Logrotate(Role):
    name = "logrotate"

    def context(self) -> dict[str, Any]:
        return context(self.host.data)

    def install(self) -> None:
        apt.packages(name="logrotate: logrotate", packages=["logrotate"], no_recommends=True)
        files.directory(name="logrotate: log directory", path=str(self.data("logrotate_log_dir")), mode="0755")

    def configure(self) -> None:
        # Debian runs logrotate daily (logrotate.timer or cron.daily): nothing to activate.
        self.put(render_config(self.context()), CONFIG, key="config")


logrotate = role_deploy(Logrotate)
