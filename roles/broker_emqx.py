"""EMQX 5.8 broker as a compose project (see shared/emqx-5.8-contract.md for every rule applied)."""

from __future__ import annotations

import re
from typing import Any

from pyinfra.api.host import Host
from pyinfra.operations import files, server

from ingest.hashing import HashAlgorithm
from ingest.schema import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY
from roles._base import Role, RoleError, render, role_deploy
from roles.docker import compose_command
from roles.secrets import secrets_for
from roles.stack import compose_project

PROJECT = "emqx"
# uid/gid of the emqx user in the image (contract section 1): mounted dirs must be writable by it.
EMQX_UID = 1000
# Values that go into env files must survive compose's parsing untouched: no quotes, `$`, spaces.
_ENV_SAFE = re.compile(r"^[A-Za-z0-9._~+/=@%-]+$")


def fqdn(host: Host) -> str:
    return str(host.data.get("fqdn") or host.name)


def node_name(host: Host) -> str:
    short = str(host.data.get("emqx_node_short_name"))
    name = f"{short}@{fqdn(host)}"
    if short[-1:].isdigit() or "." not in fqdn(host):
        # A trailing digit shifts the distribution port; a dotless host is not a long name.
        raise RoleError(f"broker_emqx: node name {name!r} must be name@host.with.dot, no digit before @")
    return name


def password_hash_hocon(spec: str) -> str:
    """``password_hash_algorithm`` from the same spec provisioning hashes with (one parser for both)."""
    try:
        return HashAlgorithm.parse(spec).to_hocon()
    except ValueError as exc:
        raise RoleError(f"broker_emqx: emqx_password_hash {spec!r}: {exc}") from None


def env_value(name: str, value: str) -> str:
    if not _ENV_SAFE.match(value):
        raise RoleError(
            f"broker_emqx: secret {name} has characters an env file would mangle; "
            "use letters, digits and ._~+/=@%- (e.g. openssl rand -hex 32)"
        )
    return value


def database_server(host: Host) -> str:
    """EMQX runs with host networking: a database on this host is on loopback, otherwise on the
    database host's private address."""
    port = host.data.get("database_port")
    dbs = list(host.inventory.get_group("databases", []))
    if not dbs or host.name in {db.name for db in dbs}:
        return f"127.0.0.1:{port}"
    db = dbs[0]
    return f"{db.data.get('private_address') or db.name}:{port}"


class BrokerEmqx(Role):
    name = "broker_emqx"

    @property
    def directory(self) -> str:
        return f"{self.data('compose_root')}/{PROJECT}"

    def context(self) -> dict[str, Any]:
        brokers = list(self.host.inventory.get_group("brokers", [])) or [self.host]
        inflight = int(self.data("mqtt_max_inflight"))
        batch = int(self.data("ingest_batch_size"))
        if inflight < 2 * batch:
            raise RoleError(f"broker_emqx: mqtt_max_inflight {inflight} < 2 x ingest_batch_size {batch}")
        tls_dir = str(self.data("tls_dir")).rstrip("/")
        certs = {}
        for key in ("tls_cert_file", "tls_key_file"):
            path = str(self.data(key))
            if not path.startswith(tls_dir + "/"):
                raise RoleError(f"broker_emqx: {key} must be inside tls_dir {tls_dir} (mounted as a whole)")
            certs[key] = "/opt/emqx/etc/certs/telemetry/" + path[len(tls_dir) + 1 :]
        return {
            "node_name": node_name(self.host),
            "cluster_name": self.data("emqx_cluster_name"),
            "seeds": [node_name(b) for b in brokers],
            "max_inflight": inflight,
            "max_queued": self.data("mqtt_max_queued"),
            "max_packet_size": self.data("mqtt_max_packet_size"),
            "loopback_port": self.data("mqtt_loopback_port"),
            "tls_port": self.data("mqtt_tls_port"),
            "wss_port": self.data("mqtt_wss_port"),
            "max_connections": self.data("emqx_max_connections"),
            "certfile": certs["tls_cert_file"],
            "keyfile": certs["tls_key_file"],
            # Devices present no certificates (verify_none): the chain file is all EMQX needs here.
            "cacertfile": certs["tls_cert_file"],
            "dashboard_port": self.data("emqx_dashboard_port"),
            "db_server": database_server(self.host),
            "db_name": self.data("database_name"),
            "db_user": self.data("db_broker_user"),
            "pool_size": self.data("emqx_db_pool_size"),
            "authn_query": EMQX_AUTHN_QUERY,
            "authz_query": EMQX_AUTHZ_QUERY,
            "password_hash_algorithm": password_hash_hocon(self.data("emqx_password_hash")),
            "log_level": self.data("emqx_log_level"),
            "image": self.data("emqx_image"),
            "tls_dir": tls_dir,
            "nofile": self.data("nofile_limit"),
        }

    def install(self) -> None:
        for sub, owner in (("", "root"), ("/etc", "root"), ("/data", EMQX_UID), ("/log", EMQX_UID)):
            files.directory(
                name=f"broker_emqx: {self.directory}{sub}",
                path=f"{self.directory}{sub}",
                user=str(owner),
                group=str(owner),
                mode="0750" if sub else "0755",
            )

    def configure(self) -> None:
        ctx = self.context()
        d = self.directory
        self.put(render("broker_emqx/emqx.conf.j2", **ctx), f"{d}/etc/emqx.conf", key="config")
        self.put(render("broker_emqx/base.hocon.j2", **ctx), f"{d}/etc/base.hocon", key="config")
        self.put(render("broker_emqx/compose.yaml.j2", **ctx), f"{d}/compose.yaml", key="config")
        secrets = secrets_for(self.host)
        self.put(
            render(
                "broker_emqx/secrets.env.j2",
                cookie=env_value("emqx_node_cookie", secrets["emqx_node_cookie"]),
                db_password=env_value("db_broker_password", secrets["db_broker_password"]),
            ),
            f"{d}/secrets.env",
            key="secrets",
            mode="0600",
            secret=True,
        )
        self.put(
            render(
                "broker_emqx/dashboard.env.j2",
                dashboard_password=env_value("emqx_dashboard_password", secrets["emqx_dashboard_password"]),
            ),
            f"{d}/dashboard.env",
            key="dashboard",
            mode="0600",
            secret=True,
        )
        # Read by the emqx user inside the container, hence owned by its uid.
        self.put(
            render(
                "broker_emqx/api_keys.txt.j2",
                api_key=env_value("emqx_api_key", secrets["emqx_api_key"]),
                api_secret=env_value("emqx_api_secret", secrets["emqx_api_secret"]),
            ),
            f"{d}/etc/api_keys.txt",
            key="secrets",
            mode="0600",
            user=EMQX_UID,
            group=EMQX_UID,
            secret=True,
        )

    def activate(self) -> None:
        compose_project(self, PROJECT, self.directory, restart_if=self.changed("config", "secrets", "dashboard"))
        if not self.has_systemd:
            return
        compose = compose_command(self.data("docker_source"))
        # default_password only creates the admin on first boot (contract section 5): rotate explicitly.
        # The password is read inside the container from its environment, never on a command line.
        server.shell(
            name="broker_emqx: set dashboard admin password",
            commands=[
                f"cd {self.directory} && {compose} --project-name {PROJECT} exec -T emqx "
                "sh -c 'emqx ctl admins passwd admin \"$EMQX_DASHBOARD__DEFAULT_PASSWORD\"'"
            ],
            _if=self.changed("dashboard"),
        )


broker_emqx = role_deploy(BrokerEmqx)
