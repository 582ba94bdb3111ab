"""Prometheus, Alertmanager, node exporter and postgres exporter from apt, each host watching itself.

Every host of the brokers, databases or ingest groups gets its own Prometheus + Alertmanager
(roles/plan.py): the exporters have no authentication, so they listen on 127.0.0.1 only, and a
Prometheus elsewhere could not reach them anyway. What is scraped follows the host's groups:

- always: node exporter, with the textfile metrics of backup, restore drill and healthcheck
  (``node_exporter_textfile_dir``), and Prometheus itself;
- brokers with EMQX: ``/api/v5/prometheus/stats`` on the dashboard port (no authentication unless
  ``prometheus.enable_basic_auth``, contract section 5). Mosquitto has no Prometheus endpoint: nothing
  is scraped; BrokerDown then comes from the ingest service's MQTT link and the health check's ``$SYS``
  round trip (its textfile metric);
- ingest: the service's ``/metrics`` on ``ingest_http_address``;
- databases: postgres exporter, logged in as ``roles._database.MONITOR_LOGIN`` (pg_monitor): by peer
  authentication over the socket with the apt PostgreSQL, over TCP with ``db_monitor_password`` with
  the TimescaleDB container.

Alert rules in ``templates/monitoring/telemetry.rules.yml.j2`` (unit tests with ``promtool test
rules`` in tests/unit/test_roles_monitoring.py); Alertmanager sends to the same e-mail/webhook as
``scripts/healthcheck.py``, or to a null receiver (alerts visible in its UI only) when none is set.
Every file is checked on the host (promtool / amtool) before the service reloads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyinfra.operations import apt, files, server

from roles._base import Role, RoleError, render, role_deploy
from roles._database import MONITOR_LOGIN
from roles.broker_emqx import fqdn
from roles.secrets import secrets_for

PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
RULES_DIR = "/etc/prometheus/rules"
RULES = f"{RULES_DIR}/telemetry.rules.yml"
ALERTMANAGER_CONFIG = "/etc/prometheus/alertmanager.yml"
# Read by the exporter itself (DATA_SOURCE_PASS_FILE), so group prometheus; TimescaleDB only.
POSTGRES_PASSWORD_FILE = "/etc/prometheus/postgres-exporter.password"  # noqa: S105 -- a path
# Alertmanager reads it (auth_password_file) as user prometheus: a copy of the health check's.
SMTP_PASSWORD_FILE = "/etc/prometheus/alertmanager-smtp.password"  # noqa: S105 -- a path
PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-node-exporter"]
POSTGRES_PACKAGE = "prometheus-postgres-exporter"
# Debian's units read their flags ($ARGS) and environment from these.
DEFAULTS = {
    "prometheus": "/etc/default/prometheus",
    "alertmanager": "/etc/default/prometheus-alertmanager",
    "node": "/etc/default/prometheus-node-exporter",
    "postgres": "/etc/default/prometheus-postgres-exporter",
}
UNITS = {
    "prometheus": "prometheus",
    "alertmanager": "prometheus-alertmanager",
    "node": "prometheus-node-exporter",
    "postgres": "prometheus-postgres-exporter",
}
WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}  # noqa: S104 -- refused, not bound


def listen_address(key: str, value: object) -> str:
    """``host:port`` with a concrete host: the exporters and Alertmanager have no authentication,
    so an address on every interface is refused rather than left to the firewall."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise RoleError(f"monitoring: {key} must be host:port, not {text!r}")
    if host in WILDCARDS:
        raise RoleError(f"monitoring: {key} = {text!r} listens on every interface; use 127.0.0.1 (or one address)")
    return text


def scrape_target(key: str, value: object) -> str:
    """Where to reach a service that may listen on every interface: loopback then."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit():
        raise RoleError(f"monitoring: {key} must be host:port, not {value!r}")
    return f"127.0.0.1:{port}" if host in WILDCARDS else f"{host}:{port}"


def rules_context(get: Callable[[str], Any]) -> dict[str, Any]:
    """Alert thresholds from group data (``alert_*``): the health check reads the same keys."""
    return {
        "backlog_threshold": int(get("alert_ingest_backlog")),
        "rejected_ratio": float(get("alert_rejected_ratio")),
        "cert_warn_days": int(get("alert_cert_warn_days")),
        "cert_crit_days": int(get("alert_cert_crit_days")),
        "disk_warn": int(get("alert_disk_warn_percent")),
        "disk_crit": int(get("alert_disk_crit_percent")),
        "memory_crit": int(get("alert_memory_crit_percent")),
        "backup_max_age_hours": int(get("alert_backup_max_age_hours")),
    }


def render_rules(ctx: dict[str, Any]) -> str:
    return render("monitoring/telemetry.rules.yml.j2", **ctx)


def render_prometheus(ctx: dict[str, Any]) -> str:
    return render("monitoring/prometheus.yml.j2", **ctx)


def render_alertmanager(ctx: dict[str, Any]) -> str:
    return render("monitoring/alertmanager.yml.j2", **ctx)


def recipients(value: object) -> str:
    """Alertmanager's ``to`` is one string; several addresses are comma-separated."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value if v)
    return str(value or "")


class Monitoring(Role):
    name = "monitoring"

    @property
    def watches_database(self) -> bool:
        return "databases" in self.host.groups

    @property
    def timescaledb(self) -> bool:
        return self.watches_database and self.data("database_backend") == "timescaledb"

    def jobs(self) -> list[dict[str, Any]]:
        """Scrape jobs for what runs on this host; the Mosquitto case is a comment in the file."""
        out = [
            {"name": "prometheus", "targets": [self.listen("prometheus_listen_address")]},
            {"name": "alertmanager", "targets": [self.listen("alertmanager_listen_address")]},
            {"name": "node", "targets": [self.listen("node_exporter_listen_address")]},
        ]
        if self.watches_database:
            out.append({"name": "postgres", "targets": [self.listen("postgres_exporter_listen_address")]})
        if "ingest" in self.host.groups:
            target = scrape_target("ingest_http_address", self.data("ingest_http_address"))
            out.append({"name": "ingest", "targets": [target], "path": "/metrics"})
        if "brokers" in self.host.groups and self.data("broker_backend") == "emqx":
            port = int(self.data("emqx_dashboard_port"))
            out.append({"name": "emqx", "targets": [f"127.0.0.1:{port}"], "path": "/api/v5/prometheus/stats"})
        return out

    def listen(self, key: str) -> str:
        return listen_address(key, self.data(key))

    def smtp(self) -> dict[str, Any]:
        port = int(self.data("alert_smtp_port"))
        username = str(self.data("alert_smtp_username"))
        return {
            "smarthost": f"{self.data('alert_smtp_host')}:{port}",
            "require_tls": bool(self.data("alert_smtp_starttls")),
            "from": str(self.data("alert_email_from")) or f"alertmanager@{fqdn(self.host)}",
            "username": username,
            "password_file": SMTP_PASSWORD_FILE if username else "",
        }

    def context(self) -> dict[str, Any]:
        email = recipients(self.data("alert_email"))
        webhook = str(self.data("alert_webhook_url")).strip()
        if webhook and not webhook.startswith(("http://", "https://")):
            raise RoleError(f"monitoring: alert_webhook_url must be http(s), not {webhook!r}")
        return {
            "scrape_interval": self.data("prometheus_scrape_interval"),
            "retention": self.data("prometheus_retention"),
            "external_labels": {"host": fqdn(self.host), "environment": str(self.opt("environment", "") or "")},
            "rules_glob": f"{RULES_DIR}/*.yml",
            "jobs": self.jobs(),
            "mosquitto": "brokers" in self.host.groups and self.data("broker_backend") == "mosquitto",
            "prometheus_listen": self.listen("prometheus_listen_address"),
            "alertmanager_listen": self.listen("alertmanager_listen_address"),
            "node_listen": self.listen("node_exporter_listen_address"),
            "postgres_listen": self.listen("postgres_exporter_listen_address"),
            "textfile_dir": self.data("node_exporter_textfile_dir"),
            "alert_email": email,
            "alert_webhook_url": webhook,
            "smtp": self.smtp(),
            # Backups run on the database hosts: elsewhere "no backup metric" is normal, not an alert.
            "backup_alerts": self.watches_database,
            **self.postgres_context(),
            **rules_context(self.data),
        }

    def postgres_context(self) -> dict[str, Any]:
        database = self.data("database_name")
        if not self.timescaledb:
            # apt PostgreSQL: the socket, peer authentication as OS user prometheus, no password.
            dsn = f"host=/run/postgresql port={self.data('database_port')} user={MONITOR_LOGIN} dbname={database}"
            return {"pg_dsn": dsn + " sslmode=disable", "pg_uri": "", "pg_password_file": ""}
        # The container's published port; on a wildcard publish, loopback reaches it too.
        host = str(self.data("database_listen_address"))
        host = "127.0.0.1" if host in WILDCARDS else host
        uri = f"{host}:{self.data('database_port')}/{database}?sslmode=disable"
        return {"pg_dsn": "", "pg_uri": uri, "pg_user": MONITOR_LOGIN, "pg_password_file": POSTGRES_PASSWORD_FILE}

    # --- stages -------------------------------------------------------------------------------
    def install(self) -> None:
        packages = [*PACKAGES, POSTGRES_PACKAGE] if self.watches_database else PACKAGES
        # The packages start their daemons on all interfaces with Debian's defaults until configure
        # below rewrites the flags and activate restarts them (a few seconds, behind ufw's default deny).
        self.record(
            "install",
            apt.packages(
                name=f"monitoring: {', '.join(packages)}",
                packages=packages,
                no_recommends=True,
                update=True,
                cache_time=3600,
            ),
        )
        files.directory(name=f"monitoring: {RULES_DIR}", path=RULES_DIR, user="root", group="root", mode="0755")
        # backup, restore drill and healthcheck run as root and write here; node exporter only reads.
        textfile_dir = self.data("node_exporter_textfile_dir")
        files.directory(name=f"monitoring: {textfile_dir}", path=textfile_dir, user="root", group="root", mode="0755")

    def configure(self) -> None:
        ctx = self.context()
        self.put(render_prometheus(ctx), PROMETHEUS_CONFIG, key="prometheus")
        self.put(render_rules(ctx), RULES, key="prometheus")
        self.put(render_alertmanager(ctx), ALERTMANAGER_CONFIG, key="alertmanager", mode="0640", group="prometheus")
        if ctx["alert_email"] and ctx["smtp"]["password_file"]:
            password = secrets_for(self.host)["alert_smtp_password"]
            self.put(
                password + "\n", SMTP_PASSWORD_FILE, key="alertmanager", mode="0640", group="prometheus", secret=True
            )
        self.put(render("monitoring/prometheus.default.j2", **ctx), DEFAULTS["prometheus"], key="prometheus_args")
        self.put(render("monitoring/alertmanager.default.j2", **ctx), DEFAULTS["alertmanager"], key="alertmanager_args")
        self.put(render("monitoring/node-exporter.default.j2", **ctx), DEFAULTS["node"], key="node")
        if not self.watches_database:
            return
        self.put(
            render("monitoring/postgres-exporter.default.j2", **ctx),
            DEFAULTS["postgres"],
            key="postgres",
            mode="0640",
            group="prometheus",
        )
        if self.timescaledb:
            self.put(
                secrets_for(self.host)["db_monitor_password"] + "\n",
                POSTGRES_PASSWORD_FILE,
                key="postgres",
                mode="0640",
                group="prometheus",
                secret=True,
            )

    def activate(self) -> None:
        # A file the daemon would refuse fails the deploy here, with the tool's message; the running
        # daemon keeps its previous configuration (a SIGHUP with a bad file only logs an error).
        prometheus = self.changed("prometheus", "prometheus_args")
        alertmanager = self.changed("alertmanager", "alertmanager_args")
        units = [UNITS[k] for k in ("prometheus", "alertmanager", "node")]
        if self.watches_database:
            units.append(UNITS["postgres"])
        if self.has_systemd:
            # On a fresh install the packages start their daemons with Debian's defaults; the postgres
            # exporter's empty DSN makes it crash-loop into systemd's start limit, and a start refused
            # by the limit would fail this deploy although its configuration is now right (seen on the
            # lab). Clearing the failed state lets the starts below use the files written above.
            server.shell(
                name="monitoring: clear the failed state of daemons started with Debian's defaults",
                commands=[f"systemctl reset-failed {' '.join(units)} || true"],
                _if=self.changed("install"),
            )
        server.shell(
            name="monitoring: promtool check config",
            commands=[f"promtool check config {PROMETHEUS_CONFIG}"],
            _if=prometheus,
        )
        server.shell(
            name="monitoring: amtool check-config",
            commands=[f"amtool check-config {ALERTMANAGER_CONFIG}"],
            _if=alertmanager,
        )
        # Config and rules: SIGHUP (reload) keeps the TSDB head in memory; new flags need a restart.
        self.service(
            UNITS["prometheus"], restart_if=self.changed("prometheus_args"), reload_if=self.changed("prometheus")
        )
        self.service(
            UNITS["alertmanager"],
            restart_if=self.changed("alertmanager_args"),
            reload_if=self.changed("alertmanager"),
        )
        self.service(UNITS["node"], restart_if=self.changed("node"))
        if self.watches_database:
            self.service(UNITS["postgres"], restart_if=self.changed("postgres"))


monitoring = role_deploy(Monitoring)
