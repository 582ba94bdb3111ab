"""``simulate``: many MQTT devices from one process, for smoke tests, load tests and incident drills.

Exit codes: 0 the run met its targets, 1 it did not (errors above --max-errors, rate below
--expect-rate), 2 bad input (one line on stderr naming the problem; nothing was started).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from simulator.config import (
    MAX_COUNT,
    BadInput,
    Broker,
    DeviceCreds,
    Faults,
    RunConfig,
    check_source_addresses,
    load_credentials,
)
from simulator.engine import Simulator, Snapshot
from simulator.payloads import PROFILES, TEMPLATE_HELP, PayloadError, Template
from simulator.wire import utf8, varint

PROG = "simulate"
_FD_RESERVE = 64  # selector, report file, stdio, DNS, the database connection of --from-db


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract for every bad input) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


DESCRIPTION = """\
Simulate many MQTT devices from one process on one event loop. Each device connects with its own
client id and credentials, publishes telemetry (devices/<id>/telemetry), status and heartbeat on
jittered schedules, subscribes to devices/<id>/command and devices/<id>/config, and answers every
command or config message on devices/<id>/status.
"""

RUN_EPILOG = f"""\
credentials:
  --devices FILE     the JSON file `provision add ID... --credentials-out FILE` writes
                     ([{{"device_id", "username", "password", ...}}]). The database keeps only hashes,
                     so passwords can come from nowhere else.
  --from-db DSN      provision --count fresh simulator devices (<prefix>-<random>-<n>, type
                     "simulator") in the database with the provisioning library, write their
                     credentials to --credentials-out FILE (required, must not exist; reuse it later
                     with --devices), then run. EMQX sees them at once; Mosquitto only after
                     `provision export-mosquitto` and a reload: use --provision-only for that first
                     step. Remove them afterwards with `provision remove`.

rates:
  --rate is telemetry messages per second for all devices together (default: one message every
  10 s per device); --interval sets the per-device period instead. Status and heartbeat come on
  top. Each schedule is jittered by +-{"{"}--jitter{"}"} of its period.

faults (each a flag with a rate; 0 = off):
  message faults, as the fraction of telemetry messages:
    --fault-malformed P     truncated JSON, non-UTF-8, non-object, wrong types, empty
    --fault-oversized P     a valid JSON payload of --oversized-bytes
    --fault-duplicate P     the same message published twice
    --fault-clock-skew P    "ts" off by +-(--skew-seconds)
    --fault-cross-topic P   an extra QoS 1 publish on the NEXT device's telemetry topic; the broker's
                            ACL must refuse it. Refusals are counted from the MQTT 5 PUBACK reason
                            code 0x87; with --mqtt 3.1.1 the broker acknowledges and silently drops,
                            so they are reported as unconfirmed (use --mqtt 5 to count them).
  connection faults:
    --fault-offline P       per device and minute: drop off the network (no DISCONNECT) for
                            --offline-seconds, then reconnect
    --fault-storm N         reconnect storms per minute: every device drops at once and comes back
                            through the --ramp (so --ramp shapes the storm)
    --fault-wrong-credentials P  fraction of connection attempts made with a wrong password; the
                            refusal is expected (counted, not an error) and the device retries
                            with its real password

accounting (see --report):
  sent/acked per device and kind; "acked" is a PUBACK with a success code (QoS 1) or "written to
  the socket" (QoS 0). Messages in flight when a connection drops are "unconfirmed". At the end the
  simulator stops publishing, waits up to --drain-timeout for outstanding PUBACKs, then
  disconnects cleanly.
  errors (compared with --max-errors): failed connection attempts, refused CONNACKs (other than
  injected wrong credentials), unexpected disconnects, failed PUBACKs or SUBACKs, and a broker
  accepting a cross-topic publish (an ACL hole) or a wrong password.

exit codes: 0 targets met, 1 targets missed, 2 bad input (nothing was started)

examples:
  provision add sensor-001 sensor-002 --credentials-out creds.json
  simulate run --broker mqtts://broker.example:8883 --ca ca.crt --devices creds.json --duration 60s
  simulate run --broker mqtt://127.0.0.1:1883 --devices creds.json --count 5000 --rate 500 \\
      --duration 5m --ramp 200 --fault-storm 0.5 --report storm.json --max-errors 50
"""


def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30, 20s, 5m, 1h")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run simulated devices against a broker",
        description=DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = run.add_argument_group("broker")
    g.add_argument("--broker", required=True, help="mqtts://host[:8883] (TLS) or mqtt://host[:1883] (plain)")
    g.add_argument("--ca", type=Path, help="CA certificate (PEM) that signed the broker's certificate "
                   "(default: the system's trust store)")  # fmt: skip
    g.add_argument("--tls-server-name", metavar="NAME", help="host name the broker's certificate must carry, when "
                   "it differs from the --broker host (e.g. a tunnel or forwarded port on 127.0.0.1)")  # fmt: skip
    g.add_argument("--cert", type=Path, help="client certificate (PEM) for mTLS; with --key")
    g.add_argument("--key", type=Path, help="client private key (PEM) for mTLS")
    g.add_argument("--tls-resume", choices=("off", "device", "shared"), default="off",
                   help="TLS session resumption: off (default: every connection a full handshake), device (each "
                   "device resumes its own session when it reconnects), shared (every connection resumes the "
                   "latest session: about half the handshake CPU on both sides)")  # fmt: skip
    g.add_argument("--mqtt", choices=("3.1.1", "5"), default="5", help="protocol version (default 5)")
    g.add_argument("--qos", type=_integer, default=1, help="QoS of telemetry/status/heartbeat: 0 or 1 (default 1)")
    g.add_argument("--keepalive", type=_integer, default=60, help="MQTT keepalive in seconds (default 60)")
    g.add_argument("--connect-timeout", type=_duration, default=15.0, help="per connection attempt (default 15s)")

    g = run.add_argument_group("devices")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--devices", type=Path, metavar="FILE", help="credentials file (see below)")
    src.add_argument("--from-db", metavar="DSN", help="provision fresh simulator devices (see below); "
                     "the DSN must not hold a password")  # fmt: skip
    g.add_argument("--db-password-file", type=Path, default=os.environ.get("TELEMETRY_DB_PASSWORD_FILE"),
                   help="database password for --from-db "
                   "(default $TELEMETRY_DB_PASSWORD_FILE, else ~/.pgpass)")  # fmt: skip
    g.add_argument("--credentials-out", type=Path, metavar="FILE", help="with --from-db: where the new "
                   "devices' credentials go (mode 0600)")  # fmt: skip
    g.add_argument("--provision-prefix", default="sim", help="with --from-db: device id prefix (default sim)")
    g.add_argument("--provision-only", action="store_true", help="with --from-db: provision, write the "
                   "credentials file and exit without connecting")  # fmt: skip
    g.add_argument("--count", type=_integer, help=f"number of devices (default: all in --devices; max {MAX_COUNT})")

    g = run.add_argument_group("traffic")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=_number, help="telemetry messages/s, all devices together (default count/10)")
    rate.add_argument("--interval", type=_duration, help="telemetry period per device instead of --rate")
    g.add_argument("--duration", type=_duration, default=60.0, help="how long to publish (default 60s)")
    g.add_argument("--ramp", type=_number, default=1000.0, help="new connections per second, also after a "
                   "storm (default 1000; 0 = as fast as the broker accepts)")  # fmt: skip
    g.add_argument("--max-pending", type=_integer, default=64, help="connection attempts in flight at once "
                   "(TCP, TLS, CONNACK); keep it under the broker's listen backlog (default 64)")  # fmt: skip
    g.add_argument("--source-address", metavar="IP[,IP...]", default="",
                   help="local addresses to connect from, device by device in turn: Linux connect() slows down "
                   "sharply beyond ~14,000 connections from one address to one broker (it scans the even half "
                   "of ip_local_port_range first) and runs out of ports at ~28,000")  # fmt: skip
    g.add_argument("--heartbeat-interval", type=_duration, default=30.0, help="default 30s")
    g.add_argument("--status-interval", type=_duration, default=300.0, help="default 300s (and on every connect)")
    g.add_argument("--jitter", type=_number, default=0.1, help="schedule jitter as a fraction of the period (0.1)")
    g.add_argument("--profile", choices=PROFILES, default="thermalog",
                   help="thermalog: temperature/humidity/battery drifting plausibly; generic: eight metrics "
                   "of a gateway; template: --template FILE")  # fmt: skip
    g.add_argument("--template", type=Path, help=f"JSON template for --profile template; placeholders: {TEMPLATE_HELP}")
    g.add_argument("--seed", type=_integer, help="random seed, for a reproducible run")

    g = run.add_argument_group("faults (rates; see below)")
    for name, helptext in (
        ("malformed", "fraction of telemetry messages"),
        ("oversized", "fraction of telemetry messages"),
        ("duplicate", "fraction of telemetry messages"),
        ("clock-skew", "fraction of telemetry messages"),
        ("cross-topic", "fraction of telemetry messages"),
        ("offline", "probability per device and minute"),
        ("storm", "storms per minute"),
        ("wrong-credentials", "fraction of connection attempts"),
    ):
        g.add_argument(f"--fault-{name}", type=_number, default=0.0, metavar="RATE", help=helptext)
    g.add_argument("--oversized-bytes", type=_integer, default=256 * 1024, help="default 262144")
    g.add_argument("--skew-seconds", type=_number, default=3600.0, help="default 3600")
    g.add_argument("--offline-seconds", type=_duration, nargs=2, default=[2.0, 10.0], metavar=("MIN", "MAX"),
                   help="how long an offline device stays away (default 2 10)")  # fmt: skip

    g = run.add_argument_group("output and targets")
    g.add_argument("--report", type=Path, metavar="FILE", help="write the full JSON report (every counter, per device)")
    g.add_argument("--expect-rate", type=_number, help="exit 1 if fewer telemetry messages/s were acknowledged")
    g.add_argument("--max-errors", type=_integer, default=0, help="exit 1 if more errors occurred (default 0)")
    g.add_argument("--drain-timeout", type=_duration, default=5.0, help="wait for PUBACKs at the end (default 5s)")
    g.add_argument("--progress-interval", type=_duration, default=10.0,
                   help="seconds between progress log lines when stderr is not a terminal (default 10)")  # fmt: skip
    return parser


# -- input ------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, devices: list[DeviceCreds]) -> RunConfig:
    count = args.count if args.count is not None else len(devices)
    if not 1 <= count <= MAX_COUNT:
        raise BadInput(f"--count {count} is out of range (1..{MAX_COUNT})")
    if count > len(devices):
        raise BadInput(f"--count {count} but --devices {args.devices} holds only {len(devices)} credentials")
    devices = devices[:count]
    if args.interval is not None:
        if args.interval <= 0:
            raise BadInput("--interval must be > 0")
        rate = count / args.interval
    else:
        rate = args.rate if args.rate is not None else count / 10.0
    faults = Faults(
        malformed=args.fault_malformed,
        oversized=args.fault_oversized,
        duplicate=args.fault_duplicate,
        clock_skew=args.fault_clock_skew,
        cross_topic=args.fault_cross_topic,
        offline=args.fault_offline,
        storm=args.fault_storm,
        wrong_credentials=args.fault_wrong_credentials,
        oversized_bytes=args.oversized_bytes,
        skew_seconds=args.skew_seconds,
        offline_seconds=(min(args.offline_seconds), max(args.offline_seconds)),
    )
    template = None
    if args.profile == "template":
        if args.template is None:
            raise BadInput("--profile template needs --template FILE")
        try:
            template = Template.load(args.template)
        except PayloadError as exc:
            raise BadInput(str(exc)) from None
    elif args.template is not None:
        raise BadInput("--template is only used with --profile template")
    cfg = RunConfig(
        broker=dataclasses.replace(Broker.parse(args.broker), server_name=args.tls_server_name),
        devices=devices,
        rate=rate,
        duration=args.duration,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        mqtt_version=5 if args.mqtt == "5" else 4,
        qos=args.qos,
        ramp=args.ramp,
        max_pending=args.max_pending,
        tls_resume=args.tls_resume,
        source_addresses=tuple(a.strip() for a in args.source_address.split(",") if a.strip()),
        heartbeat_interval=args.heartbeat_interval,
        status_interval=args.status_interval,
        jitter=args.jitter,
        keepalive=args.keepalive,
        connect_timeout=args.connect_timeout,
        drain_timeout=args.drain_timeout,
        profile=args.profile,
        template=template,
        faults=faults,
        seed=args.seed,
        expect_rate=args.expect_rate,
        max_errors=args.max_errors,
        progress_interval=args.progress_interval,
    )
    cfg.validate()
    if cfg.connect_timeout <= 0 or cfg.drain_timeout < 0 or cfg.progress_interval <= 0:
        raise BadInput("--connect-timeout and --progress-interval must be > 0, --drain-timeout >= 0")
    return cfg


def _raise_fd_limit(count: int) -> None:
    """One socket per device: lift the soft RLIMIT_NOFILE to the hard limit, or say why we cannot run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + _FD_RESERVE
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        raise BadInput(f"--count {count} needs about {need} open files but the limit is {soft} (raise `ulimit -n`)")


def _provision(args: argparse.Namespace) -> list[DeviceCreds]:
    """--from-db: new devices through the provisioning library; their passwords go to a 0600 file."""
    from ingest import provisioning as prov
    from ingest.db import PsycopgSession
    from ingest.dbconfig import ConfigError, build_conninfo
    from ingest.files import write_atomic

    out: Path | None = args.credentials_out
    if out is None:
        raise BadInput("--from-db needs --credentials-out FILE: the new passwords exist nowhere else")
    if out.exists():
        raise BadInput(f"--credentials-out {out} exists; run with --devices {out} to reuse those devices")
    if not out.parent.is_dir():
        raise BadInput(f"--credentials-out: directory {out.parent} does not exist")
    if args.count is None:
        raise BadInput("--from-db needs --count N (how many devices to provision)")
    if not 1 <= args.count <= MAX_COUNT:
        raise BadInput(f"--count {args.count} is out of range (1..{MAX_COUNT})")
    try:
        prov.validate_ident(args.provision_prefix + "-x", "--provision-prefix")
        conninfo = build_conninfo(args.from_db, args.db_password_file)
    except (prov.ProvisioningError, ConfigError) as exc:
        raise BadInput(str(exc)) from None
    run_id = secrets.token_hex(3)
    ids = [f"{args.provision_prefix}-{run_id}-{i:05d}" for i in range(1, args.count + 1)]
    try:
        prov.validate_ident(ids[-1], "device id (shorten --provision-prefix)")
        session = PsycopgSession.connect(conninfo)
    except prov.ProvisioningError as exc:
        raise BadInput(str(exc)) from None
    except Exception as exc:  # psycopg.OperationalError and friends: say which database, in one line
        raise BadInput(f"--from-db: cannot connect: {str(exc).strip().splitlines()[0]}") from None
    try:
        creds = prov.add_devices(session, ids, name="simulator", type="simulator")
    except prov.ProvisioningError as exc:
        raise BadInput(f"--from-db: {exc}") from None
    finally:
        session.close()
    records = [
        {"device_id": c.device_id, "username": c.username, "password": c.password, "hash_algorithm": c.hash_algorithm}
        for c in creds
    ]
    write_atomic(out, json.dumps(records, indent=2) + "\n", 0o600)
    print(f"{PROG}: provisioned {len(creds)} device(s) {ids[0]}..{ids[-1]}; credentials in {out}", file=sys.stderr)
    return [DeviceCreds(c.device_id, c.username, c.password) for c in creds]


# -- preflight: prove broker, TLS and one device's credentials before starting thousands -----------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf


def _connack_name(code: int, v5: bool) -> str:
    if v5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        try:
            return ReasonCode(PacketTypes.CONNACK, identifier=code).getName()
        except Exception:
            return f"reason code {code:#x}"
    import paho.mqtt.client as mqtt

    return mqtt.connack_string(code)


def preflight(cfg: RunConfig, ctx: ssl.SSLContext | None, timeout: float, from_db_file: Path | None) -> None:
    """One blocking MQTT CONNECT with the first device: an unreachable broker, a wrong CA, a missing
    client certificate or unknown credentials fail here, in one line, before anything else starts."""
    b = cfg.broker
    where = f"{b.host}:{b.port}"
    dev = cfg.devices[0]
    try:
        raw = socket.create_connection((b.host, b.port), timeout=timeout)
    except socket.gaierror as exc:
        raise BadInput(f"broker host {b.host!r} cannot be resolved: {exc.strerror}") from None
    except TimeoutError:
        raise BadInput(f"broker {where} unreachable: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise BadInput(f"broker {where} unreachable: {exc.strerror or exc}") from None
    sock: socket.socket = raw
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(raw, server_hostname=b.tls_name)
            except ssl.SSLCertVerificationError as exc:
                ca = f"--ca {cfg.ca}" if cfg.ca else "the system trust store (pass --ca)"
                raise BadInput(
                    f"TLS: the broker's certificate at {where} is not trusted by {ca}: {exc.verify_message}"
                ) from None
            except (ssl.SSLError, OSError) as exc:
                raise BadInput(f"TLS handshake with {where} failed: {_ssl_reason(exc)}") from None
        v5 = cfg.mqtt_version == 5
        header = utf8("MQTT") + (b"\x05" if v5 else b"\x04") + b"\xc2" + (30).to_bytes(2, "big")
        if v5:
            header += b"\x00"  # no properties
        body = header + utf8(dev.username)  # the engine's client id is the username too
        body += utf8(dev.username) + utf8(dev.password)
        try:
            sock.sendall(b"\x10" + varint(len(body)) + body)
            first = _recv_exact(sock, 2)
            length = first[1]
            rest = _recv_exact(sock, length) if length else b""
        except TimeoutError:
            raise BadInput(f"broker {where} accepted the connection but sent no CONNACK within {timeout:g}s") from None
        except OSError as exc:  # ssl.SSLError included
            # A broker that demands a client certificate closes the TLS connection right after the
            # handshake (TLS 1.3 finishes the client side first), often without an alert.
            if ctx is not None and cfg.cert is None:
                hint = " (does the broker require a client certificate? pass --cert/--key)"
            elif ctx is None:
                hint = " (is this a TLS listener? use mqtts://)"
            else:
                hint = ""
            raise BadInput(f"broker {where} closed the connection before CONNACK: {_ssl_reason(exc)}{hint}") from None
        if first[0] != 0x20 or len(rest) < 2:
            raise BadInput(f"broker {where} answered CONNECT with something other than CONNACK")
        code = rest[1]
        if code != 0:
            hint = ""
            if from_db_file is not None:
                hint = (
                    f"; credentials were written to {from_db_file}: for Mosquitto run `provision export-mosquitto`,"
                    f" reload it, then use --devices {from_db_file}"
                )
            raise BadInput(
                f"broker {where} refused device {dev.username!r}: {_connack_name(code, v5)} "
                f"(are these devices provisioned on this broker?){hint}"
            )
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: a clean goodbye
    finally:
        sock.close()


def _ssl_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


# -- progress ----------------------------------------------------------------------------------------


def _progress_line(s: Snapshot) -> str:
    return (
        f"t={s.elapsed:6.1f}s connected={s.connected}/{s.count} sent={s.sent} acked={s.acked} "
        f"errors={s.errors} rate={s.rate:.1f}/s"
    )


def _tty_progress(s: Snapshot) -> None:
    sys.stderr.write("\r\x1b[2K" + _progress_line(s))
    sys.stderr.flush()


def _log_progress(s: Snapshot) -> None:
    print(f"{PROG}: {_progress_line(s)}", file=sys.stderr, flush=True)


# -- main ----------------------------------------------------------------------------------------------


def _targets(cfg: RunConfig, report: dict[str, Any]) -> dict[str, Any]:
    failures = []
    errors = report["errors"]["total"]
    if errors > cfg.max_errors:
        kinds = ", ".join(f"{k}: {v}" for k, v in list(report["errors"]["by_kind"].items())[:3])
        failures.append(f"{errors} error(s) > --max-errors {cfg.max_errors} ({kinds})")
    rate = report["timing"]["achieved_rate"]
    if cfg.expect_rate is not None and rate < cfg.expect_rate:
        failures.append(f"achieved {rate:g} telemetry msg/s < --expect-rate {cfg.expect_rate:g}")
    return {"expect_rate": cfg.expect_rate, "max_errors": cfg.max_errors, "met": not failures, "failures": failures}


def cmd_run(args: argparse.Namespace) -> int:
    from_db_file = None
    if args.from_db:
        if args.count is None:
            raise BadInput("--from-db needs --count N (how many devices to provision)")
        if not 1 <= args.count <= MAX_COUNT:
            raise BadInput(f"--count {args.count} is out of range (1..{MAX_COUNT})")
        # Every check that needs no database runs first: bad input must not leave provisioned devices.
        placeholders = [DeviceCreds(f"p{i}", f"p{i}", "p") for i in range(args.count)]
        _config(args, placeholders).ssl_context()
        if not args.provision_only:
            _raise_fd_limit(args.count)
        devices = _provision(args)
        from_db_file = args.credentials_out
        if args.provision_only:
            return 0
        args.devices = from_db_file
    else:
        if args.credentials_out or args.provision_only:
            raise BadInput("--credentials-out and --provision-only only apply to --from-db")
        devices = load_credentials(args.devices)
    cfg = _config(args, devices)
    ctx = cfg.ssl_context()
    _raise_fd_limit(cfg.count)
    if args.report is not None and not args.report.parent.is_dir():
        raise BadInput(f"--report: directory {args.report.parent} does not exist")
    preflight(cfg, ctx, min(cfg.connect_timeout, 5.0), from_db_file)
    if cfg.source_addresses:
        family = socket.getaddrinfo(cfg.broker.host, cfg.broker.port, type=socket.SOCK_STREAM)[0][0]
        check_source_addresses(cfg.source_addresses, family)

    tty = sys.stderr.isatty()
    sim = Simulator(
        cfg,
        ctx,
        progress=_tty_progress if tty else _log_progress,
        progress_every=0.5 if tty else cfg.progress_interval,
    )
    interrupted = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        if sim.stop_requested:
            sim.abort_requested = True  # a second Ctrl-C: skip the drain
        sim.stop_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sim.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if tty:
            sys.stderr.write("\n")
    report = sim.report()
    report["interrupted"] = interrupted
    report["targets"] = _targets(cfg, report)
    if args.report is not None:
        tmp = args.report.with_name(f".{args.report.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.report)
    summary = {k: v for k, v in report.items() if k != "devices"}
    summary["errors"] = {k: v for k, v in report["errors"].items() if k != "samples"}
    print(json.dumps(summary, separators=(",", ":")))
    t = report["totals"]
    _log_progress(sim._snapshot(sim.end_publishing))
    verdict = (
        "targets met" if report["targets"]["met"] else "TARGETS MISSED: " + "; ".join(report["targets"]["failures"])
    )
    print(
        f"{PROG}: {t['connects']} connects, {t['sent']} sent, {t['acked']} acked, {t['unconfirmed']} unconfirmed, "
        f"{report['acl']['refused']} ACL refusals, {report['errors']['total']} errors; {verdict}",
        file=sys.stderr,
    )
    return 0 if report["targets"]["met"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "run":
            return cmd_run(args)
    except BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
