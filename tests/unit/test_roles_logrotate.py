"""logrotate role: the rendered rules pass `logrotate -d` and really rotate a log in a temp directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from roles._base import RoleError
from roles.logrotate import CONFIG, logrotate, render_config
from tests.support import deploy_validators as v
from tests.support.deploy_fake import run_deploys


def test_prod_rules() -> None:
    (r,) = run_deploys("prod", [logrotate]).values()
    conf = r.files[CONFIG]
    assert conf.startswith("# Managed by") and "/var/log/telemetry/*.log {" in conf
    for line in ("weekly", "maxsize 50M", "rotate 8", "compress", "missingok", "notifempty"):
        assert f"    {line}\n" in conf


def test_bad_settings_are_refused() -> None:
    with pytest.raises(RoleError, match="logrotate_max_size"):
        run_deploys("prod", [logrotate], override={"logrotate_max_size": "50 megabytes"})
    with pytest.raises(RoleError, match="logrotate_keep"):
        run_deploys("prod", [logrotate], override={"logrotate_keep": 0})


def test_logrotate_d_accepts_the_production_rules(tmp_path: Path) -> None:
    (r,) = run_deploys("prod", [logrotate]).values()
    conf = tmp_path / "telemetry"
    conf.write_text(r.files[CONFIG])
    conf.chmod(0o644)
    proc = v.run([v.tool("logrotate", "/usr/sbin/logrotate"), "-d", "-s", str(tmp_path / "state"), str(conf)])
    assert proc.returncode == 0, proc.stderr
    assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def test_a_log_past_the_size_is_rotated(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "certbot-deploy-hook.log"
    log.write_text("x" * 2048)
    conf = tmp_path / "telemetry"
    conf.write_text(render_config({"log_dir": str(logs), "max_size": "1k", "keep": 2}).replace(" root adm", ""))
    proc = v.run([v.tool("logrotate", "/usr/sbin/logrotate"), "-s", str(tmp_path / "state"), str(conf)])
    assert proc.returncode == 0, proc.stderr
    # maxsize rotates before the week is over; delaycompress keeps the newest rotation plain
    assert (logs / "certbot-deploy-hook.log.1").read_text() == "x" * 2048
    assert log.exists() and log.stat().st_size == 0
