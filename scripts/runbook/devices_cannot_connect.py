"""devices_cannot_connect: the broker, its certificate and the database it authenticates against."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts import _common as common
from scripts.runbook._base import Context, Diagnosis, Fix, main


def _broker_restart(ctx: Context) -> Fix:
    broker = common.section(common.section(ctx.config, "health"), "broker")
    if broker.get("kind") == "emqx":
        container = str(common.section(ctx.config, "broker").get("container", "emqx"))
        return Fix(f"restart the EMQX container {container}", ["docker", "restart", container])
    return Fix("restart Mosquitto (sessions are kept in its persistence file)", ["systemctl", "restart", "mosquitto"])


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    d.add(ctx.checks("broker", "certificates", "database"))
    bad = {f.check.split(":")[0] for f in d.faults}
    if "broker" in bad:
        d.cause = "the broker is down or not answering: devices get connection refused/timeouts"
        d.next_command = "systemctl status mosquitto --no-pager; journalctl -u mosquitto -n 50 (EMQX: docker logs emqx)"
        d.fixes.append(_broker_restart(ctx))
    elif "cert" in bad:
        d.cause = "the broker's TLS certificate is expiring or expired: devices fail the TLS handshake"
        d.next_command = "python scripts/runbook/cert_renewal_failed.py"
    elif "database" in bad:
        d.cause = "the database is unreachable: the broker cannot verify device passwords (CONNACK 'not authorized')"
        d.next_command = "python scripts/runbook/db_connections_exhausted.py"
    else:
        d.cause = "broker, certificate and database are fine: check the device's credentials and clock"
        d.next_command = "provision show <DEVICE_ID>   # enabled? then the broker log for its client id"
    return d


if __name__ == "__main__":
    sys.exit(main("devices_cannot_connect", "Devices cannot connect to the broker.", diagnose))
