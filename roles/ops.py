"""Operations on the host: the scripts' configuration, their cron jobs, the boot check and the
shutdown order (README: Operations, "On the host: configuration, cron, boot and shutdown").

What this role writes, and what it leaves to others:

- ``/etc/telemetry/ops.yml`` for ``scripts/`` (backup, restore, healthcheck, runbooks, boot check),
  rendered from group data; the secrets it points at are files beside it (0600 root): the backup key
  from the vault's ``backup_encryption_key`` and the database superuser's password.
- ``/etc/cron.d/telemetry``: backup daily, health check every 2 minutes, restore drill weekly, Docker
  cleanup daily. The jobs call the console scripts of the host virtualenv the ingest role installs.
- ``telemetry-boot-check.service``: once per boot, after the stack's units, waits for database,
  broker and ingest health and restarts what stays unhealthy (``scripts/boot_check.py``).
- Drop-ins for units that Debian or roles/stack.py own: systemd stops in the reverse of the start
  order, so "the broker starts after the database" is also "the broker stops before it" (the ingest
  role's own unit starts after both, so it stops first and flushes); the database's stop runs a
  CHECKPOINT first, so the shutdown checkpoint it must then write is short.

Backups and the restore drill log in as the database superuser ``postgres`` over TCP on loopback with
the vault's ``db_superuser_password``: ``pg_dump`` of everything and the drill's CREATE DATABASE,
``CREATE EXTENSION timescaledb`` and ``pg_restore`` with owners need a superuser, and the scripts run as
root from cron, which the apt cluster's ``peer`` line for ``postgres`` would refuse. The TimescaleDB
image sets that password at initialisation; on the apt backend this role sets it (only when a login
with the file's password fails, or the vault changed it).

Mosquitto's health check is a ``$SYS`` round trip, which needs an account allowed to read ``$SYS``
(``#`` never matches it): this role keeps one (``health_mqtt_user``, password generated on the host,
``provision ensure-service`` guarded by a ``--check`` fact) and re-exports Mosquitto's files when it
changed it. EMQX's status API needs no account.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server, systemd

from roles._base import Role, RoleError, render, role_deploy
from roles.broker_emqx import fqdn
from roles.secrets import secrets_for
from roles.stack import render_unit, unit_name

OPS_CONFIG = "/etc/telemetry/ops.yml"
# Secret files the scripts read (0600 root): a folder of this role's own, so no other role's
# directory modes are touched.
SECRETS_DIR = "/etc/telemetry/ops"
DB_PASSWORD_FILE = f"{SECRETS_DIR}/db-superuser.password"
MQTT_HEALTH_PASSWORD_FILE = f"{SECRETS_DIR}/mqtt-health.password"
SMTP_PASSWORD_FILE = f"{SECRETS_DIR}/smtp.password"
# Outside every backed-up path: an archive must never carry the key that decrypts it.
KEY_FILE = "/root/telemetry-backup.key"
CRON_FILE = "/etc/cron.d/telemetry"
# Console scripts ([project.scripts] in pyproject.toml) in the host virtualenv the ingest role
# installs, beside ingest_bin.
SCRIPTS = {
    "backup": "telemetry-backup",
    "restore": "telemetry-restore",
    "healthcheck": "telemetry-healthcheck",
    "boot_check": "telemetry-boot-check",
}
DOCKER = "/usr/bin/docker"
STATE_DIR = "/var/lib/telemetry"
BOOT_UNIT = "telemetry-boot-check.service"
INGEST_UNIT = "telemetry-ingest.service"
ORDER_DROPIN = "telemetry-order.conf"
CHECKPOINT_DROPIN = "telemetry-checkpoint.conf"
SYSTEMD_DIR = "/etc/systemd/system"
# Debian's postgresql@.service stop command (postgresql-common 248, Debian 12), re-listed after the
# CHECKPOINT because an ExecStop= in a drop-in appends; tests compare it with the packaged unit.
DEBIAN_PG_EXECSTOP = "/usr/bin/pg_ctlcluster --skip-systemctl-redirect -m fast %i stop"
# A CHECKPOINT that takes longer than this is cut short: the stop then proceeds (the shutdown
# checkpoint still writes everything; it just takes longer).
CHECKPOINT_TIMEOUT_S = 600
BOOT_CHECK_INTERVAL_S = 5
# What scripts/healthcheck.py subscribes to for Mosquitto's $SYS round trip (`#` never matches $SYS).
HEALTH_TOPIC = "$SYS/broker/uptime"

_EMAIL = re.compile(r"^[^@\s,]+@[^@\s,]+\.[^@\s,]+$")
_URL = re.compile(r"^https?://[^\s]+$")
_SMTP_HOST = re.compile(r"^[A-Za-z0-9.\-]+$|^[0-9A-Fa-f:]+$")
_RSYNC_TARGET = re.compile(r"^[A-Za-z0-9._@:/~+-]+$")
_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
# What a password may contain to travel through printf into SQL (README: secrets' character set).
_SQL_SAFE = re.compile(r"^[A-Za-z0-9._~+/=@%-]+$")


class PostgresPasswordLogin(FactBase[bool]):
    """Whether ``postgres`` logs in over TCP with the password in ``password_file`` (apt backend).
    The password travels in PGPASSWORD, visible to root only, never on a command line."""

    def command(self, address: str, port: int, password_file: str) -> str:
        return (
            f'if [ -r {password_file} ] && PGPASSWORD="$(cat {password_file})" psql -X -q -w -h {address} '
            f"-p {port} -U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1; "
            "then echo login=ok; else echo login=failed; fi"
        )

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "login=ok" for line in output)


class MqttHealthAccount(FactBase[str]):
    """The Mosquitto health account in the database: "current", "update", or "unknown" (provision CLI
    not installed yet, password files missing, database not answering). ``ensure-service --check``
    writes nothing."""

    def command(self, provision: str, account: str, password_file: str, hash_spec: str, dsn: str) -> str:
        return (
            f"if [ -x {provision} ] && [ -s {password_file} ] && [ -r {DB_PASSWORD_FILE} ]; then "
            f"{ensure_service_command(provision, account, password_file, hash_spec, dsn)} --check --json "
            "2>/dev/null; fi; true"
        )

    def process(self, output: list[str]) -> str:
        for line in output:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and "up_to_date" in data:
                return "current" if data["up_to_date"] else "update"
        return "unknown"


def ensure_service_command(provision: str, account: str, password_file: str, hash_spec: str, dsn: str) -> str:
    """The account may read the one topic the health check subscribes to, nothing else."""
    return (
        f"{provision} ensure-service {account} --account-password-file {password_file} "
        f"--subscribe '{HEALTH_TOPIC}' --hash '{hash_spec}' --dsn '{dsn}' --password-file {DB_PASSWORD_FILE}"
    )


@dataclass(frozen=True)
class Stack:
    """What of the platform runs on one host, and under which unit names."""

    database: str | None  # "postgresql" / "timescaledb"
    broker: str | None  # "mosquitto" / "emqx"
    ingest: bool
    web: bool
    docker: bool
    database_unit: str | None
    broker_unit: str | None


def stack_of(host: Host) -> Stack:
    from roles.plan import docker_roles, web_roles  # roles.plan imports this module

    groups = set(host.groups)
    database = str(host.data.get("database_backend")) if "databases" in groups else None
    broker = str(host.data.get("broker_backend")) if "brokers" in groups else None
    database_unit = {
        "postgresql": f"postgresql@{host.data.get('postgresql_version')}-main.service",
        "timescaledb": unit_name("timescaledb"),
    }.get(database or "")
    broker_unit = {"mosquitto": "mosquitto.service", "emqx": unit_name("emqx")}.get(broker or "")
    if database is not None and database_unit is None:
        raise RoleError(f"ops: unknown database_backend {database!r}")
    if broker is not None and broker_unit is None:
        raise RoleError(f"ops: unknown broker_backend {broker!r}")
    return Stack(
        database=database,
        broker=broker,
        ingest="ingest" in groups,
        web=bool(web_roles(host)),
        docker=bool(docker_roles(host)),
        database_unit=database_unit,
        broker_unit=broker_unit,
    )


def ops_roles(host: Host) -> list[Callable[[], Any]]:
    """For roles.plan: hosts running any piece of the stack get the operations side."""
    return [ops] if {"databases", "brokers", "ingest"} & set(host.groups) else []


def schedule(host_name: str) -> int:
    """The minute of this host's daily jobs: derived from the fqdn, so hosts sharing a backup target
    or an SMTP relay do not all start at once, yet identical on every deploy (zero-change re-runs)."""
    return int.from_bytes(hashlib.sha256(f"ops:{host_name}".encode()).digest()[:8], "big") % 60


def container_name(project: str, service: str, docker_source: str) -> str:
    """The name compose gives a project's only container: v2 joins with "-", v1 with "_"."""
    sep = "-" if docker_source == "docker-ce" else "_"
    return sep.join([project, service, "1"])


def database_address(listen: str) -> str:
    """Where a client on the database host reaches it over TCP: loopback when the server listens
    there (or everywhere), else the first listed address (which database_allowed_networks must admit)."""
    addresses = [a.strip() for a in listen.split(",") if a.strip()]
    if not addresses or {"127.0.0.1", "localhost", "*", "0.0.0.0"} & set(addresses):  # noqa: S104
        return "127.0.0.1"
    if {"::1", "::"} & set(addresses):
        return "::1"
    return addresses[0]


def backup_key_text(value: str) -> str:
    """The vault's key as the backup reads it (load_key: 64 hex characters or base64 of 32 bytes);
    refused here rather than by the first backup at 3 a.m."""
    text = value.strip()
    try:
        if len(text) == 64 and len(bytes.fromhex(text)) == 32:
            return text
    except ValueError:
        pass
    try:
        if len(base64.b64decode(text, validate=True)) == 32:
            return text
    except (binascii.Error, ValueError):
        pass
    raise RoleError("ops: backup_encryption_key must be 32 bytes as 64 hex characters (openssl rand -hex 32)")


def execstop_lines(unit_text: str) -> list[str]:
    return [line.removeprefix("ExecStop=") for line in unit_text.splitlines() if line.startswith("ExecStop=")]


class Ops(Role):
    name = "ops"

    # --- settings ---------------------------------------------------------------------------
    @property
    def stack(self) -> Stack:
        return stack_of(self.host)

    @property
    def scripts(self) -> dict[str, str]:
        # Beside the ingest CLI: one virtualenv holds every console script of the project.
        bindir = str(self.data("ingest_bin")).rsplit("/", 1)[0]
        return {name: f"{bindir}/{binary}" for name, binary in SCRIPTS.items()}

    @property
    def textfile_dir(self) -> str:
        # Node exporter's textfile collector (the monitoring section's setting): metrics of backup,
        # restore drill and health check.
        return str(self.data("node_exporter_textfile_dir")).rstrip("/")

    @property
    def log_dir(self) -> str:
        # The folder logrotate rotates (*.log): every script's log lands there.
        return str(self.data("logrotate_log_dir")).rstrip("/")

    def alert_emails(self) -> list[str]:
        value = self.data("alert_email")
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        emails = [str(e).strip() for e in items if str(e).strip()]
        for e in emails:
            if not _EMAIL.match(e):
                raise RoleError(f"ops: alert_email {e!r} is not an e-mail address")
        return emails

    def alerts(self) -> dict[str, Any]:
        """The monitoring section's settings (alert_*), so Alertmanager and the scripts notify alike."""
        out: dict[str, Any] = {}
        webhook = str(self.data("alert_webhook_url")).strip()
        if webhook:
            if not _URL.match(webhook):
                raise RoleError(f"ops: alert_webhook_url {webhook!r} must be an http(s) URL")
            out["webhook"] = webhook
        emails = self.alert_emails()
        if emails:
            host = str(self.data("alert_smtp_host"))
            if not _SMTP_HOST.match(host):
                raise RoleError(f"ops: alert_smtp_host {host!r} is not a host name or address")
            sender = str(self.data("alert_email_from")) or f"telemetry@{fqdn(self.host)}"
            if not _EMAIL.match(sender):
                raise RoleError(f"ops: alert_email_from {sender!r} is not an e-mail address")
            smtp: dict[str, Any] = {
                "host": host,
                "port": int(self.data("alert_smtp_port")),
                "starttls": bool(self.data("alert_smtp_starttls")),
                "from": sender,
                "to": emails,
            }
            if str(self.data("alert_smtp_username")):
                smtp["username"] = str(self.data("alert_smtp_username"))
                smtp["password_file"] = SMTP_PASSWORD_FILE
            out["smtp"] = smtp
        return out

    def threshold(self, key: str) -> int:
        value = int(self.data(key))
        if value <= 0:
            raise RoleError(f"ops: {key} must be positive, not {value}")
        return value

    def database_section(self) -> dict[str, Any]:
        address = database_address(str(self.data("database_listen_address")))
        return {
            # The superuser (see the module docstring); the password only in its file.
            "dsn": f"host={address} port={self.data('database_port')} dbname={self.data('database_name')} "
            "user=postgres",
            "password_file": DB_PASSWORD_FILE,
            # The host's client of the server's major: pg_dump must not be older than the server.
            "pg_bindir": f"/usr/lib/postgresql/{self.data('postgresql_version')}/bin",
        }

    def broker_section(self) -> dict[str, Any]:
        s = self.stack
        if s.broker == "emqx":
            d = f"{self.data('compose_root')}/emqx"
            return {
                "kind": "emqx",
                "container": container_name("emqx", "emqx", str(self.data("docker_source"))),
                "docker": DOCKER,
                "files": [f"{d}/compose.yaml", f"{d}/etc"],
            }
        return {
            "kind": "mosquitto",
            "files": ["/etc/mosquitto"],
            "persistence": "/var/lib/mosquitto/mosquitto.db",
        }

    def backup_paths(self) -> dict[str, list[str]]:
        """Everything to rebuild the host besides the database dump and broker state; each path must
        exist when the backup runs (a missing one fails it), so only what this host's roles create."""
        s = self.stack
        root = str(self.data("compose_root"))
        config = ["/etc/telemetry"]
        secrets: list[str] = []
        certs: list[str] = []
        if s.database == "postgresql":
            config.append(f"/etc/postgresql/{self.data('postgresql_version')}/main")
        elif s.database == "timescaledb":
            d = f"{root}/timescaledb"
            config += [f"{d}/compose.yaml", f"{d}/postgresql.conf", f"{d}/pg_hba.conf"]
            secrets += [f"{d}/postgres_password", f"{d}/roles.sql"]
        if s.broker == "emqx":
            secrets += [f"{root}/emqx/secrets.env", f"{root}/emqx/dashboard.env"]
        if s.web:
            certs += ["/etc/letsencrypt", str(self.data("nginx_tls_dir"))]
        out = {"config": config, "secrets": secrets, "certs": certs}
        return {k: v for k, v in out.items() if v}

    def backup_section(self) -> dict[str, Any]:
        daily, weekly = int(self.data("backup_keep_daily")), int(self.data("backup_keep_weekly"))
        if daily < 1 or weekly < 0:
            raise RoleError("ops: backup_keep_daily must be at least 1 and backup_keep_weekly at least 0")
        directory = str(self.data("backup_dir")).rstrip("/")
        if not _PATH.match(directory) or directory in ("", "/"):
            raise RoleError(f"ops: backup_dir {directory!r} must be an absolute path")
        out: dict[str, Any] = {
            "dir": directory,
            "key_file": KEY_FILE,
            "log_file": f"{self.log_dir}/backup.log",
            "textfile_dir": self.textfile_dir,
            "retention": {"daily": daily, "weekly": weekly},
            "paths": self.backup_paths(),
        }
        target = str(self.data("backup_offsite_target")).strip()
        if target:
            if not _RSYNC_TARGET.match(target):
                raise RoleError(f"ops: backup_offsite_target {target!r} must look like user@host:/path/")
            out["offsite"] = {"target": target}
            if ":" in target:
                for key in ("ssh_key", "known_hosts"):
                    path = str(self.data(f"backup_offsite_{key}"))
                    if not _PATH.match(path):
                        raise RoleError(f"ops: backup_offsite_{key} {path!r} must be an absolute path")
                    out["offsite"][key] = path
        return out

    def health_section(self) -> dict[str, Any]:
        s = self.stack
        out: dict[str, Any] = {
            "log_file": f"{self.log_dir}/healthcheck.log",
            "state_file": f"{STATE_DIR}/health-state.json",
            "cooldown_seconds": self.threshold("health_alert_cooldown_seconds"),
            "textfile_dir": self.textfile_dir,
            "disk": {
                "paths": ["/"],
                "warn": self.threshold("alert_disk_warn_percent"),
                "crit": self.threshold("alert_disk_crit_percent"),
            },
            "memory": {
                "warn": self.threshold("alert_memory_warn_percent"),
                "crit": self.threshold("alert_memory_crit_percent"),
            },
        }
        if s.database == "postgresql":
            out["disk"]["paths"].append("/var/lib/postgresql")
        elif s.database == "timescaledb":
            out["disk"]["paths"].append(f"{self.data('compose_root')}/timescaledb/data")
        if s.database is not None:
            out["backup"] = {"max_age_hours": self.threshold("alert_backup_max_age_hours")}
        broker = self.health_broker()
        if broker:
            out["broker"] = broker
        if s.ingest:
            out["ingest"] = {"url": f"http://{self.data('ingest_http_address')}/healthz", "timeout": 5}
        containers = []
        source = str(self.data("docker_source"))
        if s.database == "timescaledb":
            containers.append(container_name("timescaledb", "timescaledb", source))
        if s.broker == "emqx":
            containers.append(container_name("emqx", "emqx", source))
        if containers:
            out["docker"] = {"docker": DOCKER, "containers": containers}
        certs = []
        if s.web:
            tls = str(self.data("nginx_tls_dir")).rstrip("/")
            certs += [f"{tls}/ecdsa/fullchain.pem", f"{tls}/rsa/fullchain.pem"]
        if s.broker is not None:
            certs.append(str(self.data("tls_cert_file")))
        if certs:
            out["certificates"] = {
                "paths": certs,
                "warn_days": self.threshold("alert_cert_warn_days"),
                "crit_days": self.threshold("alert_cert_crit_days"),
            }
        return out

    @property
    def health_account(self) -> str:
        """The Mosquitto health account's name, or "" when there is none: it needs the database on this
        host (the account lives there, and Mosquitto's files are exported from it) and a name."""
        s = self.stack
        if s.broker == "mosquitto" and s.database is not None:
            return str(self.data("health_mqtt_user"))
        return ""

    def health_broker(self) -> dict[str, Any] | None:
        """EMQX: its status API (no account). Mosquitto: a ``$SYS`` round trip on the loopback listener
        with the health account, which this role provisions (see :meth:`ensure_health_account`)."""
        s = self.stack
        if s.broker == "emqx":
            return {"kind": "emqx", "url": f"http://127.0.0.1:{self.data('emqx_dashboard_port')}/api/v5/status"}
        if self.health_account:
            return {
                "kind": "mosquitto",
                "host": "127.0.0.1",
                "port": int(self.data("mqtt_loopback_port")),
                "tls": False,
                "username": self.health_account,
                "password_file": MQTT_HEALTH_PASSWORD_FILE,
                "timeout": 5,
            }
        return None

    def boot_check_section(self) -> dict[str, Any]:
        s = self.stack
        components: list[dict[str, Any]] = []
        # Dependency order: the broker authenticates against the database, ingest needs both.
        if s.database_unit:
            components.append({"name": "database", "unit": s.database_unit})
        if s.broker_unit:
            broker: dict[str, Any] = {"name": "broker", "unit": s.broker_unit}
            if self.health_broker() is None:
                # Without a health account a CONNACK (even "not authorised") shows the broker serves MQTT.
                broker["probe"] = {"host": "127.0.0.1", "port": int(self.data("mqtt_loopback_port"))}
            components.append(broker)
        if s.ingest:
            components.append({"name": "ingest", "unit": INGEST_UNIT})
        wait = self.threshold("boot_check_wait_seconds")
        restarts = int(self.data("boot_check_restarts"))
        if not 0 <= restarts <= 10:
            raise RoleError(f"ops: boot_check_restarts must be between 0 and 10, not {restarts}")
        return {
            "log_file": f"{self.log_dir}/boot-check.log",
            "wait_seconds": wait,
            "interval_seconds": BOOT_CHECK_INTERVAL_S,
            "restarts": restarts,
            "components": components,
        }

    def ops_settings(self) -> dict[str, Any]:
        """The whole of ops.yml as data (the template lays it out with comments)."""
        s = self.stack
        cfg: dict[str, Any] = {"log_file": f"{self.log_dir}/ops.log"}
        if s.database is not None:
            cfg["database"] = self.database_section()
            cfg["backup"] = self.backup_section()
        if s.broker is not None:
            cfg["broker"] = self.broker_section()
        cfg["alerts"] = self.alerts()
        cfg["health"] = self.health_section()
        cfg["boot_check"] = self.boot_check_section()
        cfg["runbook"] = {
            "log_file": f"{self.log_dir}/runbook.log",
            "ingest_unit": INGEST_UNIT.removesuffix(".service"),
        }
        return cfg

    # --- cron -----------------------------------------------------------------------------------
    def cron_context(self) -> dict[str, Any]:
        s = self.stack
        hour = int(self.data("backup_hour"))
        weekday = int(self.data("restore_drill_weekday"))
        if not 0 <= hour <= 23:
            raise RoleError(f"ops: backup_hour must be 0-23, not {hour}")
        if not 0 <= weekday <= 6:
            raise RoleError(f"ops: restore_drill_weekday must be 0-6 (0 = Sunday), not {weekday}")
        mailto = ",".join(self.alerts().get("smtp", {}).get("to", []))
        return {
            "config": OPS_CONFIG,
            "mailto": mailto,
            "minute": schedule(fqdn(self.host)),
            "backup_hour": hour,
            # After the backup: the drill restores the archive written that night.
            "drill_hour": (hour + 2) % 24,
            "drill_weekday": weekday,
            "cleanup_hour": (hour + 1) % 24,
            "backup": s.database is not None,
            "docker": s.docker,
            "docker_bin": DOCKER,
            "scripts": self.scripts,
            "log_dir": self.log_dir,
        }

    # --- units ------------------------------------------------------------------------------------
    def boot_unit(self) -> str:
        s = self.stack
        after = [u for u in (s.database_unit, s.broker_unit) if u]
        if s.ingest:
            after.append(INGEST_UNIT)
        if s.web:
            after.append("nginx.service")
        ctx = self.boot_check_section()
        # Each component may wait once, then once more after every restart; plus time to log.
        timeout = len(ctx["components"]) * (ctx["restarts"] + 1) * (ctx["wait_seconds"] + ctx["interval_seconds"]) + 60
        return render(
            "ops/telemetry-boot-check.service.j2",
            after=after,
            command=f"{self.scripts['boot_check']} --config {OPS_CONFIG}",
            timeout=timeout,
            log_file=ctx["log_file"],
        )

    def dropins(self) -> dict[str, str]:
        """``{path: content}`` of every drop-in this host gets."""
        s = self.stack
        out: dict[str, str] = {}
        if s.broker_unit and s.database_unit:
            out[f"{SYSTEMD_DIR}/{s.broker_unit}.d/{ORDER_DROPIN}"] = render(
                "ops/order.conf.j2", unit=s.broker_unit, after=[s.database_unit]
            )
        if s.database == "postgresql":
            version = self.data("postgresql_version")
            psql = f"/usr/lib/postgresql/{version}/bin/psql"
            checkpoint = (
                f"/usr/bin/timeout {CHECKPOINT_TIMEOUT_S} /usr/sbin/runuser -u postgres -- "
                f"{psql} -X -q -w -p {self.data('database_port')} -d postgres -c CHECKPOINT"
            )
            out[f"{SYSTEMD_DIR}/{s.database_unit}.d/{CHECKPOINT_DROPIN}"] = render(
                "ops/checkpoint.conf.j2", checkpoint=checkpoint, stop=[DEBIAN_PG_EXECSTOP], timeout_stop=None
            )
        elif s.database == "timescaledb":
            directory = f"{self.data('compose_root')}/timescaledb"
            stop = execstop_lines(render_unit("timescaledb", directory, str(self.data("docker_source"))))
            compose = stop[0].split(" --project-name ")[0]
            checkpoint = (
                f"/usr/bin/timeout {CHECKPOINT_TIMEOUT_S} {compose} --project-name timescaledb exec -T timescaledb "
                "psql -X -q -U postgres -d postgres -c CHECKPOINT"
            )
            out[f"{SYSTEMD_DIR}/{s.database_unit}.d/{CHECKPOINT_DROPIN}"] = render(
                "ops/checkpoint.conf.j2",
                checkpoint=checkpoint,
                stop=stop,
                # The unit has systemd's default 90 s: room for the checkpoint, then compose down.
                timeout_stop=CHECKPOINT_TIMEOUT_S + 300,
            )
        return out

    # --- stages -----------------------------------------------------------------------------------
    def install(self) -> None:
        packages = ["cron"]
        if self.stack.database is not None:
            # pg_dump/pg_restore/psql of the server's major on the host (the TimescaleDB server is in a container).
            packages.append(f"postgresql-client-{self.data('postgresql_version')}")
        apt.packages(name="ops: cron and database clients", packages=packages, no_recommends=True)
        for path, mode in (
            ("/etc/telemetry", "0755"),
            (SECRETS_DIR, "0700"),
            (self.log_dir, "0755"),
            (STATE_DIR, "0750"),
            (self.textfile_dir, "0755"),
        ):
            files.directory(name=f"ops: {path}", path=path, user="root", group="root", mode=mode)
        if self.stack.database is not None:
            directory = str(self.data("backup_dir"))
            files.directory(name=f"ops: {directory}", path=directory, user="root", group="root", mode="0700")
        if not self.host.get_fact(File, path=self.scripts["healthcheck"]):
            self.warn_once("the host virtualenv has no telemetry scripts yet (the ingest role installs them)")

    def configure(self) -> None:
        secrets = secrets_for(self.host)
        self.put(render("ops/ops.yml.j2", cfg=self.ops_settings()), OPS_CONFIG, key="config", mode="0640")
        if self.stack.database is not None:
            self.put(
                backup_key_text(secrets["backup_encryption_key"]) + "\n", KEY_FILE, key="key", mode="0600", secret=True
            )
            password = secrets["db_superuser_password"]
            if not _SQL_SAFE.match(password):
                raise RoleError("ops: db_superuser_password may only use letters, digits and ._~+/=@%-")
            self.put(password + "\n", DB_PASSWORD_FILE, key="dbpassword", mode="0600", secret=True)
        if self.health_account and not self.host.get_fact(File, path=MQTT_HEALTH_PASSWORD_FILE):
            # Generated once on the host: only this host's health check uses it, against its own broker.
            server.shell(
                name="ops: password of the MQTT health account",
                commands=[
                    f"umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {MQTT_HEALTH_PASSWORD_FILE}"
                ],
            )
        if "password_file" in self.alerts().get("smtp", {}):
            self.put(secrets["alert_smtp_password"] + "\n", SMTP_PASSWORD_FILE, key="smtp", mode="0600", secret=True)
        # cron re-reads /etc/cron.d on its own when a file's mtime changes: nothing to reload.
        self.put(render("ops/cron.j2", **self.cron_context()), CRON_FILE, key="cron")
        self.put(self.boot_unit(), f"{SYSTEMD_DIR}/{BOOT_UNIT}", key="unit")
        for path, content in self.dropins().items():
            self.put(content, path, key="unit")

    def activate(self) -> None:
        # Drop-ins act at the next stop/start: a daemon-reload is all they need, no restart.
        self.daemon_reload(_if=self.changed("unit"))
        if not self.has_systemd:
            self.warn_once(f"systemd is not PID 1 here: {BOOT_UNIT} is enabled on the first deploy to a live host")
            return
        # Enabled for the next boot, not started: it is a boot-time check, and a deploy that waits
        # minutes for services the same deploy is still converging would prove nothing.
        systemd.service(name=f"ops: {BOOT_UNIT} enabled", service=BOOT_UNIT, running=None, enabled=True)
        if self.stack.database == "postgresql":
            self.postgres_password()
        if self.health_account:
            self.ensure_health_account()

    def postgres_password(self) -> None:
        """The apt cluster's superuser gets the vault's password for the scripts' TCP login. Runs when
        that login fails (first deploy) or the vault's password changed; otherwise nothing."""
        address = database_address(str(self.data("database_listen_address")))
        port = int(self.data("database_port"))
        # printf is a shell builtin: the password goes through a pipe, never onto a command line.
        command = (
            f'printf "ALTER ROLE postgres PASSWORD \'%s\';\\n" "$(cat {DB_PASSWORD_FILE})" | '
            f"runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p {port} -d postgres"
        )
        if self.host.get_fact(PostgresPasswordLogin, address, port, DB_PASSWORD_FILE):
            server.shell(
                name="ops: postgres password (vault changed)", commands=[command], _if=self.changed("dbpassword")
            )
        else:
            server.shell(name="ops: postgres password (login failed)", commands=[command])

    def ensure_health_account(self) -> None:
        """The health account in the database, then Mosquitto's password/ACL files exported again and
        re-read (SIGHUP), exactly as the broker role would at its next run -- which then finds them
        current. Nothing when the account is already current."""
        provision = str(self.data("provision_bin"))
        dsn = self.database_section()["dsn"]
        hash_spec = str(self.data("emqx_password_hash"))
        state = self.host.get_fact(
            MqttHealthAccount, provision, self.health_account, MQTT_HEALTH_PASSWORD_FILE, hash_spec, dsn
        )
        if state == "current":
            return
        export = (
            f"{provision} export-mosquitto --dsn '{dsn}' --password-file {DB_PASSWORD_FILE} "
            f"--passwords {self.data('mosquitto_passwd_file')} --acl {self.data('mosquitto_acl_file')}"
        )
        server.shell(
            name="ops: MQTT health account (provision ensure-service, Mosquitto files, reload)",
            commands=[
                f"if [ -x {provision} ]; then "
                f"{ensure_service_command(provision, self.health_account, MQTT_HEALTH_PASSWORD_FILE, hash_spec, dsn)}"
                f" && {export} && systemctl reload mosquitto.service; "
                f"else echo 'ops: {provision} not installed yet: MQTT health account deferred' >&2; fi"
            ],
        )


ops = role_deploy(Ops)
