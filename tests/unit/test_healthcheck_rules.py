"""healthcheck without services: thresholds, certificate expiry, alert/cooldown/recovery decisions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scripts import _common as common
from scripts import healthcheck as hc

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def cert_expiring_in(tmp_path: Path, days: float) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=60))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"cert{days}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("days", "status"), [(30, "ok"), (21.5, "ok"), (20, "warning"), (7.5, "warning"), (6, "critical"), (-1, "critical")]
)
def test_certificate_thresholds(tmp_path: Path, days: float, status: str) -> None:
    (result,) = hc.check_certificates({"paths": [str(cert_expiring_in(tmp_path, days))]}, NOW)
    assert result.status == status


@pytest.mark.parametrize(
    ("used", "status"), [(10, "ok"), (69.9, "ok"), (70, "warning"), (84.9, "warning"), (85, "critical")]
)
def test_disk_thresholds(used: float, status: str) -> None:
    (result,) = hc.check_disk({"paths": ["/data"]}, hc.Readings(disk={"/data": used}))
    assert result.status == status and result.name == "disk:/data"


@pytest.mark.parametrize(("used", "status"), [(59, "ok"), (60, "warning"), (85, "critical")])
def test_memory_thresholds(used: float, status: str) -> None:
    assert hc.check_memory({}, hc.Readings(memory=used)).status == status


def test_real_readings_are_percentages(tmp_path: Path) -> None:
    assert 0 <= hc.disk_used_percent("/") <= 100
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 250 kB\n")
    assert hc.memory_used_percent(meminfo) == 75.0


def test_reading_parser() -> None:
    r = hc.Readings.parse(["disk:/var=91", "memory=12.5"])
    assert r.disk == {"/var": 91.0} and r.memory == 12.5
    for bad in ("disk:/=x", "cpu=3"):
        with pytest.raises(common.ConfigError):
            hc.Readings.parse([bad])


def test_backup_age(tmp_path: Path) -> None:
    (tmp_path / "telemetry-20260430T100000Z.tpbk").write_bytes(b"")
    assert hc.check_backup({"dir": str(tmp_path)}, NOW).status == "ok"  # 26 h exactly: not over
    (tmp_path / "telemetry-20260430T100000Z.tpbk").rename(tmp_path / "telemetry-20260430T095900Z.tpbk")
    assert hc.check_backup({"dir": str(tmp_path)}, NOW).status == "critical"
    assert hc.check_backup({"dir": str(tmp_path / "none")}, NOW).status == "critical"


def r(status: str) -> hc.CheckResult:
    return hc.CheckResult("broker", status, "x")


def test_alert_once_cooldown_recovery_and_flapping() -> None:
    state: dict[str, dict[str, object]] = {}
    cooldown = 600.0
    seq = [
        (0, "critical", ["alert"]),  # goes bad: alert
        (120, "critical", []),  # still bad, within cooldown
        (240, "ok", ["recovery"]),  # recovers: one notice
        (360, "critical", []),  # flaps back within the cooldown of the last alert: quiet
        (480, "ok", []),  # that failure was never announced, so no recovery either
        (500, "warning", []),
        (700, "warning", ["alert"]),  # cooldown over, still bad: announced again
        (720, "critical", ["alert"]),  # escalation goes out at once
        (800, "critical", []),
        (1400, "critical", ["alert"]),  # reminder after a cooldown
        (1500, "ok", ["recovery"]),
    ]
    for now, status, expected in seq:
        sent = [kind for kind, _ in hc.decide([r(status)], state, float(now), cooldown)]
        assert sent == expected, (now, status)
