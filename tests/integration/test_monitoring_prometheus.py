"""The rendered Prometheus and Alertmanager configuration, run by the real Debian binaries.

A stand-in node exporter serves the textfile metrics the health check and the restore drill write
(a certificate 3 days from expiry, a failed drill, a fresh backup); Prometheus loads the deployed rule
file, fires exactly the alerts those readings call for, labelled with the host, and hands them to
Alertmanager, which accepts them under the deployed configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles import monitoring as mon
from tests.support.deploy_fake import run_deploys
from tests.support.ports import LOOPBACK, free_port

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None, reason="prometheus / alertmanager not installed"),
]

NOW = time.time()
TEXTFILE_METRICS = (
    "# TYPE telemetry_cert_not_after_timestamp_seconds gauge\n"
    f'telemetry_cert_not_after_timestamp_seconds{{path="/etc/telemetry/tls/fullchain.pem"}} {NOW + 3 * 86400}\n'
    "# TYPE telemetry_backup_last_success_timestamp_seconds gauge\n"
    f"telemetry_backup_last_success_timestamp_seconds {NOW}\n"
    "# TYPE telemetry_backup_drill_last_attempt_success gauge\n"
    "telemetry_backup_drill_last_attempt_success 0\n"
)


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[str]:
    """A static /metrics in a child process (pyinfra's gevent patching and a server thread in this
    process do not mix). Prometheus 2 parses a response without a known content type as text."""
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "metrics").write_text(TEXTFILE_METRICS)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", LOOPBACK, "--directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("the stand-in node exporter", lambda: "telemetry_" in get_text(f"http://{LOOPBACK}:{port}/metrics"))
        yield f"{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- a loopback test URL
        return str(response.read().decode())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 -- a loopback test URL
        return json.load(response)


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def test_rules_fire_and_reach_alertmanager(tmp_path: Path, node_exporter: str) -> None:
    prom_port, am_port = free_port(), free_port()
    # The files the deploy writes for the lab's database host, pointed at this test's ports and folders.
    override = {
        "prometheus_listen_address": f"{LOOPBACK}:{prom_port}",
        "alertmanager_listen_address": f"{LOOPBACK}:{am_port}",
        "node_exporter_listen_address": node_exporter,
        "prometheus_scrape_interval": "1s",
        "alert_webhook_url": "http://127.0.0.1:9/unused",
    }
    (r,) = run_deploys("lab", [mon.monitoring], override=override).values()
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "telemetry.rules.yml").write_text(r.files[mon.RULES])
    (tmp_path / "prometheus.yml").write_text(r.files[mon.PROMETHEUS_CONFIG].replace(mon.RULES_DIR, str(rules_dir)))
    (tmp_path / "alertmanager.yml").write_text(r.files[mon.ALERTMANAGER_CONFIG])

    procs = [
        start(
            [str(ALERTMANAGER), f"--config.file={tmp_path / 'alertmanager.yml'}",
             f"--storage.path={tmp_path / 'am'}", f"--web.listen-address={LOOPBACK}:{am_port}",
             "--cluster.listen-address="],
            tmp_path / "alertmanager.log",
        ),
        start(
            [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={LOOPBACK}:{prom_port}"],
            tmp_path / "prometheus.log",
        ),
    ]  # fmt: skip
    try:
        prom = f"http://{LOOPBACK}:{prom_port}"
        am = f"http://{LOOPBACK}:{am_port}"

        def node_up() -> bool:
            targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            return any(t["labels"]["job"] == "node" and t["health"] == "up" for t in targets)

        wait_for("the node job scraped", node_up)

        def firing() -> dict[str, dict[str, str]]:
            alerts = get_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
            return {a["labels"]["alertname"]: a["labels"] for a in alerts if a["state"] == "firing"}

        wanted = {"CertificateExpiringSoon", "CertificateExpiryCritical", "RestoreDrillFailed"}
        alerts = wait_for("the textfile alerts firing", lambda: wanted <= set(firing()) and firing())
        # A fresh backup: BackupStale stays quiet (its `for` would hide it anyway, so check the rule's state).
        groups = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
        stale = next(rule for g in groups for rule in g["rules"] if rule["name"] == "BackupStale")
        assert stale["state"] == "inactive" and stale["health"] == "ok"
        assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups
        assert alerts["CertificateExpiryCritical"]["path"] == "/etc/telemetry/tls/fullchain.pem"

        def received() -> dict[str, dict[str, str]]:
            return {a["labels"]["alertname"]: a["labels"] for a in get_json(f"{am}/api/v2/alerts")}

        at_am = wait_for("the alerts at Alertmanager", lambda: wanted <= set(received()) and received())
        # External labels say which host and environment an e-mail or webhook is about.
        assert at_am["RestoreDrillFailed"]["host"] == "lab.telemetry.test"
        assert at_am["RestoreDrillFailed"]["environment"] == "lab"
        assert at_am["RestoreDrillFailed"]["severity"] == "critical"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
