"""ingest.config and `ingest check-config`: every problem named, secrets only from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest import config
from ingest.cli import main

GOOD = """
[mqtt]
host = "broker.example"
username = "ingest"
password_file = "{d}/mqtt.pw"
client_id = "ingest-1"
shared_group = "ingest"

[database]
dsn = "host=db dbname=telemetry user=ingest"
password_file = "{d}/db.pw"

[api]
enabled = true
hmac_key_file = "{d}/api.key"
"""


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    for name, value in (("mqtt.pw", "pw"), ("db.pw", "dbpw"), ("api.key", "k" * 40)):
        p = tmp_path / name
        p.write_text(value)
        p.chmod(mode)
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(text.format(d=tmp_path))
    return cfg


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, GOOD))
    assert cfg.mqtt.password == "pw" and cfg.mqtt.protocol == "3.1.1" and cfg.mqtt.tls
    assert cfg.mqtt.topics()[0] == "$share/ingest/devices/+/telemetry"
    assert "password=dbpw" in cfg.database.conninfo
    assert cfg.api.hmac_key == b"k" * 40 and cfg.api.conninfo == cfg.database.conninfo
    assert cfg.mqtt.receive_maximum == 2 * cfg.ingest.batch_max_messages
    assert "pw" not in repr(cfg.mqtt)


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    text = GOOD.replace('host = "broker.example"', 'host = "b"\npassword = "inline"\nport = true') + (
        "\n[ingest]\nbatch_max_mesages = 5\nbatch_max_messages = 0\n[database2]\nx = 1\n"
    )
    text = text.replace('dsn = "host=db', 'dsn = "password=oops host=db')
    with pytest.raises(config.ConfigError) as err:
        config.load(_write(tmp_path, text))
    joined = "\n".join(err.value.problems)
    for needle in ("mqtt.password: unknown key (secrets are read from files", "mqtt.port: expected integer",
                   "ingest.batch_max_mesages: unknown key", "ingest.batch_max_messages: 0 is below",
                   "[database2]: unknown section", "database.dsn: contains a password"):  # fmt: skip
        assert needle in joined


def test_world_readable_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="mode 0644"):
        config.load(_write(tmp_path, GOOD, mode=0o644))


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(_write(tmp_path, GOOD))]) == 0
    assert "ok" in capsys.readouterr().out
    bad = _write(tmp_path, GOOD.replace("[api]", "[api]\nreplay_window_s = 1"))
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "api.replay_window_s: 1 is below the minimum" in capsys.readouterr().err
    assert main(["check-config", "--explain"]) == 0
    assert "batch_max_messages" in capsys.readouterr().out


def test_example_config_is_valid_apart_from_its_secret_paths() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "ingest.toml"
    with pytest.raises(config.ConfigError) as err:
        config.load(example)
    assert all("cannot read" in p for p in err.value.problems), err.value.problems
