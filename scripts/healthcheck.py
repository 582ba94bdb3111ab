"""healthcheck: is the platform healthy right now, and tell someone once when it is not.

Checks (each only when configured): broker (Mosquitto ``$SYS`` round trip or EMQX ``/api/v5/status``),
database (connect, query, connection headroom), ingest ``/healthz``, containers' Docker health,
certificate expiry (warn < 21 d, critical < 7 d), disk (warn 70 %, critical 85 %), memory (warn 60 %,
critical 85 %), backup age (critical > 26 h). Readings of disk and memory can be injected
(``--reading disk:/=91``) so tests and runbooks exercise thresholds without filling a disk.

Alerts go to the webhook and/or SMTP of the config's ``alerts`` section. The state file remembers,
per check, what was last alerted and when: one alert when a check goes bad, nothing more within the
cooldown (a flapping check cannot spam), an immediate alert when warning becomes critical, one
recovery notice when it is good again.

Exit codes: 0 all ok; 1 something critical; 2 configuration error; 4 warnings only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scripts/healthcheck.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
import psycopg
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from ingest import dbconfig
from ingest.files import write_atomic
from scripts import _common as common
from scripts.backup import list_archives

OK, WARN, CRIT, SKIP = "ok", "warning", "critical", "skipped"
_RANK = {OK: 0, SKIP: 0, WARN: 1, CRIT: 2}


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str
    value: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def level(value: float, warn: float, crit: float) -> str:
    return CRIT if value >= crit else WARN if value >= warn else OK


# --- readings (injectable) ---------------------------------------------------------------------


def disk_used_percent(path: str) -> float:
    """As ``df`` shows it: used / (used + available to unprivileged users)."""
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return 100.0 * used / (used + avail) if used + avail else 0.0


def memory_used_percent(meminfo: Path = Path("/proc/meminfo")) -> float:
    """(MemTotal - MemAvailable) / MemTotal: page cache is reclaimable, so it is not 'used'."""
    values: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return 100.0 * (values["MemTotal"] - values["MemAvailable"]) / values["MemTotal"]


@dataclass
class Readings:
    """Injected values win over measurements: ``disk`` by mount path, ``memory`` in percent."""

    disk: dict[str, float] = field(default_factory=dict)
    memory: float | None = None

    def disk_percent(self, path: str) -> float:
        return self.disk[path] if path in self.disk else disk_used_percent(path)

    def memory_percent(self) -> float:
        return self.memory if self.memory is not None else memory_used_percent()

    @classmethod
    def parse(cls, items: Sequence[str]) -> Readings:
        readings = cls()
        for item in items:
            name, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                raise common.ConfigError(f"--reading {item!r}: expected disk:/path=PERCENT or memory=PERCENT") from None
            if name == "memory":
                readings.memory = number
            elif name.startswith("disk:"):
                readings.disk[name[5:]] = number
            else:
                raise common.ConfigError(f"--reading {item!r}: expected disk:/path=PERCENT or memory=PERCENT")
        return readings


# --- checks --------------------------------------------------------------------------------------


def check_mosquitto(cfg: Mapping[str, Any]) -> CheckResult:
    """Connect, subscribe to ``$SYS/broker/uptime`` and wait for the broker's own (retained) answer:
    proves TLS, authentication, the ACL and the broker's loop, not just an open port."""
    timeout = float(cfg.get("timeout", 5))
    host, port = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 8883))
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="", reconnect_on_failure=False)
    if cfg.get("username"):
        password = Path(cfg["password_file"]).read_text().strip() if cfg.get("password_file") else None
        client.username_pw_set(str(cfg["username"]), password)
    if cfg.get("tls", True):
        ctx = ssl.create_default_context(cafile=cfg.get("ca_file"))
        client.tls_set_context(ctx)
    got = threading.Event()
    connected: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        connected["rc"] = rc
        if not rc.is_failure:
            c.subscribe("$SYS/broker/uptime", 0)
        else:
            got.set()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        connected["uptime"] = msg.payload.decode(errors="replace")
        got.set()

    client.on_connect = on_connect
    client.on_message = on_message
    started = time.monotonic()
    try:
        client.connect(host, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return CheckResult("broker", CRIT, f"Mosquitto {host}:{port} unreachable: {exc}")
    client.loop_start()
    try:
        got.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    rc = connected.get("rc")
    if rc is not None and rc.is_failure:
        return CheckResult("broker", CRIT, f"Mosquitto {host}:{port} refused the health account: {rc}")
    if "uptime" not in connected:
        return CheckResult("broker", CRIT, f"no $SYS answer from Mosquitto {host}:{port} within {timeout:g}s")
    rtt = time.monotonic() - started
    return CheckResult("broker", OK, f"Mosquitto {host}:{port} answered in {rtt * 1000:.0f} ms", round(rtt, 4))


def _http_get(url: str, timeout: float, headers: Mapping[str, str] = {}) -> tuple[int, bytes]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 -- scheme checked
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read(65536)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(65536)


def check_emqx(cfg: Mapping[str, Any]) -> CheckResult:
    url = str(cfg.get("url", "http://127.0.0.1:18083/api/v5/status"))
    try:
        status, body = _http_get(url, float(cfg.get("timeout", 5)))
    except (OSError, ValueError) as exc:
        return CheckResult("broker", CRIT, f"EMQX status {url} unreachable: {exc}")
    text = body.decode(errors="replace").strip()
    if status == 200 and "is running" in text:
        return CheckResult("broker", OK, f"EMQX: {text.splitlines()[0][:120]}")
    return CheckResult("broker", CRIT, f"EMQX status HTTP {status}: {text[:200]}")


def check_database(cfg: Mapping[str, Any]) -> CheckResult:
    try:
        conninfo = dbconfig.build_conninfo(
            cfg.get("dsn"), Path(cfg["password_file"]) if cfg.get("password_file") else None
        )
    except dbconfig.ConfigError as exc:
        return CheckResult("database", CRIT, f"database config: {exc}")
    try:
        with psycopg.connect(conninfo, connect_timeout=int(cfg.get("timeout", 5)), autocommit=True) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pg_stat_activity), current_setting('max_connections')::int"
            ).fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        return CheckResult("database", CRIT, f"database unreachable: {first}")
    assert row is not None
    used = 100.0 * row[0] / row[1]
    status = level(used, float(cfg.get("connections_warn", 80)), float(cfg.get("connections_crit", 95)))
    return CheckResult(
        "database", status, f"connected; {row[0]}/{row[1]} connections ({used:.0f}%)", used, {"connections": row[0]}
    )


def check_ingest(cfg: Mapping[str, Any]) -> CheckResult:
    url = str(cfg["url"])
    try:
        status, body = _http_get(url, float(cfg.get("timeout", 5)))
    except (OSError, ValueError) as exc:
        return CheckResult("ingest", CRIT, f"ingest {url} unreachable: {exc}")
    try:
        detail = json.loads(body)
    except ValueError:
        detail = {}
    if status != 200:
        return CheckResult("ingest", CRIT, f"ingest {url} unhealthy (HTTP {status}): {body[:200]!r}", data=detail)
    return CheckResult("ingest", OK, f"ingest {url} healthy", data=detail if isinstance(detail, dict) else {})


def check_containers(cfg: Mapping[str, Any]) -> list[CheckResult]:
    docker = str(cfg.get("docker", "docker"))
    results = []
    for name in cfg.get("containers", []):
        check = f"container:{name}"
        try:
            out = subprocess.run(
                [docker, "inspect", "--format", "{{json .State}}", str(name)],
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            results.append(CheckResult(check, CRIT, f"docker inspect failed: {exc}"))
            continue
        if out.returncode != 0:
            results.append(CheckResult(check, CRIT, f"container {name} not found: {out.stderr.strip()[:200]}"))
            continue
        state = json.loads(out.stdout)
        health = (state.get("Health") or {}).get("Status")
        if not state.get("Running"):
            results.append(CheckResult(check, CRIT, f"container {name} is {state.get('Status')}"))
        elif health in (None, "healthy"):
            results.append(CheckResult(check, OK, f"container {name} running{', healthy' if health else ''}"))
        elif health == "starting":
            results.append(CheckResult(check, WARN, f"container {name} health: starting"))
        else:
            results.append(CheckResult(check, CRIT, f"container {name} health: {health}"))
    return results


def check_certificates(cfg: Mapping[str, Any], now: dt.datetime) -> list[CheckResult]:
    warn, crit = float(cfg.get("warn_days", 21)), float(cfg.get("crit_days", 7))
    results = []
    for path in cfg.get("paths", []):
        check = f"cert:{path}"
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())  # the leaf is first in a chain
        except (OSError, ValueError) as exc:
            results.append(CheckResult(check, CRIT, f"cannot read certificate {path}: {exc}"))
            continue
        days = (cert.not_valid_after_utc - now).total_seconds() / 86400
        status = CRIT if days < crit else WARN if days < warn else OK
        results.append(
            CheckResult(check, status, f"{path} expires {cert.not_valid_after_utc:%Y-%m-%d} ({days:.1f} days)", days)
        )
    return results


def check_disk(cfg: Mapping[str, Any], readings: Readings) -> list[CheckResult]:
    warn, crit = float(cfg.get("warn", 70)), float(cfg.get("crit", 85))
    results = []
    for path in cfg.get("paths", ["/"]):
        used = readings.disk_percent(str(path))
        results.append(CheckResult(f"disk:{path}", level(used, warn, crit), f"{path} {used:.0f}% used", used))
    return results


def check_memory(cfg: Mapping[str, Any], readings: Readings) -> CheckResult:
    used = readings.memory_percent()
    status = level(used, float(cfg.get("warn", 60)), float(cfg.get("crit", 85)))
    return CheckResult("memory", status, f"memory {used:.0f}% used", used)


def check_backup(cfg: Mapping[str, Any], now: dt.datetime) -> CheckResult:
    directory = Path(str(cfg["dir"]))
    max_age = float(cfg.get("max_age_hours", 26))
    try:
        archives = list_archives(directory, str(cfg.get("prefix", "telemetry")))
    except OSError as exc:
        return CheckResult("backup", CRIT, f"cannot list {directory}: {exc.strerror}")
    if not archives:
        return CheckResult("backup", CRIT, f"no backup in {directory}")
    newest, path = archives[0]
    hours = (now - newest).total_seconds() / 3600
    status = CRIT if hours > max_age else OK
    return CheckResult("backup", status, f"newest backup {path.name} is {hours:.1f} h old", hours)


def run_checks(config: common.Config, readings: Readings, now: dt.datetime, only: set[str] | None) -> list[CheckResult]:
    health = common.section(config, "health")
    wanted: Callable[[str], bool] = lambda name: only is None or name in only  # noqa: E731
    results: list[CheckResult] = []
    broker = common.section(health, "broker")
    if broker and wanted("broker"):
        results.append(check_emqx(broker) if broker.get("kind") == "emqx" else check_mosquitto(broker))
    database = {**common.section(config, "database"), **common.section(health, "database")}
    if database.get("dsn") and wanted("database"):
        results.append(check_database(database))
    if health.get("ingest") and wanted("ingest"):
        results.append(check_ingest(common.section(health, "ingest")))
    if health.get("docker") and wanted("containers"):
        results += check_containers(common.section(health, "docker"))
    if health.get("certificates") and wanted("certificates"):
        results += check_certificates(common.section(health, "certificates"), now)
    if wanted("disk") and health.get("disk") is not False:
        results += check_disk(common.section(health, "disk"), readings)
    if wanted("memory") and health.get("memory") is not False:
        results.append(check_memory(common.section(health, "memory"), readings))
    backup = {**common.section(config, "backup"), **common.section(health, "backup")}
    if backup.get("dir") and wanted("backup") and health.get("backup") is not False:
        results.append(check_backup(backup, now))
    return results


def write_metrics(directory: Path, results: list[CheckResult], now: dt.datetime) -> None:
    """Node-exporter textfile: each check's level, and certificate expiry as a timestamp, so that
    Prometheus alerts on certificates without a blackbox exporter (rules in templates/monitoring)."""
    registry = CollectorRegistry()
    status = Gauge("telemetry_health_check_status", "0 ok, 1 warning, 2 critical", ["check"], registry=registry)
    expiry = Gauge("telemetry_cert_not_after_timestamp_seconds", "Certificate expiry", ["path"], registry=registry)
    for r in results:
        status.labels(r.name).set(_RANK[r.status])
        if r.name.startswith("cert:") and r.value is not None:
            expiry.labels(r.name[5:]).set(now.timestamp() + r.value * 86400)
    Gauge("telemetry_health_last_run_timestamp_seconds", "Last healthcheck run", registry=registry).set(now.timestamp())
    write_atomic(Path(directory) / "telemetry_health.prom", generate_latest(registry).decode(), 0o644)


# --- alerting ----------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a lost state file costs at most one repeated alert


def decide(
    results: list[CheckResult], state: dict[str, Any], now: float, cooldown: float
) -> list[tuple[str, CheckResult]]:
    """Update ``state`` in place; return the notifications to send as (kind, result)."""
    notify: list[tuple[str, CheckResult]] = []
    for r in results:
        s = state.setdefault(r.name, {"alerted": None, "last_alert": None})
        s["status"], s["checked_at"] = r.status, now
        alerted = s.get("alerted")
        if r.status in (WARN, CRIT):
            escalated = alerted is not None and _RANK[r.status] > _RANK[alerted]
            last = s.get("last_alert")
            cooled = last is None or now - float(last) >= cooldown
            # One alert per cooldown per check, whatever it did in between (recovered or not): that
            # is what stops a flapping check; an escalation to critical is news and goes out at once.
            if escalated or cooled:
                notify.append(("alert", r))
                s["alerted"], s["last_alert"] = r.status, now
        elif r.status == OK and alerted is not None:
            notify.append(("recovery", r))
            s["alerted"] = None
    return notify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="healthcheck",
        description="Check broker, database, ingest, containers, certificates, disk, memory and backup age; alert "
        "once per check and cooldown, send a recovery notice. Exit codes: 0 ok, 1 critical, 2 config error, "
        "4 warnings only.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--state-file", type=Path, help="alert state (default: health.state_file)")
    parser.add_argument("--no-alerts", action="store_true", help="check and report only")
    parser.add_argument("--check", action="append", metavar="NAME", help="run only this check (repeatable)")
    parser.add_argument(
        "--reading",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="inject a reading instead of measuring: disk:/path=PERCENT, memory=PERCENT",
    )
    parser.add_argument("--now", type=common.parse_time, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = common.config_from_args(args)
        logger = common.setup_logging("healthcheck", common.log_file_from(args, config, "health"), args.verbose)
        readings = Readings.parse(args.reading)
    except common.ConfigError as exc:
        print(f"healthcheck: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    now = args.now or common.utcnow()
    health = common.section(config, "health")
    results = run_checks(config, readings, now, set(args.check) if args.check else None)
    worst = max((_RANK[r.status] for r in results), default=0)
    sent: list[dict[str, Any]] = []
    state_path = args.state_file or (Path(health["state_file"]) if health.get("state_file") else None)
    alerts = common.section(config, "alerts")
    if state_path is not None and not args.no_alerts:
        state = _load_state(state_path)
        cooldown = float(health.get("cooldown_seconds", alerts.get("cooldown_seconds", 3600)))
        host = os.uname().nodename
        for kind, r in decide(results, state.setdefault("checks", {}), now.timestamp(), cooldown):
            subject = (
                f"[telemetry] {r.status.upper()}: {r.name} on {host}"
                if kind == "alert"
                else f"[telemetry] RECOVERED: {r.name} on {host}"
            )
            payload = {"kind": kind, "check": r.name, "status": r.status, "detail": r.detail, "host": host}
            payload["time"] = now.isoformat()
            delivered = common.deliver_alert(alerts, subject, payload, logger) if alerts else False
            if not delivered and kind == "alert":
                # Not delivered: forget it, so the next run tries again instead of waiting a cooldown.
                state["checks"][r.name]["alerted"] = None
                state["checks"][r.name]["last_alert"] = None
            sent.append({**payload, "delivered": delivered})
            logger.warning("%s %s: %s (%s)", kind, r.name, r.detail, "delivered" if delivered else "NOT delivered")
        state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(state_path, json.dumps(state, indent=1, sort_keys=True) + "\n", 0o640)
    if health.get("textfile_dir"):
        write_metrics(Path(health["textfile_dir"]), results, now)
    for r in results:
        (logger.info if r.status in (OK, SKIP) else logger.warning)("%s %s: %s", r.name, r.status, r.detail)
    status = {0: OK, 1: WARN, 2: CRIT}[worst]
    width = max((len(r.name) for r in results), default=10)
    human = "\n".join(f"{r.status.upper():<8} {r.name:<{width}}  {r.detail}" for r in results)
    common.emit(
        args,
        {"status": status, "checks": [asdict(r) for r in results], "notifications": sent},
        human or "no checks configured",
    )
    return {0: common.EXIT_OK, 1: common.EXIT_PARTIAL, 2: common.EXIT_FAILED}[worst]


if __name__ == "__main__":
    sys.exit(main())
