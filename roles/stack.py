"""One systemd unit per compose project: Type=oneshot + RemainAfterExit, `up -d --wait` / `down`.

Compose roles (broker_emqx, database_timescaledb) call :func:`compose_project` from their own
``activate`` so the unit restarts exactly when their files changed.
"""

from __future__ import annotations

from collections.abc import Callable

from roles._base import Role, render
from roles.docker import compose_command


def unit_name(project: str) -> str:
    return f"telemetry-{project}.service"


def render_unit(project: str, directory: str, docker_source: str) -> str:
    compose = compose_command(docker_source)
    binary, *rest = compose.split()
    return render(
        "stack/compose-project.service.j2",
        project=project,
        unit=unit_name(project),
        directory=directory,
        compose=" ".join([f"/usr/bin/{binary}", *rest]),
        # Compose v1 (Debian 12's docker-compose) has no --wait; v2 waits for healthchecks.
        wait="--wait " if docker_source == "docker-ce" else "",
    )


def compose_project(role: Role, project: str, directory: str, restart_if: Callable[[], bool]) -> None:
    """Install the project's unit; (re)start it when the unit or the project's files changed."""
    role.put(
        render_unit(project, directory, role.data("docker_source")),
        f"/etc/systemd/system/{unit_name(project)}",
        key="unit",
    )
    role.daemon_reload(_if=role.changed("unit"))
    role.service(unit_name(project), restart_if=role.any_of(restart_if, role.changed("unit")))
