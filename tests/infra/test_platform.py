"""The platform's pieces on a deployed host: certificates, compose projects, log rotation.

Expectations come from the roles' own functions and the inventory's group data (the deploy's inputs),
never from constants repeated here.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from roles import broker_emqx, database_timescaledb
from roles.docker import compose_command
from roles.logrotate import CONFIG as LOGROTATE_CONFIG
from roles.logrotate import context as logrotate_context
from roles.logrotate import render_config as render_logrotate
from roles.nginx import cert_files
from roles.stack import unit_name
from tools.lab.inventory import InventoryHost

# The health check warns below 21 days (issue 7); a deployed host must be clear of that.
CERT_MIN_DAYS = 21
COMPOSE_PROJECTS = {"broker_emqx": broker_emqx.PROJECT, "database_timescaledb": database_timescaledb.PROJECT}


def certificates(expected: InventoryHost) -> list[str]:
    data = expected.data
    paths = []
    if "nginx" in expected.roles:
        paths += [cert_files(str(data["nginx_tls_dir"]), kind)["fullchain"] for kind in ("ecdsa", "rsa")]
    if {"broker_mosquitto", "broker_emqx"} & set(expected.roles):
        paths.append(str(data["tls_cert_file"]))
    return paths


def test_certificates_present_and_not_expiring_soon(host: Any, expected: InventoryHost) -> None:
    paths = certificates(expected)
    if not paths:
        pytest.skip("no TLS service on this host")
    problems = []
    for path in paths:
        # -checkend: exit 1 if the certificate expires within that many seconds.
        check = host.run(f"openssl x509 -noout -checkend {CERT_MIN_DAYS * 86400} -in {shlex.quote(path)}")
        if check.rc != 0:
            problems.append(f"{path}: {check.stdout.strip() or check.stderr.strip()}")
    assert problems == [], f"certificates missing or expiring within {CERT_MIN_DAYS} days: {problems}"


def test_compose_projects_valid_on_the_host(host: Any, expected: InventoryHost) -> None:
    projects = [COMPOSE_PROJECTS[r] for r in expected.roles if r in COMPOSE_PROJECTS]
    if not projects:
        pytest.skip("no compose project on this host (apt backends)")
    compose = compose_command(str(expected.data["docker_source"]))
    for project in projects:
        directory = f"{expected.data['compose_root']}/{project}"
        assert host.file(f"{directory}/compose.yaml").is_file, f"{directory}/compose.yaml missing"
        check = host.run(f"cd {shlex.quote(directory)} && {compose} --project-name {project} config -q")
        assert check.rc == 0, f"{project}: {check.stderr}"
        assert host.service(unit_name(project)).is_enabled


def test_logrotate_config_is_the_rendered_one_and_accepted(host: Any, data: dict[str, Any]) -> None:
    config = host.file(LOGROTATE_CONFIG)
    assert config.exists, f"{LOGROTATE_CONFIG} missing"
    wanted = render_logrotate(logrotate_context(data))
    assert config.content_string == wanted
    assert (config.mode, config.user) == (0o644, "root")
    # -d: debug (dry run): parses the file and reports errors without rotating anything.
    check = host.run(f"logrotate -d {LOGROTATE_CONFIG}")
    assert check.rc == 0 and "error" not in check.stderr.lower(), check.stderr
