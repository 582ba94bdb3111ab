"""monitoring role: what each host scrapes, loopback everywhere, the exporter's database login; rendered
Prometheus/Alertmanager files pass promtool/amtool, and every alert rule has a firing and a quiet case
in `promtool test rules`."""

from __future__ import annotations

import functools
import re
import runpy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from pyinfra.context import host

from ingest.metrics import IngestMetrics
from roles import monitoring as mon
from roles._base import RoleError
from roles._database import MONITOR_LOGIN
from roles.database_postgresql import database_postgresql
from roles.database_timescaledb import database_timescaledb
from roles.plan import all_roles
from roles.secrets import VaultError, decrypt_file
from tests.support.deploy_fake import REPO, TEST_VAULT_DIR, TEST_VAULT_PASSWORD, HostResult, run_deploys

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="amtool missing (Debian package prometheus-alertmanager)")


@functools.cache
def all_defaults() -> dict[str, Any]:
    return runpy.run_path(str(REPO / "group_data" / "all.py"))


def defaults(key: str) -> Any:
    """group_data/all.py's value: the thresholds the README states."""
    return all_defaults()[key]


def context(**extra: Any) -> dict[str, Any]:
    """Every template variable, as a database + ingest + EMQX host has them."""
    ctx: dict[str, Any] = {
        "scrape_interval": "15s",
        "external_labels": {"host": "test.example.net", "environment": "test"},
        "rules_glob": "rules/*.yml",
        "alertmanager_listen": "127.0.0.1:9093",
        "jobs": [
            {"name": "node", "targets": ["127.0.0.1:9100"]},
            {"name": "postgres", "targets": ["127.0.0.1:9187"]},
            {"name": "ingest", "targets": ["127.0.0.1:8081"], "path": "/metrics"},
            {"name": "emqx", "targets": ["127.0.0.1:18083"], "path": "/api/v5/prometheus/stats"},
        ],
        "mosquitto": False,
        "alert_email": "ops@example.org",
        "alert_webhook_url": "http://127.0.0.1:9/hook",
        "smtp": {
            "smarthost": "localhost:25",
            "require_tls": False,
            "from": "am@example.org",
            "username": "",
            "password_file": "",
        },
        "backup_alerts": True,
        **mon.rules_context(defaults),
    }
    ctx.update(extra)
    return ctx


def vault(key: str) -> str:
    return decrypt_file(REPO / TEST_VAULT_DIR / "all.vault.yml", TEST_VAULT_PASSWORD.read_bytes().strip())[key]


def jobs(prometheus_yml: str) -> dict[str, dict[str, Any]]:
    return {j["job_name"]: j for j in yaml.safe_load(prometheus_yml)["scrape_configs"]}


def mode_of(r: HostResult, path: str) -> str:
    return next(c.split()[1] for c in r.commands if c.startswith("chmod ") and c.endswith(" " + path))


# --- what a host gets ------------------------------------------------------------------------------


def test_lab_host_watches_everything_on_loopback() -> None:
    (r,) = run_deploys("lab", [mon.monitoring]).values()
    for path in (mon.PROMETHEUS_CONFIG, mon.RULES, mon.ALERTMANAGER_CONFIG, *mon.DEFAULTS.values()):
        assert path in r.files, path
    scraped = jobs(r.files[mon.PROMETHEUS_CONFIG])
    # Mosquitto: no broker job (no exporter); the file says why.
    assert set(scraped) == {"prometheus", "alertmanager", "node", "postgres", "ingest"}
    assert "Mosquitto has no Prometheus endpoint" in r.files[mon.PROMETHEUS_CONFIG]
    assert scraped["ingest"]["metrics_path"] == "/metrics"
    assert scraped["ingest"]["static_configs"] == [{"targets": [r.data["ingest_http_address"]]}]
    assert all(t.startswith("127.0.0.1:") for j in scraped.values() for t in j["static_configs"][0]["targets"])
    # Every daemon binds to loopback, on the address group data gives.
    for key, flag_file in (
        ("prometheus_listen_address", "prometheus"),
        ("alertmanager_listen_address", "alertmanager"),
        ("node_exporter_listen_address", "node"),
        ("postgres_exporter_listen_address", "postgres"),
    ):
        assert r.data[key].startswith("127.0.0.1:")
        assert f'--web.listen-address={r.data[key]}"' in r.files[mon.DEFAULTS[flag_file]] or (
            f"--web.listen-address={r.data[key]} " in r.files[mon.DEFAULTS[flag_file]]
        )
    assert "--cluster.listen-address=" in r.files[mon.DEFAULTS["alertmanager"]]
    # The textfile folder (Debian's default) the backup/healthcheck scripts write to: the ops role
    # renders their textfile_dir from the same group data key.
    assert r.data["node_exporter_textfile_dir"] == "/var/lib/prometheus/node-exporter"
    assert "--collector.textfile.directory=/var/lib/prometheus/node-exporter" in r.files[mon.DEFAULTS["node"]]
    names = " ".join(r.op_names())
    assert "reload prometheus" in names and "restart prometheus-node-exporter" in names
    assert "prometheus-postgres-exporter" in names
    assert any(c.startswith("promtool check config ") for c in r.commands)
    assert any(c.startswith("amtool check-config ") for c in r.commands)


def test_apt_postgresql_exporter_logs_in_by_peer_without_password() -> None:
    (r,) = run_deploys("lab", [mon.monitoring]).values()
    env = r.files[mon.DEFAULTS["postgres"]]
    assert f'DATA_SOURCE_NAME="host=/run/postgresql port=5432 user={MONITOR_LOGIN} dbname=telemetry' in env
    assert "password" not in env.lower().replace("no password", "")
    assert mon.POSTGRES_PASSWORD_FILE not in r.files
    # ...and the database role makes that possible: the login exists, without a password, and pg_hba
    # lets OS user prometheus in as itself over the socket, before the password rule for everyone.
    (db,) = run_deploys("lab", [database_postgresql]).values()
    sql = db.files["/etc/telemetry/database-roles.sql"]
    assert f'ALTER ROLE "{MONITOR_LOGIN}" LOGIN PASSWORD NULL;' in sql
    assert f"GRANT %I TO %I', 'pg_monitor', '{MONITOR_LOGIN}'" in sql
    hba = [line.split() for line in db.files["/etc/postgresql/15/main/pg_hba.conf"].splitlines()]
    rules = [line for line in hba if line and not line[0].startswith("#")]
    assert ["local", "all", MONITOR_LOGIN, "peer"] in rules
    assert rules.index(["local", "all", MONITOR_LOGIN, "peer"]) < rules.index(["local", "all", "all", "scram-sha-256"])


def test_timescaledb_exporter_uses_the_vault_password_from_a_private_file() -> None:
    (r,) = run_deploys("prod", [mon.monitoring]).values()
    env = r.files[mon.DEFAULTS["postgres"]]
    assert 'DATA_SOURCE_URI="127.0.0.1:5432/telemetry?sslmode=disable"' in env
    assert f'DATA_SOURCE_USER="{MONITOR_LOGIN}"' in env
    assert f'DATA_SOURCE_PASS_FILE="{mon.POSTGRES_PASSWORD_FILE}"' in env
    assert r.files[mon.POSTGRES_PASSWORD_FILE] == vault("db_monitor_password") + "\n"
    assert vault("db_monitor_password") not in env
    assert mode_of(r, mon.POSTGRES_PASSWORD_FILE) == "640"
    assert f"chown root:prometheus {mon.POSTGRES_PASSWORD_FILE}" in r.commands
    (db,) = run_deploys("prod", [database_timescaledb]).values()
    sql = db.files["/srv/telemetry/timescaledb/roles.sql"]
    assert f"ALTER ROLE \"{MONITOR_LOGIN}\" LOGIN PASSWORD '{vault('db_monitor_password')}';" in sql


def test_prod_scrapes_emqx_stats() -> None:
    (r,) = run_deploys("prod", [mon.monitoring]).values()
    scraped = jobs(r.files[mon.PROMETHEUS_CONFIG])
    assert scraped["emqx"]["metrics_path"] == "/api/v5/prometheus/stats"
    assert scraped["emqx"]["static_configs"] == [{"targets": [f"127.0.0.1:{r.data['emqx_dashboard_port']}"]}]
    assert "Mosquitto" not in r.files[mon.PROMETHEUS_CONFIG]


def test_cluster_hosts_scrape_only_what_runs_on_them() -> None:
    results = run_deploys("cluster-example", [mon.monitoring])
    broker = results["broker-a.cluster.example.net"]
    ingest = results["ingest-a.cluster.example.net"]
    db = results["db-a.cluster.example.net"]
    assert set(jobs(broker.files[mon.PROMETHEUS_CONFIG])) == {"prometheus", "alertmanager", "node", "emqx"}
    assert set(jobs(ingest.files[mon.PROMETHEUS_CONFIG])) == {"prometheus", "alertmanager", "node", "ingest"}
    assert set(jobs(db.files[mon.PROMETHEUS_CONFIG])) == {"prometheus", "alertmanager", "node", "postgres"}
    # The postgres exporter only where the database is; backup alerts only where backups run.
    assert mon.DEFAULTS["postgres"] not in broker.files
    assert not any("prometheus-postgres-exporter" in c for c in broker.commands)
    assert any("prometheus-postgres-exporter" in c for c in db.commands)
    assert "BackupStale" not in broker.files[mon.RULES] and "BackupStale" in db.files[mon.RULES]


def test_monitoring_is_in_the_plan_after_the_broker() -> None:
    def everything() -> None:
        for role in all_roles(host):
            role()

    # prod has the lab's shape; the cluster has EMQX brokers and hosts of one group each
    for inventory in ("lab", "cluster-example"):
        for name, r in run_deploys(inventory, [everything]).items():
            uploaded = list(r.files)
            assert mon.PROMETHEUS_CONFIG in uploaded, (inventory, name)
            for earlier in ("/etc/mosquitto/mosquitto.conf", "/srv/telemetry/emqx/etc/emqx.conf"):
                if earlier in uploaded:
                    assert uploaded.index(earlier) < uploaded.index(mon.PROMETHEUS_CONFIG)


def test_wildcard_listen_address_is_refused() -> None:
    with pytest.raises(RoleError, match="every interface"):
        run_deploys("lab", [mon.monitoring], override={"node_exporter_listen_address": "0.0.0.0:9100"})
    with pytest.raises(RoleError, match="host:port"):
        mon.listen_address("prometheus_listen_address", "9090")
    # A service that listens everywhere is still scraped on loopback.
    assert mon.scrape_target("ingest_http_address", "0.0.0.0:8081") == "127.0.0.1:8081"


def test_every_metric_a_rule_reads_is_exported() -> None:
    """A renamed metric would silence its alert without any error: check each name at its source."""
    rules = yaml.safe_load(mon.render_rules(context()))
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    names = set(re.findall(r"\b(?:ingest|telemetry|pg|node)_[A-Za-z0-9_]+", exprs))
    exposition = generate_latest(IngestMetrics().registry).decode()
    scripts = "".join(p.read_text() for p in (REPO / "scripts").glob("*.py"))
    # From the exporters themselves (node exporter 1.5, postgres exporter 0.11 in Debian 12).
    exporters = {
        "pg_up",
        "node_filesystem_avail_bytes",
        "node_filesystem_size_bytes",
        "node_memory_MemAvailable_bytes",
        "node_memory_MemTotal_bytes",
    }
    assert {n for n in names if n.startswith("ingest_")} and {n for n in names if n.startswith("telemetry_")}
    for name in sorted(names):
        if name.startswith("ingest_"):
            assert re.search(rf"^{name}[{{ ]", exposition, re.M), f"{name}: not in ingest/metrics.py"
        elif name.startswith("telemetry_"):
            assert f'"{name}"' in scripts, f"{name}: no script in scripts/ writes it"
        else:
            assert name in exporters, name


# --- alertmanager ----------------------------------------------------------------------------------


def test_receivers_follow_group_data() -> None:
    override = {
        "alert_email": ["ops@example.org", "oncall@example.org"],
        "alert_webhook_url": "https://hooks.example.org/telemetry",
        "alert_smtp_host": "smtp.example.org",
        "alert_smtp_port": 587,
        "alert_smtp_starttls": True,
    }
    (r,) = run_deploys("lab", [mon.monitoring], override=override).values()
    am = yaml.safe_load(r.files[mon.ALERTMANAGER_CONFIG])
    assert am["route"]["receiver"] == "ops"
    (ops,) = am["receivers"]
    (email,) = ops["email_configs"]
    assert email["to"] == "ops@example.org, oncall@example.org"
    assert email["smarthost"] == "smtp.example.org:587" and email["require_tls"] is True
    assert email["from"].startswith("alertmanager@") and "auth_username" not in email
    assert ops["webhook_configs"] == [{"url": "https://hooks.example.org/telemetry", "send_resolved": True}]
    assert mode_of(r, mon.ALERTMANAGER_CONFIG) == "640"


def test_smtp_login_needs_its_vault_password() -> None:
    override = {"alert_email": "ops@example.org", "alert_smtp_username": "alertmanager"}
    with pytest.raises(VaultError, match="alert_smtp_password"):
        run_deploys("lab", [mon.monitoring], override=override)
    # Without e-mail recipients the login is unused: no secret is needed or written.
    (r,) = run_deploys("lab", [mon.monitoring], override={"alert_smtp_username": "alertmanager"}).values()
    assert mon.SMTP_PASSWORD_FILE not in r.files


def test_no_receiver_routes_to_null() -> None:
    (r,) = run_deploys("lab", [mon.monitoring], override={"alert_email": "", "alert_webhook_url": ""}).values()
    am = yaml.safe_load(r.files[mon.ALERTMANAGER_CONFIG])
    assert am["route"]["receiver"] == "null" and am["receivers"] == [{"name": "null"}]


def test_bad_webhook_is_refused() -> None:
    with pytest.raises(RoleError, match="http"):
        run_deploys("lab", [mon.monitoring], override={"alert_webhook_url": "hooks.example.org"})


@needs_amtool
def test_amtool_check_config(tmp_path: Path) -> None:
    smtp_login = {**context()["smtp"], "username": "am", "password_file": "/etc/prometheus/x.password"}
    for extra in (
        {},
        {"alert_email": ""},
        {"alert_webhook_url": ""},
        {"alert_email": "", "alert_webhook_url": ""},
        {"smtp": smtp_login},
    ):
        path = tmp_path / "alertmanager.yml"
        path.write_text(mon.render_alertmanager(context(**extra)))
        result = subprocess.run([str(AMTOOL), "check-config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (extra, result.stdout + result.stderr)


# --- prometheus ------------------------------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize("inventory", ["lab", "prod", "cluster-example"])
def test_promtool_checks_the_deployed_files(inventory: str, tmp_path: Path) -> None:
    for name, r in run_deploys(inventory, [mon.monitoring]).items():
        work = tmp_path / name
        (work / "rules").mkdir(parents=True)
        (work / "rules" / "telemetry.rules.yml").write_text(r.files[mon.RULES])
        text = r.files[mon.PROMETHEUS_CONFIG].replace(mon.RULES_DIR + "/", "rules/")
        (work / "prometheus.yml").write_text(text)
        result = subprocess.run(
            [str(PROMTOOL), "check", "config", "prometheus.yml"], cwd=work, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout and "rules found" in result.stdout
        rules = subprocess.run(
            [str(PROMTOOL), "check", "rules", "rules/telemetry.rules.yml"], cwd=work, capture_output=True, text=True
        )
        assert rules.returncode == 0, rules.stdout + rules.stderr


def alert(name: str, eval_time: str, fired: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": fired}


def fired(labels: dict[str, str], **annotations: str) -> dict[str, Any]:
    return {"exp_labels": labels, "exp_annotations": annotations}


ING = {"job": "ingest", "instance": "127.0.0.1:8081"}
ING_SEL = 'job="ingest", instance="127.0.0.1:8081"'
NODE = {"job": "node", "instance": "127.0.0.1:9100"}
NODE_SEL = 'job="node", instance="127.0.0.1:9100"'
PG = {"job": "postgres", "instance": "127.0.0.1:9187"}
PG_SEL = 'job="postgres", instance="127.0.0.1:9187"'


def rule_tests() -> list[dict[str, Any]]:
    emqx = {"job": "emqx", "instance": "127.0.0.1:18083"}
    cert_warn = "certificate /etc/t.pem expires in less than 21 days"
    cert_crit = "certificate /etc/t.pem expires in less than 7 days"
    fs = 'fstype="ext4", mountpoint="/"'
    rb = "scripts/runbook/"
    broker_down = {
        "summary": "MQTT broker unreachable (seen by emqx at 127.0.0.1:18083)",
        "runbook": rb + "devices_cannot_connect.py",
    }
    not_stored = {"summary": "ingest is not storing data (127.0.0.1:8081)", "runbook": rb + "data_not_stored.py"}
    cert_rb, disk_rb, mem_rb = rb + "cert_renewal_failed.py", rb + "disk_full.py", rb + "high_memory.py"
    stale = "no verified backup for more than 26 h"
    drill = "the last weekly restore drill failed: backups may not be restorable"
    ext4 = {"fstype": "ext4", "mountpoint": "/"}
    return [
        {  # broker: EMQX endpoint down fires; up is quiet; ingest's MQTT link down also fires
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="emqx", instance="127.0.0.1:18083"}', "values": "0x10"},
                {"series": 'ingest_up{peer="mqtt", job="ingest", instance="i2"}', "values": "1x10"},
            ],
            "alert_rule_test": [
                alert("BrokerDown", "1m", []),  # not for 2m yet
                alert("BrokerDown", "5m", [fired({**emqx, "severity": "critical"}, **broker_down)]),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="emqx", instance="127.0.0.1:18083"}', "values": "1x10"},
                {"series": 'ingest_up{peer="mqtt", job="ingest", instance="i2"}', "values": "0x10"},
            ],
            "alert_rule_test": [
                alert(
                    "BrokerDown",
                    "5m",
                    [
                        fired(
                            {"peer": "mqtt", "job": "ingest", "instance": "i2", "severity": "critical"},
                            summary="MQTT broker unreachable (seen by ingest at i2)",
                            runbook="scripts/runbook/devices_cannot_connect.py",
                        )
                    ],
                )
            ],
        },
        {  # broker (Mosquitto too): the health check's $SYS round trip failed -> fires
            "interval": "1m",
            "input_series": [
                {"series": f'telemetry_health_check_status{{check="broker", {NODE_SEL}}}', "values": "2x10"}
            ],
            "alert_rule_test": [
                alert(
                    "BrokerDown",
                    "5m",
                    [
                        fired(
                            {"check": "broker", **NODE, "severity": "critical"},
                            summary="MQTT broker unreachable (seen by node at 127.0.0.1:9100)",
                            runbook=rb + "devices_cannot_connect.py",
                        )
                    ],
                )
            ],
        },
        {  # everything answers: broker, database and exporters quiet (a warning health check is not "down")
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="emqx", instance="127.0.0.1:18083"}', "values": "1x10"},
                {"series": f'ingest_up{{peer="mqtt", {ING_SEL}}}', "values": "1x10"},
                {"series": f'telemetry_health_check_status{{check="broker", {NODE_SEL}}}', "values": "1x10"},
                {"series": f"up{{{NODE_SEL}}}", "values": "1x10"},
                {"series": f"up{{{PG_SEL}}}", "values": "1x10"},
                {"series": f"pg_up{{{PG_SEL}}}", "values": "1x10"},
            ],
            "alert_rule_test": [
                alert("BrokerDown", "8m", []),
                alert("DatabaseDown", "8m", []),
                alert("ExporterDown", "8m", []),
            ],
        },
        {  # the exporter cannot reach PostgreSQL -> DatabaseDown; node exporter gone -> ExporterDown; the
            # ingest service not answering is IngestNotConsuming, not ExporterDown
            "interval": "1m",
            "input_series": [
                {"series": f"pg_up{{{PG_SEL}}}", "values": "0x20"},
                {"series": f"up{{{PG_SEL}}}", "values": "1x20"},
                {"series": f"up{{{NODE_SEL}}}", "values": "0x20"},
                {"series": f"up{{{ING_SEL}}}", "values": "0x20"},
            ],
            "alert_rule_test": [
                alert("DatabaseDown", "1m", []),  # not for 2m yet
                alert(
                    "DatabaseDown",
                    "5m",
                    [
                        fired(
                            {**PG, "severity": "critical"},
                            summary="PostgreSQL unreachable from the postgres exporter (127.0.0.1:9187)",
                            runbook=rb + "data_not_stored.py",
                        )
                    ],
                ),
                alert(
                    "ExporterDown",
                    "10m",
                    [
                        fired(
                            {**NODE, "severity": "warning"},
                            summary="node at 127.0.0.1:9100 is not answering Prometheus",
                        )
                    ],
                ),
                alert("IngestNotConsuming", "15m", [fired({**ING, "severity": "critical"}, **not_stored)]),
            ],
        },
        {  # ingest: nothing committed while messages wait -> fires
            "interval": "1m",
            "input_series": [
                {"series": f"ingest_messages_committed_total{{{ING_SEL}}}", "values": "100x30"},
                {"series": f"ingest_buffered_messages{{{ING_SEL}}}", "values": "50x30"},
                {"series": f"up{{{ING_SEL}}}", "values": "1x30"},
            ],
            "alert_rule_test": [
                alert("IngestNotConsuming", "20m", [fired({**ING, "severity": "critical"}, **not_stored)])
            ],
        },
        {  # ingest: committing, small steady backlog -> quiet
            "interval": "1m",
            "input_series": [
                {"series": f"ingest_messages_committed_total{{{ING_SEL}}}", "values": "0+100x30"},
                {"series": f"ingest_buffered_messages{{{ING_SEL}}}", "values": "50x30"},
                {"series": f"up{{{ING_SEL}}}", "values": "1x30"},
            ],
            "alert_rule_test": [alert("IngestNotConsuming", "25m", [])],
        },
        {  # ingest: committing but the backlog keeps growing past the threshold -> fires
            "interval": "1m",
            "input_series": [
                {"series": f"ingest_messages_committed_total{{{ING_SEL}}}", "values": "0+100x40"},
                {"series": f"ingest_buffered_messages{{{ING_SEL}}}", "values": "0+200x40"},
                {"series": f"up{{{ING_SEL}}}", "values": "1x40"},
            ],
            "alert_rule_test": [
                alert("IngestNotConsuming", "30m", [fired({**ING, "severity": "critical"}, **not_stored)])
            ],
        },
        {  # rejected: 10% fires, 1% is quiet
            "interval": "1m",
            "input_series": [
                {"series": f'ingest_messages_rejected_total{{reason="bad_json", {ING_SEL}}}', "values": "0+10x40"},
                {"series": f'ingest_messages_received_total{{kind="telemetry", {ING_SEL}}}', "values": "0+100x40"},
                {
                    "series": 'ingest_messages_rejected_total{reason="bad_json", job="ingest", instance="b"}',
                    "values": "0+1x40",
                },
                {
                    "series": 'ingest_messages_received_total{kind="telemetry", job="ingest", instance="b"}',
                    "values": "0+100x40",
                },
            ],
            # sum() over both instances: (10 + 1) / 200 = 5.5 % > 5 %
            "alert_rule_test": [
                alert("RejectedMessagesHigh", "10m", []),  # not for 15m yet
                alert(
                    "RejectedMessagesHigh",
                    "35m",
                    [fired({"severity": "warning"}, summary="more than 5.0% of messages rejected")],
                ),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'ingest_messages_rejected_total{{reason="bad_json", {ING_SEL}}}', "values": "0+1x40"},
                {"series": f'ingest_messages_received_total{{kind="telemetry", {ING_SEL}}}', "values": "0+100x40"},
            ],
            "alert_rule_test": [alert("RejectedMessagesHigh", "35m", [])],
        },
        {  # certificates: 5 days left -> warning and critical; 10 days -> warning only; 30 -> quiet
            "interval": "1m",
            "input_series": [
                {"series": 'telemetry_cert_not_after_timestamp_seconds{path="/etc/t.pem"}', "values": "432000x5"},
                {"series": 'telemetry_cert_not_after_timestamp_seconds{path="/etc/u.pem"}', "values": "864000x5"},
                {"series": 'telemetry_cert_not_after_timestamp_seconds{path="/etc/v.pem"}', "values": "2592000x5"},
            ],
            "alert_rule_test": [
                alert(
                    "CertificateExpiringSoon",
                    "1m",
                    [
                        fired(
                            {"path": "/etc/t.pem", "severity": "warning"},
                            summary=cert_warn,
                            runbook=cert_rb,
                        ),
                        fired(
                            {"path": "/etc/u.pem", "severity": "warning"},
                            summary=cert_warn.replace("t.pem", "u.pem"),
                            runbook=cert_rb,
                        ),
                    ],
                ),
                alert(
                    "CertificateExpiryCritical",
                    "1m",
                    [
                        fired(
                            {"path": "/etc/t.pem", "severity": "critical"},
                            summary=cert_crit,
                            runbook=cert_rb,
                        )
                    ],
                ),
            ],
        },
        {  # disk: 75 % -> warning only; 90 % -> both; 50 % quiet
            "interval": "1m",
            "input_series": [
                {"series": f'node_filesystem_avail_bytes{{{fs}, instance="a"}}', "values": "25x20"},
                {"series": f'node_filesystem_size_bytes{{{fs}, instance="a"}}', "values": "100x20"},
                {"series": f'node_filesystem_avail_bytes{{{fs}, instance="b"}}', "values": "10x20"},
                {"series": f'node_filesystem_size_bytes{{{fs}, instance="b"}}', "values": "100x20"},
                {"series": f'node_filesystem_avail_bytes{{{fs}, instance="c"}}', "values": "50x20"},
                {"series": f'node_filesystem_size_bytes{{{fs}, instance="c"}}', "values": "100x20"},
                {
                    "series": 'node_filesystem_avail_bytes{fstype="tmpfs", mountpoint="/run", instance="a"}',
                    "values": "0x20",
                },
                {
                    "series": 'node_filesystem_size_bytes{fstype="tmpfs", mountpoint="/run", instance="a"}',
                    "values": "100x20",
                },
            ],
            "alert_rule_test": [
                alert(
                    "DiskUsageHigh",
                    "15m",
                    [
                        fired(
                            {**ext4, "instance": "a", "severity": "warning"},
                            summary="/ is 75% full",
                            runbook=disk_rb,
                        ),
                        fired(
                            {**ext4, "instance": "b", "severity": "warning"},
                            summary="/ is 90% full",
                            runbook=disk_rb,
                        ),
                    ],
                ),
                alert(
                    "DiskUsageCritical",
                    "15m",
                    [
                        fired(
                            {**ext4, "instance": "b", "severity": "critical"},
                            summary="/ is 90% full",
                            runbook=disk_rb,
                        )
                    ],
                ),
            ],
        },
        {  # memory: 90 % fires, 50 % quiet
            "interval": "1m",
            "input_series": [
                {"series": 'node_memory_MemAvailable_bytes{instance="a"}', "values": "10x20"},
                {"series": 'node_memory_MemTotal_bytes{instance="a"}', "values": "100x20"},
                {"series": 'node_memory_MemAvailable_bytes{instance="b"}', "values": "50x20"},
                {"series": 'node_memory_MemTotal_bytes{instance="b"}', "values": "100x20"},
            ],
            "alert_rule_test": [
                alert(
                    "MemoryUsageHigh",
                    "15m",
                    [
                        fired(
                            {"instance": "a", "severity": "critical"},
                            summary="memory 90% used",
                            runbook=mem_rb,
                        )
                    ],
                ),
            ],
        },
        {  # backup: a success timestamp that stops moving goes stale after 26 h
            # per-minute samples (node exporter re-exports the textfile value on every scrape)
            "interval": "1m",
            "input_series": [
                {"series": 'telemetry_backup_last_success_timestamp_seconds{instance="a"}', "values": "0x1800"},
                {"series": 'telemetry_backup_last_success_timestamp_seconds{instance="b"}', "values": "0+60x1800"},
                {"series": 'telemetry_backup_drill_last_attempt_success{instance="a"}', "values": "0x1800"},
                {"series": 'telemetry_backup_drill_last_attempt_success{instance="b"}', "values": "1x1800"},
            ],
            "alert_rule_test": [
                alert("BackupStale", "20h", []),
                alert(
                    "BackupStale",
                    "28h",
                    [fired({"instance": "a", "severity": "critical"}, summary=stale)],
                ),
                alert(
                    "RestoreDrillFailed",
                    "1h",
                    [
                        fired(
                            {"instance": "a", "severity": "critical"},
                            summary=drill,
                        )
                    ],
                ),
            ],
        },
        {  # backup: never reported at all -> stale too
            "interval": "1m",
            "input_series": [{"series": 'up{job="node"}', "values": "1x60"}],
            "alert_rule_test": [
                alert(
                    "BackupStale",
                    "45m",
                    [fired({"severity": "critical"}, summary=stale)],
                ),
                alert("RestoreDrillFailed", "45m", []),
            ],
        },
    ]


@needs_promtool
def test_promtool_test_rules_every_alert_fires_and_stays_quiet(tmp_path: Path) -> None:
    rules_text = mon.render_rules(context())
    (tmp_path / "rules.yml").write_text(rules_text)
    tests = rule_tests()
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False)
    )
    cmd = [str(PROMTOOL), "test", "rules", "tests.yml"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Coverage: every alert of the rules file has at least one firing and one quiet case.
    names = {r["alert"] for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"]}
    cases = [c for t in tests for c in t["alert_rule_test"]]
    assert names == {c["alertname"] for c in cases if c["exp_alerts"]}
    assert names == {c["alertname"] for c in cases if not c["exp_alerts"]} | {
        # quiet cases that sit inside other groups as non-matching series (instance b / c / v.pem)
        "CertificateExpiringSoon",
        "CertificateExpiryCritical",
        "DiskUsageHigh",
        "DiskUsageCritical",
        "MemoryUsageHigh",
    }
