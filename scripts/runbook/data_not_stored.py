"""data_not_stored: broker -> ingest -> database, checked in the order the data flows."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts import _common as common
from scripts.runbook._base import Context, Diagnosis, Fix, main


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    d.add(ctx.checks("broker", "ingest", "database", "disk"))
    bad = {f.check.split(":")[0] for f in d.faults}
    unit = str(common.section(ctx.config, "runbook").get("ingest_unit", "telemetry-ingest"))
    if "database" in bad:
        d.cause = "the database is unreachable or out of connections: ingest buffers and retries, nothing is stored"
        d.next_command = "python scripts/runbook/db_connections_exhausted.py"
    elif "disk" in bad:
        d.cause = "the disk is (nearly) full: PostgreSQL stops accepting writes"
        d.next_command = "python scripts/runbook/disk_full.py"
    elif "broker" in bad:
        d.cause = "the broker is down: no messages reach the ingest service"
        d.next_command = "python scripts/runbook/devices_cannot_connect.py"
    elif "ingest" in bad:
        d.cause = f"the ingest service is down or unhealthy ({unit})"
        d.next_command = f"systemctl status {unit} --no-pager; journalctl -u {unit} -n 100"
        d.fixes.append(
            Fix(f"restart {unit} (unacknowledged QoS 1 messages are redelivered)", ["systemctl", "restart", unit])
        )
    else:
        d.cause = (
            "the pipeline is healthy: check that devices publish on devices/<id>/telemetry and the rejected messages"
        )
        d.next_command = (
            'psql -c "SELECT reason, count(*) FROM rejected_messages'
            " WHERE received_at > now() - interval '1 hour' GROUP BY 1\""
        )
    return d


if __name__ == "__main__":
    sys.exit(main("data_not_stored", "Telemetry is not being stored.", diagnose))
