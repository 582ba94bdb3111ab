"""Mosquitto 2 from apt (lab and small sites): TLS listeners, files from `provision export-mosquitto`."""

from __future__ import annotations

from collections.abc import Generator
from io import StringIO
from pathlib import PurePosixPath
from typing import Any

from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files

from roles._base import Role, RoleError, logger, render, role_deploy
from roles.facts import MosquittoExport
from roles.secrets import secrets_for

CONFIG = "/etc/mosquitto/mosquitto.conf"
DB_PASSWORD_FILE = "/etc/mosquitto/telemetry-db.password"  # noqa: S105 -- a path
# Between deploys, a timer exports accounts changed since (devices registered through the API).
SYNC_SCRIPT = "/usr/local/sbin/telemetry-mosquitto-accounts"
SYNC_SERVICE = "telemetry-mosquitto-accounts.service"
SYNC_TIMER = "telemetry-mosquitto-accounts.timer"
SYSTEMD_DIR = "/etc/systemd/system"
# Until the database has accounts (or the provision CLI is installed), no device gets in.
DENY_ALL = {"passwd": "", "acl": "# no accounts exported yet: every client is refused\n"}

_SIZES = {"KB": 1024, "MB": 1024 * 1024}


def size_bytes(text: str) -> int:
    for suffix, factor in _SIZES.items():
        if text.upper().endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def render_config(ctx: dict[str, Any]) -> str:
    return render("broker_mosquitto/mosquitto.conf.j2", **ctx)


@operation()
def auth_files(provision_bin: str, dsn: str, passwd_path: str, acl_path: str) -> Generator[Any, None, None]:
    """Mosquitto's password and ACL files as ``provision export-mosquitto`` renders them from the
    database, uploaded only when they differ. It logs in as the provisioner: the broker's login may
    not read ``mosquitto_hash`` (migration 0002 grants it only what EMQX's queries read).

    The export runs when this operation *executes*, after the database role and the ingest service's
    account (roles/plan.py), not when the deploy is planned: so the first deploy of a fresh host ends
    with the accounts exported, and the second one has nothing to change. When the export gives
    nothing (provision CLI not installed, database not answering), existing files are kept -- a
    database outage during a deploy must not lock every device out -- and only missing ones get the
    deny-all content. Password hashes: readable by the broker's group only."""
    exported = host.get_fact(MosquittoExport, provision_bin, dsn, DB_PASSWORD_FILE)
    for key, path in (("passwd", passwd_path), ("acl", acl_path)):
        if exported:
            content = exported[key]
        elif host.get_fact(File, path=path):
            continue
        else:
            logger.warning(
                "%s: no accounts exported yet (database or provision CLI not ready): deny-all %s", host.name, path
            )
            content = DENY_ALL[key]
        yield from files.put._inner(src=StringIO(content), dest=path, user="root", group="mosquitto", mode="0640")


class BrokerMosquitto(Role):
    name = "broker_mosquitto"

    def context(self) -> dict[str, Any]:
        inflight = int(self.data("mqtt_max_inflight"))
        batch = int(self.data("ingest_batch_size"))
        if inflight < 2 * batch:
            raise RoleError(f"broker_mosquitto: mqtt_max_inflight {inflight} < 2 x ingest_batch_size {batch}")
        return {
            "pid_file": "/run/mosquitto/mosquitto.pid",
            "persistence_dir": "/var/lib/mosquitto",
            "autosave_interval": self.data("mosquitto_autosave_interval"),
            "max_inflight": inflight,
            "max_queued": self.data("mqtt_max_queued"),
            "max_packet_size": size_bytes(str(self.data("mqtt_max_packet_size"))),
            "log_dest": "syslog",
            "loopback_port": self.data("mqtt_loopback_port"),
            "tls_port": self.data("mqtt_tls_port"),
            "wss_port": self.data("mqtt_wss_port"),
            "certfile": self.data("tls_cert_file"),
            "keyfile": self.data("tls_key_file"),
            "passwd_file": self.data("mosquitto_passwd_file"),
            "acl_file": self.data("mosquitto_acl_file"),
        }

    def export_dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.data('database_port')} dbname={self.data('database_name')} "
            f"user={self.data('db_provisioner_user')}"
        )

    def install(self) -> None:
        apt.packages(
            name="broker_mosquitto: mosquitto",
            packages=["mosquitto"],
            no_recommends=True,
            update=True,
            cache_time=3600,
        )

    def configure(self) -> None:
        self.put(render_config(self.context()), CONFIG, key="config")
        self.put(
            secrets_for(self.host)["db_provisioner_password"] + "\n",
            DB_PASSWORD_FILE,
            key="db",
            mode="0600",
            secret=True,
        )
        self.record(
            "auth",
            auth_files(
                name="broker_mosquitto: password and ACL files (provision export-mosquitto)",
                provision_bin=str(self.data("provision_bin")),
                dsn=self.export_dsn(),
                passwd_path=str(self.data("mosquitto_passwd_file")),
                acl_path=str(self.data("mosquitto_acl_file")),
            ),
        )

        sync = self.sync_context()
        self.put(render("broker_mosquitto/accounts-sync.sh.j2", **sync), SYNC_SCRIPT, key="sync", mode="0755")
        for name in (SYNC_SERVICE, SYNC_TIMER):
            template = f"broker_mosquitto/accounts-sync.{name.rsplit('.', 1)[1]}.j2"
            self.put(render(template, **sync), f"{SYSTEMD_DIR}/{name}", key="sync_unit")

    def sync_context(self) -> dict[str, Any]:
        return {
            "provision_bin": self.data("provision_bin"),
            "dsn": self.export_dsn(),
            "db_password_file": DB_PASSWORD_FILE,
            "passwd_file": self.data("mosquitto_passwd_file"),
            "acl_file": self.data("mosquitto_acl_file"),
            "interval": self.data("mosquitto_accounts_sync_interval"),
            "script": SYNC_SCRIPT,
            "timer": SYNC_TIMER,
            "database_unit": f"postgresql@{self.data('postgresql_version')}-main.service",
            "rw_dirs": sorted(
                {str(PurePosixPath(self.data(k)).parent) for k in ("mosquitto_passwd_file", "mosquitto_acl_file")}
            ),
        }

    def activate(self) -> None:
        # SIGHUP (the Debian unit's reload) re-reads password and ACL files without dropping sessions.
        self.service("mosquitto", restart_if=self.changed("config"), reload_if=self.changed("auth"))
        self.daemon_reload(_if=self.changed("sync_unit"))
        self.service(SYNC_TIMER, restart_if=self.changed("sync_unit"))


broker_mosquitto = role_deploy(BrokerMosquitto)
