"""The simulator against the real test Mosquitto (TLS), with devices provisioned in the real database.

The simulator always runs as a subprocess through its console entry point, as an operator runs it:
exit codes, one-line errors and "nothing left running" are part of what is tested.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ingest import provisioning as prov
from ingest.db import PsycopgSession
from tests.support.mosquitto import DEFAULT_ACL, MosquittoBroker, MosquittoFactory, MqttProbe
from tests.support.pki import CertificateAuthority, PkiFiles

pytestmark = pytest.mark.integration

SIMULATE = [sys.executable, "-m", "simulator.cli"]
DATA_TOPICS = ("telemetry", "status", "heartbeat")


def provision(db: PsycopgSession, broker: MosquittoBroker, ids: list[str], out: Path) -> Path:
    """Devices through the provisioning library, exported to Mosquitto as a deploy would."""
    creds = prov.add_devices(db, ids)
    passwd, acl = prov.export_mosquitto(db)
    broker.write_passwords(broker.default_passwords() + passwd)
    broker.write_acl(DEFAULT_ACL + acl)
    broker.reload()
    out.write_text(json.dumps([dataclasses.asdict(c) for c in creds]))
    out.chmod(0o600)
    return out


def start(args: list[str], marker: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SIMULATOR_TEST_MARKER": marker}
    return subprocess.Popen(
        [*SIMULATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"simulator still running after {timeout}s\n{err[-3000:]}") from None
    return proc.returncode, out, err


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries the marker: anything the simulator left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def drain_until(probe: MqttProbe, done: Any, timeout: float) -> list[Any]:
    """Collect messages until done(messages) or timeout; returns everything collected."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(probe.messages.get(timeout=0.2))
        except queue.Empty:
            if done(got):
                return got
    return got


def per_device(messages: list[Any]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for m in messages:
        parts = m.topic.split("/")
        if len(parts) == 3 and parts[0] == "devices" and parts[2] in DATA_TOPICS:
            counts[parts[1]] += 1
    return counts


def tls_args(broker: MosquittoBroker, creds: Path, pki: PkiFiles) -> list[str]:
    return [
        "run",
        "--broker",
        f"mqtts://127.0.0.1:{broker.tls_port}",
        "--ca",
        str(pki.ca_cert),
        "--devices",
        str(creds),
    ]


# -- acceptance: 200 devices, 20 s, TLS -----------------------------------------------------------


def test_200_devices_over_tls_exact_acks_acl_refusals_and_commands(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory(max_queued_messages=100_000)
    ids = [f"acc-{i:03d}" for i in range(200)]
    creds = provision(db, broker, ids, tmp_path / "creds.json")
    report_path = tmp_path / "report.json"
    with MqttProbe(broker) as probe:
        assert probe.connect().value == 0
        for leaf in DATA_TOPICS:
            assert not probe.subscribe(f"devices/+/{leaf}", qos=1)[0].is_failure
        marker = uuid.uuid4().hex
        proc = start(
            [
                *tls_args(broker, creds, pki),
                "--duration", "20s", "--interval", "2s", "--heartbeat-interval", "5s", "--ramp", "500",
                "--fault-cross-topic", "0.05", "--fault-malformed", "0.05", "--fault-duplicate", "0.05",
                "--fault-clock-skew", "0.05", "--fault-oversized", "0.01", "--oversized-bytes", "20000",
                "--fault-wrong-credentials", "0.05", "--seed", "7", "--report", str(report_path),
            ],
            marker,
        )  # fmt: skip
        # Wait for the target's "online" status, then command it; every message seen meanwhile counts.
        target = ids[42]
        seen = drain_until(probe, lambda got: any(m.topic == f"devices/{target}/status" for m in got), 15)
        assert any(m.topic == f"devices/{target}/status" for m in seen), "target device never came online"
        probe.publish(f"devices/{target}/command", json.dumps({"id": "cmd-42", "command": "ping"}), qos=1)
        rc, _, err = finish(proc, timeout=60)
        assert rc == 0, err[-3000:]
        report = json.loads(report_path.read_text())
        devices = report["devices"]
        expected = {d: v["acked"] for d, v in devices.items()}
        seen += drain_until(probe, lambda got: per_device(seen + got) == expected, 10)
    counts = per_device(seen)

    # Exactly the acknowledged messages, per device; nothing lost or unconfirmed on a clean run.
    assert report["totals"]["unconfirmed"] == 0 and report["totals"]["failed"] == 0
    mismatched = {d: (counts.get(d, 0), n) for d, n in expected.items() if counts.get(d, 0) != n}
    assert not mismatched, f"(seen, acked) differ for {len(mismatched)} devices: {list(mismatched.items())[:5]}"
    assert sum(expected.values()) > 200 * 8, report["totals"]  # 20 s at 2 s intervals: real traffic
    assert all(v["connects"] >= 1 for v in devices.values())

    # Cross-topic publishes: all refused by the ACL (PUBACK 0x87), none delivered to the victim's topic.
    acl = report["acl"]
    assert acl["cross_topic_sent"] > 0 and acl["refused"] == acl["cross_topic_sent"] and acl["accepted"] == 0
    assert not [m for m in seen if b"cross_topic" in m.payload]
    # Injected faults happened and did not count as errors.
    faults = report["faults_injected"]
    assert faults["malformed"] > 0 and faults["duplicate"] > 0 and faults["wrong_credentials"] > 0
    assert report["totals"]["auth_refused_injected"] == faults["wrong_credentials"]
    assert report["errors"]["total"] == 0, report["errors"]

    # The command was answered by its device only, exactly once.
    answers = [m for m in seen if b"cmd-42" in m.payload]
    assert [m.topic for m in answers] == [f"devices/{target}/status"]
    body = json.loads(answers[0].payload)
    assert body["result"] == "ok" and body["device_id"] == target and body["type"] == "command_response"
    assert devices[target]["commands"] == 1 and sum(v["commands"] for v in devices.values()) == 1
    assert not processes_with(marker)


# -- connection faults: the accounting stays honest ----------------------------------------------


def test_storm_and_offline_keep_counts_within_acked_and_unconfirmed(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory(max_queued_messages=100_000)
    ids = [f"storm-{i:02d}" for i in range(40)]
    creds = provision(db, broker, ids, tmp_path / "creds.json")
    report_path = tmp_path / "report.json"
    with MqttProbe(broker) as probe:
        assert probe.connect().value == 0
        for leaf in DATA_TOPICS:
            probe.subscribe(f"devices/+/{leaf}", qos=1)
        proc = start(
            [
                *tls_args(broker, creds, pki),
                "--duration", "9s", "--interval", "0.5s", "--fault-storm", "15", "--fault-offline", "1",
                "--offline-seconds", "0.5", "1", "--ramp", "200", "--report", str(report_path),
            ],
            uuid.uuid4().hex,
        )  # fmt: skip
        rc, _, err = finish(proc, timeout=60)
        report = json.loads(report_path.read_text())
        seen = drain_until(probe, lambda got: False, 3)
    assert rc == 0, err[-3000:]
    assert report["faults_injected"]["storm"] >= 2 and report["faults_injected"].get("offline", 0) >= 1
    assert report["totals"]["connects"] > 2 * len(ids)
    counts = per_device(seen)
    for d, v in report["devices"].items():
        assert v["acked"] <= counts.get(d, 0) <= v["acked"] + v["unconfirmed"], (d, v, counts.get(d))


def test_tls_resumption_and_source_addresses(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    """--tls-resume shared: one full handshake, every other connection resumed; device: each device
    resumes its own session after a storm. --source-address: connections come from each address in turn."""
    broker = mosquitto_factory()
    ids = [f"resume-{i:02d}" for i in range(20)]
    creds = provision(db, broker, ids, tmp_path / "creds.json")
    base = [*tls_args(broker, creds, pki), "--interval", "0.5s", "--max-pending", "1"]
    rc, out, err = finish(start([*base, "--duration", "2s", "--tls-resume", "shared"], uuid.uuid4().hex), 60)
    assert rc == 0, err[-3000:]
    totals = json.loads(out)["totals"]
    assert totals["connects"] == 20 and totals["tls_full_handshakes"] == 1 and totals["tls_resumed"] == 19, totals
    rc, out, err = finish(
        start([*base, "--duration", "6s", "--tls-resume", "device", "--fault-storm", "20"], uuid.uuid4().hex), 60
    )
    assert rc == 0, err[-3000:]
    totals = json.loads(out)["totals"]
    assert totals["tls_full_handshakes"] == 20 and totals["tls_resumed"] == totals["connects"] - 20 > 0, totals
    rc, out, err = finish(start([*base, "--duration", "2s"], uuid.uuid4().hex), 60)  # default: off
    totals = json.loads(out)["totals"]
    assert rc == 0 and totals["tls_full_handshakes"] == totals["connects"] == 20 and "tls_resumed" not in totals
    plain = ["run", "--broker", f"mqtt://127.0.0.1:{broker.plain_port}", "--devices", str(creds),
             "--source-address", "127.0.0.2,127.0.0.3", "--duration", "2s", "--interval", "0.5s"]  # fmt: skip
    rc, out, err = finish(start(plain, uuid.uuid4().hex), 60)
    assert rc == 0 and json.loads(out)["totals"]["connects"] == 20, err[-3000:]
    log = broker.log_tail(lines=400)
    assert log.count("New connection from 127.0.0.2:") >= 10 and log.count("New connection from 127.0.0.3:") >= 10


# -- protocol variants ----------------------------------------------------------------------------


def test_mqtt311_cross_topic_is_unconfirmed_and_still_never_delivered(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    creds = provision(db, broker, [f"v3-{i}" for i in range(5)], tmp_path / "creds.json")
    report_path = tmp_path / "report.json"
    with MqttProbe(broker) as probe:
        assert probe.connect().value == 0
        probe.subscribe("devices/#", qos=1)
        proc = start(
            [*tls_args(broker, creds, pki), "--mqtt", "3.1.1", "--duration", "3s", "--interval", "0.5s",
             "--fault-cross-topic", "0.5", "--report", str(report_path)],
            uuid.uuid4().hex,
        )  # fmt: skip
        rc, _, err = finish(proc, timeout=30)
        seen = drain_until(probe, lambda got: False, 1)
    assert rc == 0, err
    acl = json.loads(report_path.read_text())["acl"]
    assert acl["cross_topic_sent"] > 0 and acl["unconfirmed"] == acl["cross_topic_sent"] and acl["refused"] == 0
    assert "3.1.1" in acl["how"]
    assert not [m for m in seen if b"cross_topic" in m.payload]


def test_mtls_and_plain_qos0(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory(require_client_cert=True)
    creds = provision(db, broker, ["mtls-1", "mtls-2"], tmp_path / "creds.json")
    base = [*tls_args(broker, creds, pki), "--duration", "2s", "--interval", "0.5s"]
    rc, out, err = finish(start([*base, "--cert", str(pki.client_cert), "--key", str(pki.client_key)], "m1"), 30)
    assert rc == 0, err
    assert json.loads(out)["totals"]["acked"] > 0
    rc, out, err = finish(start(base, "m2"), 30)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "client certificate" in err, err
    plain = ["run", "--broker", f"mqtt://127.0.0.1:{broker.plain_port}", "--devices", str(creds)]
    rc, out, err = finish(start([*plain, "--qos", "0", "--duration", "2s", "--interval", "0.5s"], "m3"), 30)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["qos"] == 0 and summary["totals"]["acked"] == summary["totals"]["sent"] > 0


def test_from_db_provisions_devices_and_writes_their_credentials(
    db: PsycopgSession, migrated_dsn: str, tmp_path: Path
) -> None:
    params = conninfo_to_dict(migrated_dsn)
    pwfile = tmp_path / "db.password"
    pwfile.write_text(str(params.pop("password")))
    out = tmp_path / "sim-creds.json"
    dsn = make_conninfo(**params)  # type: ignore[arg-type]
    args = ["run", "--broker", "mqtt://127.0.0.1:1", "--from-db", dsn, "--db-password-file", str(pwfile),
            "--count", "3", "--credentials-out", str(out), "--provision-only"]  # fmt: skip
    rc, _, err = finish(start(args, "fromdb"), 30)
    assert rc == 0, err
    creds = json.loads(out.read_text())
    assert len(creds) == 3 and all(c["password"] and c["device_id"].startswith("sim-") for c in creds)
    assert out.stat().st_mode & 0o777 == 0o600
    rows = db.execute("SELECT device_id, type FROM devices ORDER BY device_id")
    assert [(r[0], r[1]) for r in rows] == [(c["device_id"], "simulator") for c in creds]
    # Run again into the same file: refused before touching the database.
    rc, _, err = finish(start(args, "fromdb2"), 30)
    assert rc == 2 and "exists" in err and len(db.execute("SELECT 1 FROM devices")) == 3


# -- bad input: exit 2, one line naming the problem, nothing left running ---------------------------


def _bad(args: list[str], *needles: str) -> None:
    marker = uuid.uuid4().hex
    rc, out, err = finish(start(args, marker), 30)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    assert not processes_with(marker)


def test_bad_input_against_a_running_broker(
    db: PsycopgSession, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    from tests.support.ports import free_port

    broker = mosquitto_factory()
    creds = provision(db, broker, ["bad-1", "bad-2"], tmp_path / "creds.json")
    good = tls_args(broker, creds, pki)
    report = tmp_path / "never.json"
    # Unreachable broker (nothing listens on that port).
    dead = free_port()
    _bad(["run", "--broker", f"mqtts://127.0.0.1:{dead}", "--ca", str(pki.ca_cert), "--devices", str(creds),
          "--report", str(report)], "unreachable", str(dead), "refused")  # fmt: skip
    # A CA that did not sign the broker's certificate.
    other = CertificateAuthority.create(tmp_path / "other-ca")
    args = list(good)
    args[args.index("--ca") + 1] = str(other.cert_path)
    _bad([*args, "--report", str(report)], "not trusted by --ca", "self-signed certificate")
    # A CA file that is not a certificate, and one that does not exist.
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    args[args.index("--ca") + 1] = str(junk)
    _bad(args, "--ca", "no usable PEM")
    args[args.index("--ca") + 1] = str(tmp_path / "missing.pem")
    _bad(args, "--ca", "No such file")
    # Credentials the broker does not know.
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"device_id": "ghost", "username": "ghost", "password": "nope"}]))
    _bad(tls_args(broker, unknown, pki), "refused device 'ghost'")
    # TLS URL against the plain listener.
    _bad(["run", "--broker", f"mqtts://127.0.0.1:{broker.plain_port}", "--ca", str(pki.ca_cert),
          "--devices", str(creds)], "TLS")  # fmt: skip
    # A source address this host does not have (TEST-NET-1).
    _bad([*good, "--source-address", "192.0.2.1"], "--source-address 192.0.2.1", "cannot connect from it")
    assert not report.exists()


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--rate", "0"], ["--rate 0 is out of range"]),
        (["--rate", "1000000"], ["--rate", "out of range"]),
        (["--count", "0"], ["--count 0 is out of range"]),
        (["--count", "3"], ["--count 3 but", "holds only 2"]),
        (["--interval", "0.001s"], ["minimum is 0.05s"]),
        (["--fault-malformed", "1.5"], ["--fault-malformed 1.5 is out of range"]),
        (["--duration", "soon"], ["--duration", "not a duration"]),
        (["--qos", "2"], ["--qos must be 0 or 1"]),
        (["--source-address", "127.0.0.1,nope"], ["--source-address 'nope' is not an IP address"]),
        (["--tls-resume", "shared"], ["--tls-resume shared needs a TLS broker"]),
    ],
)
def test_bad_ranges_exit_2_with_one_line(tmp_path: Path, extra: list[str], needles: list[str]) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps([{"username": "a", "password": "x"}, {"username": "b", "password": "y"}]))
    # Port 1 is never an MQTT broker: range checks must fail before any connection is attempted.
    _bad(["run", "--broker", "mqtt://127.0.0.1:1", "--devices", str(creds), *extra], *needles)


def test_missing_credentials_file(tmp_path: Path) -> None:
    _bad(
        ["run", "--broker", "mqtt://127.0.0.1:1", "--devices", str(tmp_path / "nope.json")], "no such file", "nope.json"
    )


# -- with the ingest service: faults land as rejections, never as data -----------------------------


def test_malformed_and_cross_topic_never_become_data_in_ingest(
    migrated_dsn: str, role_dsn: Any, mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    from ingest.schema import ROLE_INGEST
    from tests.support.ingest_proc import provision_env

    broker = mosquitto_factory(max_queued_messages=100_000)
    ids = [f"ing-{i:02d}" for i in range(20)]
    env = provision_env(migrated_dsn, role_dsn(ROLE_INGEST), broker, tmp_path, ids)
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps([{"device_id": d, "username": d, "password": pw} for d, pw in env.devices.items()]))
    ingest = env.process()
    ingest.start()
    try:
        report_path = tmp_path / "report.json"
        proc = start(
            [*tls_args(broker, creds, pki), "--duration", "6s", "--interval", "0.5s", "--fault-malformed", "0.2",
             "--fault-cross-topic", "0.2", "--seed", "3", "--report", str(report_path)],
            uuid.uuid4().hex,
        )  # fmt: skip
        rc, _, err = finish(proc, timeout=60)
        assert rc == 0, err[-3000:]
        report = json.loads(report_path.read_text())
        malformed_sent = report["faults_injected"]["malformed"]
        good = report["totals"]["by_kind"]["telemetry"]["acked"] - malformed_sent
        assert malformed_sent > 0 and report["acl"]["refused"] == report["acl"]["cross_topic_sent"] > 0
        session = PsycopgSession.connect(migrated_dsn)
        try:
            deadline = time.monotonic() + 20
            while True:
                rejected = session.execute(
                    "SELECT reason, count(*) FROM rejected_messages WHERE topic LIKE 'devices/%%/telemetry' "
                    "GROUP BY reason"
                )
                rows = session.execute("SELECT count(DISTINCT (device, time)) FROM telemetry")[0][0]
                if (sum(n for _, n in rejected) >= malformed_sent and rows >= good) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            other = session.execute("SELECT topic, reason FROM rejected_messages WHERE topic NOT LIKE '%%/telemetry'")
            leaked = session.execute("SELECT count(*) FROM telemetry_named WHERE value = 99.9")[0][0]
        finally:
            session.close()
    finally:
        ingest.stop()
    # Every malformed message is a dead letter (nothing else is), every good one is data.
    assert sum(n for _, n in rejected) == malformed_sent, rejected
    assert rows == good
    assert not other, other  # status (with command answers) and heartbeat payloads are all accepted
    assert leaked == 0  # cross-topic payloads carry temperature 99.9: the ACL kept them out
