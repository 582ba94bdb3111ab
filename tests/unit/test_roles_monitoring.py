"""monitoring role: rendered Prometheus/Alertmanager files pass promtool/amtool, and every alert rule
has a firing and a quiet case in `promtool test rules`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from roles import monitoring as mon
from roles._base import RoleError
from tests.support.deploy_fake import LIVE_HOST, run_deploys

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")


def defaults(key: str, default: Any = None) -> Any:
    return default


def context(**extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "scrape_interval": "15s",
        "site": "test",
        "rules_glob": "rules/*.yml",
        "ingest_targets": ["127.0.0.1:8081"],
        "emqx_targets": ["127.0.0.1:18083"],
        "alert_email": "ops@example.org",
        "alert_from": "am@example.org",
        "smtp_smarthost": "localhost:25",
        "smtp_require_tls": False,
        "alert_webhook_url": "http://127.0.0.1:9/hook",
        **mon.rules_context(defaults),
    }
    ctx.update(extra)
    return ctx


def test_fake_deploy_uploads_every_file() -> None:
    (r,) = run_deploys("lab", [mon.monitoring], override={"alert_webhook_url": "http://127.0.0.1:9/x"}).values()
    for path in (mon.PROMETHEUS_CONFIG, mon.RULES, mon.ALERTMANAGER_CONFIG, *mon.DEFAULTS.values()):
        assert path in r.files, path
    assert "127.0.0.1:9100" in r.files[mon.PROMETHEUS_CONFIG]
    assert "--collector.textfile.directory=/var/lib/prometheus/node-exporter" in r.files[mon.DEFAULTS["node"]]
    names = " ".join(r.op_names())
    assert "reload prometheus" in names and "restart prometheus-node-exporter" in names
    assert "127.0.0.1:9093" in r.files[mon.DEFAULTS["alertmanager"]]
    assert LIVE_HOST  # the default fake host is a live systemd host


def test_no_receiver_is_refused() -> None:
    with pytest.raises(RoleError, match="alert_email"):
        mon.render_alertmanager(context(alert_email="", alert_webhook_url=""))


def test_mosquitto_backend_has_no_emqx_job() -> None:
    text = mon.render_prometheus(context(emqx_targets=[]))
    assert "job_name: emqx" not in text and "job_name: ingest" in text
    assert "/api/v5/prometheus/stats" in mon.render_prometheus(context())


@needs_promtool
def test_promtool_check_config_and_rules(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "telemetry.yml").write_text(mon.render_rules(context()))
    (tmp_path / "prometheus.yml").write_text(mon.render_prometheus(context()))
    result = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True
    )  # type: ignore[list-item]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "10 rules found" in result.stdout


@pytest.mark.skipif(AMTOOL is None, reason="amtool missing (Debian package prometheus-alertmanager)")
def test_amtool_check_config(tmp_path: Path) -> None:
    for extra in ({}, {"alert_email": ""}, {"alert_webhook_url": ""}):
        path = tmp_path / "alertmanager.yml"
        path.write_text(mon.render_alertmanager(context(**extra)))
        result = subprocess.run([str(AMTOOL), "check-config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def alert(name: str, eval_time: str, fired: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": fired}


def fired(labels: dict[str, str], **annotations: str) -> dict[str, Any]:
    return {"exp_labels": labels, "exp_annotations": annotations}


ING = {"job": "ingest", "instance": "127.0.0.1:8081"}
ING_SEL = 'job="ingest", instance="127.0.0.1:8081"'


def rule_tests() -> list[dict[str, Any]]:
    emqx = {"job": "emqx", "instance": "127.0.0.1:18083"}
    cert_warn = "certificate /etc/t.pem expires in less than 21 days"
    cert_crit = "certificate /etc/t.pem expires in less than 7 days"
    fs = 'fstype="ext4", mountpoint="/"'
    rb = "scripts/runbook/"
    broker_down = {"summary": "MQTT broker unreachable (127.0.0.1:18083)", "runbook": rb + "devices_cannot_connect.py"}
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
                            summary="MQTT broker unreachable (i2)",
                            runbook="scripts/runbook/devices_cannot_connect.py",
                        )
                    ],
                )
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
