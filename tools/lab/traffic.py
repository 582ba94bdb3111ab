"""The lab's traffic phases: provision devices on the target, drive the simulator at its broker over TLS
through the published 127.0.0.1 port, and find the acknowledged messages in the target's database.

Everything on the target goes through SSH and the host virtualenv the ingest role installed; the
database is reached as the ``postgres`` OS user over its Unix socket (peer authentication), so no
database password leaves the target and none is needed on this machine. Device passwords travel
once, over SSH, into a 0600 file under the lab's state directory.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roles.broker_mosquitto import SYNC_SERVICE
from tools.lab.inventory import LabHost
from tools.lab.target import LAB_DIR, REPO, LabError, LabState, say, ssh

DEVICE_PREFIX = "lab-"
DEVICES_FILE = LAB_DIR / "devices.json"
CA_FILE = LAB_DIR / "broker-ca.pem"
REPORT_FILE = LAB_DIR / "simulator-report.json"

# Runs on the target with the host virtualenv's Python: adds the missing devices, rotates the
# existing ones (their passwords were printed once, earlier, and are not kept on the target), and
# prints every device's new credentials as JSON. One process instead of one `provision` per device.
_PROVISION = """
import json, sys
from ingest import provisioning as prov
from ingest.db import PsycopgSession
wanted = sys.argv[2:]
db = PsycopgSession.connect(sys.argv[1])
known = {a.username for a in prov.list_accounts(db, kind="device")}
creds = prov.add_devices(db, [d for d in wanted if d not in known], type="thermalog", name="lab device")
creds += [prov.rotate(db, d) for d in wanted if d in known]
print(json.dumps([{"device_id": c.device_id, "username": c.username, "password": c.password} for c in creds]))
"""


def _venv_python(host: LabHost) -> str:
    return str(Path(str(host.data["ingest_bin"])).parent / "python")


def _as_postgres(command: str) -> str:
    return f"runuser -u postgres -- {command}"


def _local_dsn(host: LabHost) -> str:
    return f"host=/var/run/postgresql dbname={host.data['database_name']}"


def psql(host: LabHost, sql: str) -> str:
    """One value from the target's database (as postgres, read-only use)."""
    cmd = _as_postgres(f"psql -XAtq -d {shlex.quote(str(host.data['database_name']))} -c {shlex.quote(sql)}")
    return ssh(cmd, timeout=60).stdout.strip()


def device_ids(count: int) -> list[str]:
    return [f"{DEVICE_PREFIX}{i:04d}" for i in range(1, count + 1)]


def provision_devices(host: LabHost, count: int = 100) -> Path:
    """Devices on the target (added or re-keyed), their credentials in DEVICES_FILE (0600)."""
    ids = device_ids(count)
    script = shlex.quote(_PROVISION)
    cmd = _as_postgres(f"{_venv_python(host)} -c {script} {shlex.quote(_local_dsn(host))} {' '.join(ids)}")
    result = ssh(cmd, check=False, timeout=300)
    if result.returncode != 0:
        raise LabError(f"provisioning {count} devices on the target failed: {result.stderr.strip()[-500:]}")
    creds = json.loads(result.stdout)
    if sorted(c["device_id"] for c in creds) != ids:
        raise LabError(f"provisioning returned {len(creds)} credentials for {count} devices")
    DEVICES_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEVICES_FILE.touch(mode=0o600)
    DEVICES_FILE.chmod(0o600)
    DEVICES_FILE.write_text(json.dumps(sorted(creds, key=lambda c: c["device_id"]), indent=1))
    say(f"{count} devices provisioned on the target; credentials in {DEVICES_FILE.relative_to(REPO)} (0600)")
    return DEVICES_FILE


def sync_broker_accounts() -> None:
    """Run now what the Mosquitto accounts timer runs every 30 s: export, reload on change."""
    done = ssh(f"systemctl start {SYNC_SERVICE}", check=False, timeout=120)
    if done.returncode != 0:
        journal = ssh(f"journalctl -u {SYNC_SERVICE} -n 5 --no-pager", check=False).stdout
        raise LabError(f"{SYNC_SERVICE} failed on the target: {journal.strip()[-600:]}")


def fetch_broker_ca(host: LabHost) -> Path:
    """The certificate chain the broker serves. The lab's certificate is self-signed (no public ACME
    server is reachable), so the chain is its own trust anchor: the simulator still verifies it."""
    pem = ssh(f"cat {shlex.quote(str(host.data['tls_cert_file']))}", timeout=30).stdout
    if "BEGIN CERTIFICATE" not in pem:
        raise LabError(f"no certificate at {host.data['tls_cert_file']} on the target")
    CA_FILE.write_text(pem)
    return CA_FILE


def server_name(host: LabHost) -> str:
    """The name on the broker's certificate: the first of tls_domains, else the host's name."""
    domains = list(host.data.get("tls_domains") or [])
    return str(domains[0]) if domains else host.name


@dataclass
class TrafficResult:
    report: dict[str, Any]
    telemetry_acked: int
    messages_found: int
    rows: int
    rejected: int
    seconds_to_land: float

    @property
    def ok(self) -> bool:
        return self.report["totals"]["failed"] == 0 and self.messages_found == self.telemetry_acked > 0

    def to_json(self) -> dict[str, Any]:
        totals = self.report["totals"]
        return {
            "ok": self.ok,
            "devices": self.report["count"],
            "connected_max": totals["connected_max"],
            "sent": totals["sent"],
            "acked": totals["acked"],
            "failed": totals["failed"],
            "telemetry_acked": self.telemetry_acked,
            "telemetry_messages_in_database": self.messages_found,
            "telemetry_rows_in_database": self.rows,
            "rejected_messages": self.rejected,
            "seconds_until_all_landed": round(self.seconds_to_land, 1),
        }


def _messages_since(host: LabHost, since: float) -> tuple[int, int]:
    """(distinct messages, rows) of the lab devices since ``since``: one row per numeric field, so a
    message is a (device, time) pair (the simulator's timestamps are unique per device)."""
    out = psql(
        host,
        "SELECT count(DISTINCT (t.device, t.time)), count(*) FROM telemetry t JOIN devices d ON d.id = t.device "
        f"WHERE d.device_id LIKE '{DEVICE_PREFIX}%' AND t.time >= to_timestamp({since - 5:.3f})",
    )
    messages, rows = out.split("|")
    return int(messages), int(rows)


def run_traffic(state: LabState, host: LabHost, *, duration: float = 60.0, land_timeout: float = 60.0) -> TrafficResult:
    """The simulator at the broker's TLS port (published on 127.0.0.1) for ``duration`` seconds with
    every provisioned device at one telemetry message per 10 s (QoS 1); then wait until every
    message the broker acknowledged is in the database (the ingest service commits in batches)."""
    tls_port = str(host.data["mqtt_tls_port"])
    if tls_port not in state.published:
        raise LabError(f"the broker's TLS port {tls_port} is not published by the lab")
    if not DEVICES_FILE.is_file():
        raise LabError("no lab devices: run the provisioning phase first (python -m tools.lab traffic)")
    ca = fetch_broker_ca(host)
    cmd = [
        sys.executable, "-m", "simulator.cli", "run",
        "--broker", f"mqtts://127.0.0.1:{state.published[tls_port]}",
        "--tls-server-name", server_name(host), "--ca", str(ca),
        "--devices", str(DEVICES_FILE), "--interval", "10s", "--duration", f"{duration:g}s",
        "--qos", "1", "--mqtt", "3.1.1", "--report", str(REPORT_FILE), "--max-errors", "0",
        "--progress-interval", "10s",
    ]  # fmt: skip
    say(f"simulator: {len(json.loads(DEVICES_FILE.read_text()))} devices over TLS for {duration:g} s")
    sim = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=duration + 300, check=False)
    if not REPORT_FILE.is_file() or sim.returncode not in (0, 1):
        raise LabError(f"simulator failed ({sim.returncode}): {sim.stderr.strip()[-800:]}")
    report = json.loads(REPORT_FILE.read_text())
    acked = int(report["totals"]["by_kind"]["telemetry"]["acked"])
    since = float(report["started_at"])
    start = time.monotonic()
    messages, rows = _messages_since(host, since)
    while messages < acked and time.monotonic() - start < land_timeout:
        time.sleep(1)
        messages, rows = _messages_since(host, since)
    rejected = int(psql(host, f"SELECT count(*) FROM rejected_messages WHERE received_at >= to_timestamp({since:.3f})"))
    return TrafficResult(report, acked, messages, rows, rejected, time.monotonic() - start)
