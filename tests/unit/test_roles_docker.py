"""docker + stack: repository with signed-by keyring, daemon.json, one validated unit per project."""

from __future__ import annotations

import json
from pathlib import Path

from roles.docker import DAEMON_JSON, docker
from roles.stack import render_unit
from tests.support import deploy_validators as v
from tests.support.deploy_fake import LIVE_HOST, run_deploys

UBUNTU = {
    **LIVE_HOST,
    "os-release": ["NAME=Ubuntu", "ID=ubuntu", "VERSION_ID=22.04", "VERSION_CODENAME=jammy"],
    "dpkg --print-architecture": ["amd64"],
}


def test_docker_ce_repository_uses_a_keyring_not_apt_key() -> None:
    (r,) = run_deploys("prod", [docker]).values()
    sources = r.files["/etc/apt/sources.list.d/docker.sources"]
    assert "Signed-By: /etc/apt/keyrings/docker.asc" in sources
    assert not any("apt-key" in c for c in r.commands)
    assert any("docker-compose-plugin" in c for c in r.commands)
    assert any("9DC858229FC7DD38854AE2D88D81803C0EBFCD88" in c for c in r.commands)


def test_lab_uses_debian_packages() -> None:
    (r,) = run_deploys("lab", [docker]).values()
    assert any("docker.io docker-compose" in c for c in r.commands)
    assert "/etc/apt/sources.list.d/docker.sources" not in r.files


def test_daemon_json_rotates_logs_and_live_restores() -> None:
    (r,) = run_deploys("prod", [docker]).values()
    conf = json.loads(r.files[DAEMON_JSON])
    assert conf["live-restore"] is True
    assert conf["log-driver"] == "json-file" and conf["log-opts"]["max-file"] == "5"


def test_units_for_both_compose_flavours_validate(tmp_path: Path) -> None:
    units = {
        "telemetry-emqx.service": render_unit("emqx", "/srv/telemetry/emqx", "docker-ce"),
        "telemetry-timescaledb.service": render_unit("timescaledb", "/srv/telemetry/timescaledb", "debian"),
    }
    v.systemd_verify_ok(units, tmp_path)
    unit = units["telemetry-emqx.service"]
    for line in (
        "Type=oneshot",
        "RemainAfterExit=yes",
        "Requires=docker.service",
        "ExecStart=/usr/bin/docker compose --project-name emqx up -d --wait --remove-orphans",
        "ExecStop=/usr/bin/docker compose --project-name emqx down",
    ):
        assert line in unit
    assert "After=docker.service" in unit
