"""Prometheus, Alertmanager, node exporter and postgres exporter from apt, all on loopback.

Scrapes: EMQX's ``/api/v5/prometheus/stats`` (when the broker backend is EMQX), the ingest service's
``/metrics``, node exporter (with the textfile metrics of backup, restore drill and healthcheck),
postgres exporter. Alert rules in ``templates/monitoring/telemetry.rules.yml.j2``; Alertmanager sends
to the same e-mail/webhook as ``scripts/healthcheck.py``. Settings specific to monitoring are
optional group data (``self.opt``) with the thresholds of the operations table as defaults.
"""

from __future__ import annotations

from typing import Any

from pyinfra.operations import apt, files

from roles._base import Role, RoleError, render, role_deploy

PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
RULES_DIR = "/etc/prometheus/rules"
RULES = f"{RULES_DIR}/telemetry.rules.yml"
ALERTMANAGER_CONFIG = "/etc/prometheus/alertmanager.yml"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-node-exporter", "prometheus-postgres-exporter"]
DEFAULTS = {
    "prometheus": "/etc/default/prometheus",
    "alertmanager": "/etc/default/prometheus-alertmanager",
    "node": "/etc/default/prometheus-node-exporter",
    "postgres": "/etc/default/prometheus-postgres-exporter",
}


def rules_context(opt: Any) -> dict[str, Any]:
    return {
        "backlog_threshold": opt("alert_ingest_backlog", 1000),
        "rejected_ratio": float(opt("alert_rejected_ratio", 0.05)),
        "cert_warn_days": opt("alert_cert_warn_days", 21),
        "cert_crit_days": opt("alert_cert_crit_days", 7),
        "disk_warn": opt("alert_disk_warn_percent", 70),
        "disk_crit": opt("alert_disk_crit_percent", 85),
        "memory_crit": opt("alert_memory_crit_percent", 85),
        "backup_max_age_hours": opt("alert_backup_max_age_hours", 26),
    }


def render_rules(ctx: dict[str, Any]) -> str:
    return render("monitoring/telemetry.rules.yml.j2", **ctx)


def render_prometheus(ctx: dict[str, Any]) -> str:
    return render("monitoring/prometheus.yml.j2", **ctx)


def render_alertmanager(ctx: dict[str, Any]) -> str:
    if not ctx["alert_email"] and not ctx["alert_webhook_url"]:
        # An Alertmanager without a receiver drops every alert silently: refuse to deploy that.
        raise RoleError("monitoring: set alert_email and/or alert_webhook_url in group data")
    return render("monitoring/alertmanager.yml.j2", **ctx)


class Monitoring(Role):
    name = "monitoring"

    def context(self) -> dict[str, Any]:
        backend = self.opt("broker_backend", "emqx")
        ingest_listen = str(self.opt("ingest_http_listen", "127.0.0.1:8081"))
        return {
            "scrape_interval": self.opt("prometheus_scrape_interval", "15s"),
            "retention": self.opt("prometheus_retention", "30d"),
            "site": self.opt("site_name", self.host.name),
            "rules_glob": f"{RULES_DIR}/*.yml",
            "ingest_targets": [ingest_listen],
            "emqx_targets": [f"127.0.0.1:{self.opt('emqx_dashboard_port', 18083)}"] if backend == "emqx" else [],
            "textfile_dir": TEXTFILE_DIR,
            "alert_email": self.opt("alert_email", ""),
            "alert_from": self.opt("alert_from", f"alertmanager@{self.host.name}"),
            "smtp_smarthost": self.opt("alert_smtp_smarthost", "localhost:25"),
            "smtp_require_tls": bool(self.opt("alert_smtp_require_tls", False)),
            "alert_webhook_url": self.opt("alert_webhook_url", ""),
            "db_socket_dir": "/run/postgresql",
            "db_port": self.opt("database_port", 5432),
            "db_user": self.opt("db_exporter_user", "prometheus"),
            "db_name": self.opt("database_name", "telemetry"),
            **rules_context(self.opt),
        }

    def install(self) -> None:
        apt.packages(
            name="monitoring: prometheus, alertmanager, exporters",
            packages=PACKAGES,
            no_recommends=True,
            update=True,
            cache_time=3600,
        )
        self.record(
            "dirs",
            files.directory(name=f"monitoring: {RULES_DIR}", path=RULES_DIR, user="root", group="root", mode="0755"),
        )
        # The backup/healthcheck scripts run as root and write here; node exporter only reads.
        files.directory(name=f"monitoring: {TEXTFILE_DIR}", path=TEXTFILE_DIR, user="root", group="root", mode="0755")

    def configure(self) -> None:
        ctx = self.context()
        self.put(render_prometheus(ctx), PROMETHEUS_CONFIG, key="prometheus")
        self.put(render_rules(ctx), RULES, key="prometheus")
        self.put(render_alertmanager(ctx), ALERTMANAGER_CONFIG, key="alertmanager", mode="0640", group="prometheus")
        self.put(render("monitoring/prometheus.default.j2", **ctx), DEFAULTS["prometheus"], key="prometheus_args")
        self.put(render("monitoring/alertmanager.default.j2", **ctx), DEFAULTS["alertmanager"], key="alertmanager_args")
        self.put(render("monitoring/node-exporter.default.j2", **ctx), DEFAULTS["node"], key="node")
        self.put(render("monitoring/postgres-exporter.default.j2", **ctx), DEFAULTS["postgres"], key="postgres")

    def activate(self) -> None:
        # Config and rules: SIGHUP (reload) keeps the TSDB head in memory; new flags need a restart.
        self.service("prometheus", restart_if=self.changed("prometheus_args"), reload_if=self.changed("prometheus"))
        self.service(
            "prometheus-alertmanager",
            restart_if=self.changed("alertmanager_args"),
            reload_if=self.changed("alertmanager"),
        )
        self.service("prometheus-node-exporter", restart_if=self.changed("node"))
        self.service("prometheus-postgres-exporter", restart_if=self.changed("postgres"))


monitoring = role_deploy(Monitoring)
