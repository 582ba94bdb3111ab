"""boot_check: after a boot, wait until database, broker and ingest are healthy; restart what is not.

Run once per boot by ``telemetry-boot-check.service``, ordered after the stack's units. The components
come from the ``boot_check`` section of the config, in dependency order (database, broker, ingest):
each gets ``wait_seconds`` to become healthy; if it does not, its unit is restarted and it gets
``wait_seconds`` again, at most ``restarts`` times. So the whole run is bounded by
``components x (restarts + 1) x wait_seconds``, and a unit that cannot recover is restarted a few
times, not forever.

The checks are the health check's own (``scripts/healthcheck.py``): the database by connecting and
querying (``database`` section), the broker by EMQX's status API or a Mosquitto ``$SYS`` round trip
(``health.broker``), ingest by its ``/healthz`` (``health.ingest``). A Mosquitto without a health
account (``probe`` in the component) is asked for a CONNACK on its loopback listener: any answer, even
"not authorised", shows the broker serves MQTT. A warning (e.g. many database connections) counts as up.

One summary line per component goes to stdout (the journal) and the log file; if anything stays
unhealthy, an alert goes to the config's ``alerts`` channels.

Exit codes: 0 every component healthy (after restarts, if any); 1 one stayed unhealthy; 2 configuration
or usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scripts/boot_check.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import _common as common
from scripts import healthcheck as hc

# MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, clean session, keep-alive 10 s, empty client id (the
# broker assigns one). No credentials: the answer, not the outcome, is what the probe wants.
CONNECT = bytes([0x10, 12, 0, 4, *b"MQTT", 4, 0x02, 0, 10, 0, 0])
CONNACK = 0x20
# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
_RETURN_CODES = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
COMPONENTS = ("database", "broker", "ingest")

Check = Callable[[], hc.CheckResult]
Restart = Callable[[str], str | None]


def probe_mqtt(cfg: Mapping[str, Any]) -> hc.CheckResult:
    """Send a CONNECT, expect a CONNACK. "Server unavailable" (3) is the one answer that means down."""
    host, port = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 1883))
    timeout = float(cfg.get("timeout", 5))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(CONNECT)
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        return hc.CheckResult("broker", hc.CRIT, f"MQTT {host}:{port} unreachable: {exc}")
    if len(answer) < 4 or answer[0] != CONNACK:
        return hc.CheckResult("broker", hc.CRIT, f"MQTT {host}:{port} sent no CONNACK ({answer.hex() or 'nothing'})")
    code = answer[3]
    meaning = _RETURN_CODES.get(code, f"code {code}")
    if code == 3:
        return hc.CheckResult("broker", hc.CRIT, f"MQTT {host}:{port} answered: {meaning}")
    return hc.CheckResult("broker", hc.OK, f"MQTT {host}:{port} answers CONNACK ({meaning})")


def component_check(name: str, spec: Mapping[str, Any], config: common.Config) -> Check:
    """The check of one component, from the same sections the health check reads."""
    health = common.section(config, "health")
    if name == "database":
        database = {**common.section(config, "database"), **common.section(health, "database")}
        if not database.get("dsn"):
            raise common.ConfigError("boot_check: component database needs database.dsn in the config")
        return lambda: hc.check_database(database)
    if name == "broker":
        if spec.get("probe"):
            probe = dict(spec["probe"])
            return lambda: probe_mqtt(probe)
        broker = common.section(health, "broker")
        if not broker:
            raise common.ConfigError("boot_check: component broker needs health.broker or a probe")
        if broker.get("kind") == "emqx":
            return lambda: hc.check_emqx(broker)
        return lambda: hc.check_mosquitto(broker)
    if name == "ingest":
        ingest = common.section(health, "ingest")
        if not ingest.get("url"):
            raise common.ConfigError("boot_check: component ingest needs health.ingest.url in the config")
        return lambda: hc.check_ingest(ingest)
    raise common.ConfigError(f"boot_check: unknown component {name!r} (one of {', '.join(COMPONENTS)})")


@dataclass
class Component:
    name: str
    unit: str
    check: Check


@dataclass
class Outcome:
    name: str
    unit: str
    healthy: bool
    detail: str
    restarts: int = 0
    seconds: float = 0.0
    restart_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Timing:
    wait_seconds: float
    interval_seconds: float
    restarts: int


def healthy(result: hc.CheckResult) -> bool:
    return result.status in (hc.OK, hc.WARN)


def wait_healthy(
    check: Check, wait_seconds: float, interval: float, clock: Callable[[], float], sleep: Callable[[float], None]
) -> hc.CheckResult:
    """Check until healthy or ``wait_seconds`` passed; the last result either way."""
    deadline = clock() + wait_seconds
    while True:
        try:
            result = check()
        except Exception as exc:  # a check that crashes is an unhealthy component, not a crashed boot check
            result = hc.CheckResult("check", hc.CRIT, f"check failed: {type(exc).__name__}: {exc}")
        if healthy(result) or clock() + interval > deadline:
            return result
        sleep(interval)


def systemctl_restart(unit: str) -> str | None:
    """Queue a restart and return at once (``--no-block``): the wait that follows bounds it, and a
    unit whose start hangs cannot hang the boot check. None on success, else systemctl's message."""
    try:
        proc = subprocess.run(
            ["systemctl", "restart", "--no-block", unit], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"systemctl exited {proc.returncode}")


def run_boot_check(
    components: Sequence[Component],
    timing: Timing,
    restart: Restart | None,
    logger: logging.Logger,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Outcome]:
    """One component after the other, in the given (dependency) order. ``restart=None``: look only."""
    outcomes = []
    for c in components:
        started = clock()
        result = wait_healthy(c.check, timing.wait_seconds, timing.interval_seconds, clock, sleep)
        outcome = Outcome(c.name, c.unit, healthy(result), result.detail)
        while not outcome.healthy and restart is not None and outcome.restarts < timing.restarts:
            outcome.restarts += 1
            logger.warning(
                "%s unhealthy (%s): restarting %s (%d/%d)",
                c.name,
                result.detail,
                c.unit,
                outcome.restarts,
                timing.restarts,
            )
            error = restart(c.unit)
            if error:
                outcome.restart_errors.append(error)
                logger.error("restart of %s failed: %s", c.unit, error)
            result = wait_healthy(c.check, timing.wait_seconds, timing.interval_seconds, clock, sleep)
            outcome.healthy, outcome.detail = healthy(result), result.detail
        outcome.seconds = round(clock() - started, 1)
        outcomes.append(outcome)
    return outcomes


def summary_line(o: Outcome) -> str:
    state = "healthy" if o.healthy else "UNHEALTHY"
    after = f" after {o.restarts} restart{'s' if o.restarts != 1 else ''}" if o.restarts else ""
    return f"{o.name} ({o.unit}): {state}{after} in {o.seconds:g} s: {o.detail}"


def load_components(config: common.Config) -> tuple[list[Component], Timing]:
    section = common.section(config, "boot_check")
    specs = section.get("components") or []
    if not isinstance(specs, list):
        raise common.ConfigError("boot_check.components must be a list")
    components = []
    for spec in specs:
        if not isinstance(spec, dict) or not spec.get("name") or not spec.get("unit"):
            raise common.ConfigError("each boot_check component needs a name and a unit")
        name, unit = str(spec["name"]), str(spec["unit"])
        components.append(Component(name, unit, component_check(name, spec, config)))
    timing = Timing(
        wait_seconds=float(section.get("wait_seconds", 180)),
        interval_seconds=float(section.get("interval_seconds", 5)),
        restarts=int(section.get("restarts", 2)),
    )
    if timing.wait_seconds <= 0 or timing.interval_seconds <= 0 or not 0 <= timing.restarts <= 10:
        raise common.ConfigError("boot_check: wait_seconds and interval_seconds > 0, restarts 0-10")
    return components, timing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boot-check",
        description="After a boot: wait for database, broker and ingest health (config section boot_check), "
        "restart what stays unhealthy (bounded), log a summary. Exit codes: 0 all healthy, 1 something stayed "
        "unhealthy, 2 configuration error.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--wait-seconds", type=float, help="per component and attempt (default: from the config)")
    parser.add_argument("--restarts", type=int, help="restarts per component (default: from the config)")
    parser.add_argument("--no-restart", action="store_true", help="wait and report only, restart nothing")
    parser.add_argument("--no-alerts", action="store_true", help="do not alert when something stays unhealthy")
    return parser


def main(argv: Sequence[str] | None = None, restart: Restart = systemctl_restart) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = common.config_from_args(args)
        logger = common.setup_logging("boot_check", common.log_file_from(args, config, "boot_check"), args.verbose)
        components, timing = load_components(config)
    except common.ConfigError as exc:
        print(f"boot-check: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    timing = Timing(
        wait_seconds=args.wait_seconds if args.wait_seconds is not None else timing.wait_seconds,
        interval_seconds=timing.interval_seconds,
        restarts=args.restarts if args.restarts is not None else timing.restarts,
    )
    outcomes = run_boot_check(components, timing, None if args.no_restart else restart, logger)
    ok = all(o.healthy for o in outcomes)
    for o in outcomes:
        (logger.info if o.healthy else logger.error)("%s", summary_line(o))
    restarted = sum(o.restarts for o in outcomes)
    verdict = (
        f"boot check: {'all healthy' if ok else 'UNHEALTHY: ' + ', '.join(o.name for o in outcomes if not o.healthy)}"
        f" ({len(outcomes)} components, {restarted} restarts)"
    )
    (logger.info if ok else logger.error)("%s", verdict)
    alerts = common.section(config, "alerts")
    if not ok and alerts and not args.no_alerts:
        host = os.uname().nodename
        common.deliver_alert(
            alerts,
            f"[telemetry] boot check FAILED on {host}",
            {
                "check": "boot_check",
                "status": "critical",
                "host": host,
                "detail": "; ".join(summary_line(o) for o in outcomes if not o.healthy),
            },
            logger,
        )
    common.emit(
        args,
        {"status": "ok" if ok else "unhealthy", "components": [asdict(o) for o in outcomes]},
        "\n".join([*(summary_line(o) for o in outcomes), verdict]),
    )
    return common.EXIT_OK if ok else common.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
