"""What a newcomer reads at the end of `make lab`: what runs, how to reach it, how to tear it down."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

from tools.lab.deploy import DeployResult
from tools.lab.inventory import LabHost
from tools.lab.target import LAB_DIR, REPO, SSH_CONFIG, LabState, ssh

# What each public port is for, keyed by the group-data setting that holds the port number.
PUBLIC_PORT_SETTINGS = {
    "mqtt_tls_port": "MQTT over TLS (devices)",
    "mqtt_wss_port": "MQTT over WebSocket/TLS (devices)",
}
LOOPBACK_PORT_SETTINGS = {
    "mqtt_loopback_port": "plain MQTT for the co-located ingest service",
    "database_port": "PostgreSQL",
}
WELL_KNOWN = {22: "SSH", 80: "HTTP (ACME challenges)", 443: "HTTPS (provisioning API via nginx)"}


def _port_labels(host: LabHost, settings: dict[str, str]) -> dict[int, str]:
    labels = dict(WELL_KNOWN)
    for key, label in settings.items():
        if host.data.get(key) is not None:
            labels[int(host.data[key])] = label
    return labels


def _listening(state: LabState) -> set[int]:
    out = ssh("ss -Htln", check=False, timeout=30).stdout
    ports = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[3].rsplit(":", 1)[-1].isdigit():
            ports.add(int(cols[3].rsplit(":", 1)[-1]))
    return ports


def _unit_states(units: list[str]) -> dict[str, str]:
    out = ssh("systemctl is-active " + " ".join(shlex.quote(u) for u in units), check=False, timeout=30).stdout
    return dict(zip(units, [*out.split(), *["unknown"] * len(units)], strict=False))


def _health(host: LabHost) -> str:
    """The host's own health check (the script cron runs every 2 minutes), without sending alerts."""
    binary = f"{os.path.dirname(str(host.data['ingest_bin']))}/telemetry-healthcheck"
    done = ssh(f"test -x {binary} && {binary} --no-alerts --json", check=False, timeout=120)
    if not done.stdout.strip():
        return ""
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except ValueError:
        return f"exit {done.returncode}"
    checks = report.get("checks", [])
    bad = [c.get("name", "?") + "=" + str(c.get("status")) for c in checks if c.get("status") not in ("ok", "skipped")]
    return f"exit {done.returncode}; {len(checks)} checks" + (f", not ok: {', '.join(bad)}" if bad else ", all ok")


def render_summary(
    state: LabState,
    host: LabHost,
    deploys: list[DeployResult],
    outcome: dict[str, Any],
    timings: dict[str, float],
) -> str:
    cfg = os.path.relpath(SSH_CONFIG, REPO)
    listening = _listening(state)
    units = _unit_states(host.units)
    public_labels = _port_labels(host, PUBLIC_PORT_SETTINGS)
    loopback_labels = _port_labels(host, LOOPBACK_PORT_SETTINGS)
    lines: list[str] = []
    add = lines.append
    add("")
    add("=" * 78)
    add("The lab is up: a Debian 12 host (systemd container) deployed by pyinfra")
    add("=" * 78)
    add(f"host            {host.name} (groups: {', '.join(host.groups)}; group data: group_data/lab.py)")
    add(f"log in          ssh -F {cfg} lab")
    add(f"roles deployed  {', '.join(host.roles)}  (inventories/lab.py + deploys/all.py)")
    for i, result in enumerate(deploys, 1):
        status = "ok" if result.ok else f"FAILED: {', '.join(result.errors)[:200]}"
        counts = f"{result.operations} operations, {len(result.changed)} changed"
        add(f"deploy #{i}       {counts}, {result.seconds:.1f} s, {status}")
    add("")
    add("services (systemctl is-active on the target)")
    for unit, unit_state in units.items():
        add(f"  {unit:<28} {unit_state}")
    add("")
    add("reach them from this machine (published on 127.0.0.1 only)")
    add(f"  {'SSH':<40} 127.0.0.1:{state.ssh_port}  (ssh -F {cfg} lab)")
    for target_port, local in sorted(state.published.items(), key=lambda kv: int(kv[0])):
        port = int(target_port)
        label = public_labels.get(port, "public port")
        note = "" if port in listening else "  [nothing listens yet: its role has not landed]"
        add(f"  {label + f' ({port})':<40} 127.0.0.1:{local}{note}")
    add("loopback-only on the target (by design): use an SSH tunnel")
    for port, label in sorted(loopback_labels.items()):
        if port in (22, 80, 443) or port not in listening:
            continue
        add(f"  {label + f' ({port})':<40} ssh -F {cfg} -N -L {port + 10000}:127.0.0.1:{port} lab")
    add("")
    traffic = outcome.get("traffic")
    if traffic:
        verdict = "every acknowledged message is in the database" if traffic["ok"] else "MESSAGES MISSING"
        add(f"devices and traffic ({verdict})")
        add(
            f"  {traffic['devices']} devices provisioned, {traffic['connected_max']} connected over TLS; "
            f"{traffic['sent']} messages sent, {traffic['acked']} acknowledged, {traffic['failed']} failed"
        )
        add(f"  telemetry: {traffic['telemetry_acked']} messages acknowledged, "
            f"{traffic['telemetry_messages_in_database']} found in the database "
            f"({traffic['telemetry_rows_in_database']} rows, one per metric), "
            f"{traffic['rejected_messages']} rejected")  # fmt: skip
        add(
            f"  credentials: {os.path.relpath(LAB_DIR / 'devices.json', REPO)}; "
            f"report: {os.path.relpath(LAB_DIR / 'simulator-report.json', REPO)}"
        )
    backup = outcome.get("backup")
    if backup:
        drill = backup.get("drill", {})
        verdict = "tables match the manifest" if drill.get("exit_code") == 0 else "see the JSON"
        add(
            f"backup and restore drill: backup exit {backup['backup']['exit_code']}, "
            f"drill exit {drill.get('exit_code')} ({verdict})"
        )
    health = _health(host)
    if health:
        add(f"health check on the target: {health}")
    add("")
    add("timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    add("check it: .venv/bin/pytest tests/infra --hosts=ssh://root@127.0.0.1:"
        f"{state.ssh_port} --ssh-config={cfg}")  # fmt: skip
    add("tear down: make lab-down   (removes the container and stops the lab's dockerd; image cache stays)")
    add("")
    return "\n".join(lines)


def summary_data(state: LabState) -> dict[str, Any]:
    return {"ssh_port": state.ssh_port, "published": state.published, "ssh_config": state.ssh_config}
