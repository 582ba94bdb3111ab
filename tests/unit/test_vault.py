"""Secrets: decrypted in-process from ansible-vault files, with one-line errors, never in host data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from roles import secrets as vault
from tests.support.deploy_fake import REPO, TEST_VAULT_PASSWORD, load_inventory_data, vault_env

TEST_VAULT = REPO / "tests/fixtures/vault/all.vault.yml"
REQUIRED = {
    "emqx_node_cookie",
    "emqx_dashboard_password",
    "emqx_api_key",
    "emqx_api_secret",
    "db_superuser_password",
    "db_broker_password",
    "db_ingest_password",
    "db_provisioner_password",
    "mqtt_ingest_password",
    "ingest_api_hmac_key",
    "backup_encryption_key",
    "db_monitor_password",
}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    vault.clear_cache()


def test_decrypts_in_process() -> None:
    with vault_env():
        values = vault.load(TEST_VAULT.parent, ["lab"])
    assert set(values) >= REQUIRED
    # no default passwords anywhere (design: "no default password anywhere")
    for value in values.values():
        assert value.lower() not in {"public", "admin", "changeme", "emqxsecretcookie", "password"}
        assert len(value) >= 16


def test_repr_shows_names_not_values() -> None:
    with vault_env():
        values = vault.load(TEST_VAULT.parent, [])
    text = repr(values) + str(values)
    assert "emqx_node_cookie" in text
    assert not any(v in text for v in values.values())


def test_wrong_password_is_one_clear_line(tmp_path: Path) -> None:
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    with vault_env(wrong), pytest.raises(vault.VaultError) as err:
        vault.load(TEST_VAULT.parent, [])
    message = str(err.value)
    assert "wrong vault password" in message and "TELEMETRY_VAULT_PASSWORD_FILE" in message
    assert "\n" not in message


def test_missing_variable_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vault.PASSWORD_ENV, raising=False)
    with pytest.raises(vault.VaultError, match=r"TELEMETRY_VAULT_PASSWORD_FILE is not set"):
        vault.load(TEST_VAULT.parent, [])
    monkeypatch.setenv(vault.PASSWORD_ENV, str(tmp_path / "absent"))
    with pytest.raises(vault.VaultError, match=r"cannot read vault password file .*absent"):
        vault.load(TEST_VAULT.parent, [])


def test_missing_secret_names_the_files() -> None:
    with vault_env():
        values = vault.load(TEST_VAULT.parent, [])
        with pytest.raises(vault.VaultError, match=r"'nope' is in none of .*all.vault.yml"):
            values["nope"]


def test_clear_text_vault_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "all.vault.yml").write_text("emqx_node_cookie: plain\n")
    with vault_env(), pytest.raises(vault.VaultError, match="not encrypted"):
        vault.load(tmp_path, [])


def test_group_files_override_all(tmp_path: Path) -> None:
    pw = TEST_VAULT_PASSWORD.read_bytes().strip()
    (tmp_path / "all.vault.yml").write_bytes(vault.encrypt_mapping({"a": "1", "b": "1"}, pw))
    (tmp_path / "lab.vault.yml").write_bytes(vault.encrypt_mapping({"b": "2"}, pw))
    with vault_env():
        values = vault.load(tmp_path, ["brokers", "lab"])
    assert dict(values) == {"a": "1", "b": "2"}


def _secret_values() -> list[str]:
    with vault_env():
        return list(vault.load(TEST_VAULT.parent, []).values())


@pytest.mark.parametrize("inventory", ["prod", "staging", "lab", "cluster-example"])
def test_no_secret_in_host_data(inventory: str) -> None:
    data = load_inventory_data(inventory)
    dump = repr(data)
    assert not any(v in dump for v in _secret_values())


def test_no_secret_in_debug_inventory_output() -> None:
    """What an operator would paste into a ticket: pyinfra's own dump of the lab's host data."""
    env = {"TELEMETRY_VAULT_PASSWORD_FILE": str(TEST_VAULT_PASSWORD), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyinfra", "inventories/lab.py", "debug-inventory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert "vault_dir" in output, output[-2000:]
    assert not any(v in output for v in _secret_values())
