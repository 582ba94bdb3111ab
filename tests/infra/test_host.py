"""The host base and the services on it, checked read-only against the inventory's group data."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from roles import ingest, monitoring, ops
from roles.base import FIREWALL_SCRIPT, SSHD_DROPIN
from roles.broker_mosquitto import DB_PASSWORD_FILE
from roles.docker import DAEMON_JSON, daemon_json
from tools.lab.inventory import InventoryHost

# sshd -T prints the canonical spelling of some values.
SSHD_CANONICAL = {"prohibit-password": "without-password"}
LOOPBACK = {"127.0.0.1", "::1"}
# Services systemd itself skips in containers (ConditionVirtualization=!container).
CONTAINER_SKIPPED_UNITS = {"systemd-timesyncd"}


def expected_packages(expected: InventoryHost) -> list[str]:
    data = expected.data
    packages = [*data["base_packages"], "openssh-server", "ufw", "fail2ban", "unattended-upgrades", "tzdata"]
    if "docker" in expected.roles:
        if data["docker_source"] == "debian":
            packages += ["docker.io", "docker-compose"]
        else:
            packages += ["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"]
    if "database_postgresql" in expected.roles:
        packages.append(f"postgresql-{data['postgresql_version']}")
    if "broker_mosquitto" in expected.roles:
        packages.append("mosquitto")
    if "nginx" in expected.roles:
        packages.append("nginx")
    if "certbot" in expected.roles:
        packages.append("certbot")
    if "ingest_package" in expected.roles:
        packages.append("python3-venv")
    if "monitoring" in expected.roles:
        packages += monitoring.PACKAGES
        if "databases" in expected.groups:
            packages.append(monitoring.POSTGRES_PACKAGE)
    if "ops" in expected.roles:
        packages.append("cron")
    return sorted(set(packages))


def test_packages_installed(host: Any, expected: InventoryHost) -> None:
    missing = [p for p in expected_packages(expected) if not host.package(p).is_installed]
    assert missing == []


def test_admin_user(host: Any, data: dict[str, Any]) -> None:
    admin = host.user(data["admin_user"])
    assert admin.exists
    assert admin.shell == "/bin/bash"
    assert "sudo" in admin.groups
    assert host.file(admin.home).is_directory
    sudoers = host.file(f"/etc/sudoers.d/90-{data['admin_user']}")
    assert (sudoers.mode, sudoers.user, sudoers.group) == (0o440, "root", "root")
    keys = host.file(f"{admin.home}/.ssh/authorized_keys")
    wanted = sorted(k.strip() for k in data["admin_ssh_keys"])
    present = sorted(line.strip() for line in keys.content_string.splitlines() if line.strip()) if keys.exists else []
    assert present == wanted


def test_sshd_effective_config(host: Any, data: dict[str, Any]) -> None:
    assert host.file(SSHD_DROPIN).exists
    out = host.check_output("sshd -T")
    effective: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        effective.setdefault(key, []).append(value)
    root = str(data["ssh_permit_root_login"])
    assert effective["port"] == [str(data["sshd_port"])]
    assert effective["permitrootlogin"] == [SSHD_CANONICAL.get(root, root)]
    assert effective["passwordauthentication"] == ["no"]
    assert effective["kbdinteractiveauthentication"] == ["no"]
    assert effective["permitemptypasswords"] == ["no"]
    assert effective["pubkeyauthentication"] == ["yes"]
    assert effective["x11forwarding"] == ["no"]
    assert effective["maxauthtries"] == ["3"]


def _ufw_rules(host: Any) -> tuple[str, list[tuple[int, str]]]:
    out = host.check_output("ufw status verbose")
    rules = []
    for line in out.splitlines():
        m = re.match(r"^(\d+)/tcp\s+ALLOW IN\s+(\S+)", line)
        if m:
            rules.append((int(m.group(1)), m.group(2)))
    return out, rules


def test_firewall_default_deny_and_only_the_inventorys_ports(host: Any, expected: InventoryHost) -> None:
    data = expected.data
    assert host.file(FIREWALL_SCRIPT).mode == 0o755
    out, rules = _ufw_rules(host)
    assert "Status: active" in out
    assert "Default: deny (incoming)" in out
    ssh_sources = list(data["ssh_allowed_from"]) or ["Anywhere"]
    wanted = {(int(data["sshd_port"]), src) for src in ssh_sources}
    wanted |= {(port, "Anywhere") for port in expected.public_ports}
    wanted |= {(port, source) for source, port in expected.peer_rules}
    assert set(rules) == wanted


def test_docker_runs_with_the_rendered_daemon_json(host: Any, data: dict[str, Any], expected: InventoryHost) -> None:
    if "docker" not in expected.roles:
        pytest.skip("no docker role on this host")
    rendered = daemon_json(str(data["docker_log_max_size"]), int(data["docker_log_max_file"]))
    assert json.loads(host.file(DAEMON_JSON).content_string) == json.loads(rendered)
    # The running daemon took it: its effective logging driver and live-restore match the file.
    info = json.loads(host.check_output("docker info --format '{{json .}}'"))
    assert info["LoggingDriver"] == json.loads(rendered)["log-driver"]
    assert info["LiveRestoreEnabled"] is json.loads(rendered)["live-restore"]


@pytest.fixture(scope="module")
def units(expected: InventoryHost) -> list[str]:
    return expected.units


def test_units_enabled_and_active(host: Any, units: list[str], in_container: bool) -> None:
    failures = []
    for unit in units:
        if in_container and unit in CONTAINER_SKIPPED_UNITS:
            continue  # systemd skips it in containers by design; a real host runs it
        service = host.service(unit)
        if not service.is_enabled or not service.is_running:
            failures.append(f"{unit}: enabled={service.is_enabled} running={service.is_running}")
    assert failures == []


def _listeners(host: Any) -> list[tuple[str, int]]:
    out = host.check_output("ss -Htln")
    result = []
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        result.append((address.strip("[]").split("%")[0], int(port)))
    return result


def test_listening_sockets_and_bind_addresses(host: Any, expected: InventoryHost) -> None:
    data = expected.data
    listeners = _listeners(host)
    ports = {port for _, port in listeners}
    public = {addr for addr, port in listeners if addr not in LOOPBACK}
    assert int(data["sshd_port"]) in ports
    # Public services listen where the firewall lets devices in.
    public_wanted = [p for p in expected.public_ports if p != 80 or "nginx" in expected.roles]
    missing = [p for p in public_wanted if p not in ports]
    assert missing == [], f"public ports with nothing listening: {missing}"
    # Private services: only on loopback (or the configured database address).
    private = {}
    if "broker_mosquitto" in expected.roles:
        private[int(data["mqtt_loopback_port"])] = {"127.0.0.1"}
    if "database_postgresql" in expected.roles:
        private[int(data["database_port"])] = {str(data["database_listen_address"])} | (
            LOOPBACK if data["database_listen_address"] == "127.0.0.1" else set()
        )
    for port, allowed in private.items():
        bound = {addr for addr, p in listeners if p == port}
        assert bound, f"nothing listens on {port}"
        assert bound <= (allowed | {"::1"}), f"port {port} bound to {bound}, allowed {allowed}"
    # Anything reachable from outside must be a port the inventory opens (or SSH).
    allowed_public = {int(data["sshd_port"]), *expected.public_ports, *(p for _, p in expected.peer_rules)}
    exposed = sorted({port for addr, port in listeners if addr not in LOOPBACK and port not in allowed_public})
    assert exposed == [], f"listening beyond loopback without a firewall rule: {exposed} (addresses {public})"


def secret_files(expected: InventoryHost) -> dict[str, tuple[int, str, str]]:
    """path -> (mode, owner, group) the roles write secrets with."""
    data = expected.data
    files: dict[str, tuple[int, str, str]] = {f"/etc/sudoers.d/90-{data['admin_user']}": (0o440, "root", "root")}
    if "database_postgresql" in expected.roles:
        files["/etc/telemetry/database-roles.sql"] = (0o600, "postgres", "postgres")
    if "ingest_account" in expected.roles:
        group = str(data["ingest_service_user"])
        for name in ingest.SECRET_FILES:
            files[f"{data['ingest_secrets_dir']}/{name}"] = (0o640, "root", group)
    if "ops" in expected.roles and "databases" in expected.groups:
        files[ops.KEY_FILE] = (0o600, "root", "root")
        files[ops.DB_PASSWORD_FILE] = (0o600, "root", "root")
    if "broker_mosquitto" in expected.roles:
        files[DB_PASSWORD_FILE] = (0o600, "root", "root")
        files[str(data["mosquitto_passwd_file"])] = (0o640, "root", "mosquitto")
        files[str(data["mosquitto_acl_file"])] = (0o640, "root", "mosquitto")
    return files


def test_secret_files_modes_and_owners(host: Any, expected: InventoryHost) -> None:
    wrong = []
    for path, (mode, user, group) in secret_files(expected).items():
        f = host.file(path)
        if not f.exists:
            wrong.append(f"{path}: missing")
        elif (f.mode, f.user, f.group) != (mode, user, group):
            wrong.append(f"{path}: {oct(f.mode)} {f.user}:{f.group}, want {oct(mode)} {user}:{group}")
    assert wrong == []


def test_tls_private_key_is_not_world_readable(host: Any, data: dict[str, Any], expected: InventoryHost) -> None:
    if "broker_mosquitto" not in expected.roles and "broker_emqx" not in expected.roles:
        pytest.skip("no broker on this host")
    key = host.file(str(data["tls_key_file"]))
    assert key.exists, f"{data['tls_key_file']} missing: the broker cannot serve TLS"
    assert key.mode & 0o007 == 0
