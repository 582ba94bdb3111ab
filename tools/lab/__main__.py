"""CLI of the lab, called by the Makefile: ``python -m tools.lab {all,up,deploy,down,status}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tools.lab.deploy import DeployResult, run_deploy
from tools.lab.inventory import LabHost, load_lab_host
from tools.lab.summary import render_summary
from tools.lab.target import LabError, LabState, down, phase, restart_container, say, ssh, status, up
from tools.lab.traffic import provision_devices, run_traffic, sync_broker_accounts


def ops_binary(host: LabHost, name: str) -> str:
    """A console script of the host virtualenv (next to the ingest CLI the ingest role installs)."""
    return f"{Path(str(host.data['ingest_bin'])).parent}/{name}"


def backup_and_drill(host: LabHost) -> dict[str, Any]:
    """A backup on the target, then the weekly restore drill (scratch database, counts and checksums
    compared with the manifest, dropped): the operations scripts as cron runs them."""
    results: dict[str, Any] = {}
    for label, command in (
        ("backup", f"{ops_binary(host, 'telemetry-backup')} --json"),
        ("drill", f"{ops_binary(host, 'telemetry-restore')} --latest --drill --json"),
    ):
        done = ssh(command, check=False, timeout=900)
        try:
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            results[label] = {"output": done.stdout[-500:]}
        results[label]["exit_code"] = done.returncode
        if done.returncode != 0:
            raise LabError(f"{label} on the target exited {done.returncode}: {done.stderr.strip()[-600:]}")
    return results


def cmd_all(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    with phase("read inventory", timings):
        host = load_lab_host()
    state = up(host.public_ports, timings)
    deploys: list[DeployResult] = []
    with phase("deploy (pyinfra inventories/lab.py deploys/all.py)", timings):
        deploys.append(run_deploy(state, "deploy-1"))
    if not deploys[-1].ok:
        print(render_summary(state, host, deploys, {}, timings))
        say(f"the deploy failed: {', '.join(deploys[-1].errors)} (JSON in .cache/lab/deploy-1.json)")
        return 1
    outcome: dict[str, Any] = {}
    with phase(f"provision {args.count} devices", timings):
        provision_devices(host, args.count)
    if host.data["broker_backend"] == "mosquitto":
        with phase("export the new devices to Mosquitto (its accounts timer's unit)", timings):
            sync_broker_accounts()
    with phase(f"simulator traffic over TLS ({args.duration:g} s)", timings):
        traffic = run_traffic(state, host, duration=args.duration)
    outcome["traffic"] = traffic.to_json()
    with phase("backup and restore drill on the target", timings):
        outcome["backup"] = backup_and_drill(host)
    print(render_summary(state, host, deploys, outcome, timings))
    if not traffic.ok:
        say(f"traffic check failed: {json.dumps(traffic.to_json())}")
        return 1
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    state = _running_state()
    host = load_lab_host()
    provision_devices(host, args.count)
    if host.data["broker_backend"] == "mosquitto":
        sync_broker_accounts()
    traffic = run_traffic(state, host, duration=args.duration)
    print(json.dumps(traffic.to_json()))
    return 0 if traffic.ok else 1


def cmd_drill(args: argparse.Namespace) -> int:
    _running_state()
    print(json.dumps(backup_and_drill(load_lab_host())))
    return 0


def _running_state() -> LabState:
    state = LabState.load()
    if state is None:
        raise LabError("the lab is not up: run `make lab` (or python -m tools.lab up)")
    return state


def cmd_up(args: argparse.Namespace) -> int:
    state = up(load_lab_host().public_ports)
    print(json.dumps({"ssh_port": state.ssh_port, "published": state.published, "ssh_config": state.ssh_config}))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    state = LabState.load()
    if state is None:
        raise LabError("the lab is not up: run `make lab` (or python -m tools.lab up)")
    result = run_deploy(state, args.label)
    print(json.dumps({"changed": result.changed, "errors": result.errors, "seconds": round(result.seconds, 1)}))
    return 0 if result.ok else 1


def cmd_restart(args: argparse.Namespace) -> int:
    state = LabState.load()
    if state is None:
        raise LabError("the lab is not up: run `make lab` (or python -m tools.lab up)")
    with phase("restart target container"):
        restart_container(state)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    down()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(status(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all", help="up + deploy + devices + simulator traffic + backup drill + summary (`make lab`)")
    t = sub.add_parser("traffic", help="provision devices and run the simulator against the target; prints JSON")
    for p in (a, t):
        p.add_argument("--count", type=int, default=100, help="devices to provision and simulate (default 100)")
        p.add_argument("--duration", type=float, default=60.0, help="seconds of simulator traffic (default 60)")
    sub.add_parser("drill", help="backup and restore drill on the running target; prints JSON")
    sub.add_parser("up", help="build (cached) and start the target; prints its ports as JSON")
    d = sub.add_parser("deploy", help="run pyinfra against the running target; prints changes as JSON")
    d.add_argument("--label", default="deploy", help="name of the JSON results file in .cache/lab/")
    sub.add_parser("restart", help="restart the target container (a reboot, as far as a container can)")
    sub.add_parser("down", help="remove the target, stop the lab's dockerd, undo its network changes")
    sub.add_parser("status", help="what is running, as JSON")
    args = parser.parse_args(argv)
    handler = {
        "all": cmd_all,
        "traffic": cmd_traffic,
        "drill": cmd_drill,
        "up": cmd_up,
        "deploy": cmd_deploy,
        "restart": cmd_restart,
        "down": cmd_down,
        "status": cmd_status,
    }
    try:
        return handler[args.command](args)
    except LabError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
