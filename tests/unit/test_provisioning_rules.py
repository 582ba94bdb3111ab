"""Pure rules of provisioning: identifiers, ACL shapes, CLI argument checks (no database)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest import provisioning as prov
from ingest.provision_cli import build_parser, main


@pytest.mark.parametrize("ident", ["ESP32_001", "a", "x" * 64, "sensor-7.kitchen", "0abc"])
def test_valid_identifiers(ident: str) -> None:
    assert prov.validate_ident(ident) == ident


@pytest.mark.parametrize(
    ("ident", "fragment"),
    [
        ("", "empty"),
        ("dev/1", "'/'"),
        ("dev+1", "'+'"),
        ("dev#", "'#'"),
        ("dev\x00x", "'\\x00'"),
        ("x" * 65, "65 characters"),
        ("dev 1", "' '"),
        ("${username}", "'$'"),
        ("user:x", "':'"),
        ("-leading", "first character"),
        ("ünïcode", "'ï'"),
    ],
)
def test_identifiers_that_would_break_topics_are_refused(ident: str, fragment: str) -> None:
    with pytest.raises(prov.ProvisioningError) as err:
        prov.validate_ident(ident)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@given(st.text(min_size=1, max_size=80))
def test_accepted_identifiers_never_contain_topic_metacharacters(ident: str) -> None:
    try:
        prov.validate_ident(ident)
    except prov.ProvisioningError:
        return
    assert not set(ident) & set("+#/\x00$: \t\n")
    assert 1 <= len(ident) <= 64


def test_device_acl_is_own_topics_then_final_deny() -> None:
    rules = prov.device_acl("ESP32_001")
    assert [(r.permission, r.action, r.topic) for r in rules] == [
        ("allow", "publish", "devices/ESP32_001/telemetry"),
        ("allow", "publish", "devices/ESP32_001/status"),
        ("allow", "publish", "devices/ESP32_001/heartbeat"),
        ("allow", "subscribe", "devices/ESP32_001/config"),
        ("allow", "subscribe", "devices/ESP32_001/command"),
        ("deny", "all", "#"),
    ]


@pytest.mark.parametrize("topic", ["a/#/b", "a/b+", "", "a/#x", "x\x00"])
def test_service_acl_refuses_malformed_filters(topic: str) -> None:
    with pytest.raises(prov.ProvisioningError):
        prov.service_acl(subscribe=[topic])


def test_service_acl_requires_a_topic_and_ends_with_deny() -> None:
    with pytest.raises(prov.ProvisioningError, match="at least one"):
        prov.service_acl()
    rules = prov.service_acl(subscribe=["devices/+/telemetry", "$share/ingest/devices/+/telemetry"])
    assert rules[-1] == prov.AclRule("deny", "all", "#")
    assert len(rules) == 3


def test_dsn_with_password_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["list", "--dsn", "postgresql://u:secret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    assert code == 2
    assert "contains a password" in err
    assert "secret" not in err


def test_missing_dsn_is_a_one_line_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELEMETRY_DSN", raising=False)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dsn" in err


def test_world_readable_export_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["export-mosquitto", "--mode", "0644"])
    assert exc.value.code == 2
    assert "any local user" in capsys.readouterr().err


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    for name in ("add", "add-service", "list", "show", "rotate", "disable", "enable", "remove", "export-mosquitto"):
        assert name in text
