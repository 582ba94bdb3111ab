"""certbot role: lineages, explicit first hook run, stable renewal time, hook config per broker; the hook
itself against a fake docker (the EMQX path; the Mosquitto path runs in test_certbot_pebble.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from roles._base import RoleError
from roles.certbot import (
    HOOK_CONFIG,
    HOOK_PATH,
    HOOK_SCRIPT,
    TIMER_DROPIN,
    acme_server_url,
    certbot,
    renewal_time,
)
from tests.support import deploy_validators as v
from tests.support.deploy_fake import LIVE_HOST, NO_SYSTEMD_HOST, run_deploys

HOST = "telemetry.example.net"  # the prod inventory's placeholder host: a reserved name
PROD = "iot.acme-telemetry.net"  # a name a public CA would issue for
NAMES = {"tls_domains": [PROD]}
LE = "https://acme-v02.api.letsencrypt.org/directory"


def lineage_response(name: str, *, dns: str, server: str = LE, installed: bool = True) -> dict[str, Any]:
    """What the CertbotLineage fact prints for an existing lineage (matched on its live path)."""
    return {
        f"/etc/letsencrypt/live/{name}/fullchain.pem ]": [
            f"server={server}",
            f"dns={dns} ",
            f"installed={'yes' if installed else 'no'}",
        ]
    }


def existing(installed: bool = True, server: str = LE) -> dict[str, Any]:
    out = dict(LIVE_HOST)
    for k in ("ecdsa", "rsa"):
        out.update(lineage_response(f"{PROD}-{k}", dns=PROD, server=server, installed=installed))
    return out


def certbot_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith("certbot ") or "RENEWED_LINEAGE=" in c]


def test_first_deploy_issues_both_lineages_then_runs_the_hook() -> None:
    (r,) = run_deploys("prod", [certbot], override=NAMES).values()
    issued = certbot_commands(r.commands)
    assert len(issued) == 2
    for cmd, key_opts in zip(issued, ("--key-type ecdsa --elliptic-curve secp256r1", "--key-type rsa"), strict=True):
        kind = "ecdsa" if "ecdsa" in key_opts else "rsa"
        assert cmd.startswith("certbot certonly --non-interactive --agree-tos --webroot -w /var/www/acme ")
        assert f"--cert-name {PROD}-{kind} " in cmd and key_opts in cmd
        assert f"--server {LE}" in cmd and f"-d {PROD}" in cmd and "--force-renewal" not in cmd
        # certbot runs deploy hooks on renewals only: the role runs it after certonly succeeded
        assert cmd.endswith(f" && RENEWED_LINEAGE=/etc/letsencrypt/live/{PROD}-{kind} {HOOK_PATH}")
    assert r.files[HOOK_PATH] == HOOK_SCRIPT.read_text()
    conf = json.loads(r.files[HOOK_CONFIG])
    assert conf["lineages"] == {f"{PROD}-ecdsa": "ecdsa", f"{PROD}-rsa": "rsa"}
    assert conf["broker"]["kind"] == "emqx" and conf["broker"]["owner"] == 1000
    assert conf["broker"]["tls_dir"] == "/etc/telemetry/tls"
    assert conf["broker"]["listeners"] == ["ssl:default", "wss:default"]


def test_lab_hook_signals_mosquitto_with_a_group_readable_key() -> None:
    (r,) = run_deploys("lab", [certbot]).values()
    broker = json.loads(r.files[HOOK_CONFIG])["broker"]
    assert broker["kind"] == "mosquitto" and broker["pid_file"] == "/run/mosquitto/mosquitto.pid"
    assert (broker["group"], broker["key_mode"]) == ("mosquitto", "0640")
    assert any("groupadd --system mosquitto" in c for c in r.commands)


def test_second_deploy_with_installed_lineages_changes_nothing() -> None:
    (r,) = run_deploys("prod", [certbot], responses=existing(), override=NAMES).values()
    assert certbot_commands(r.commands) == []


def test_a_lineage_nginx_does_not_serve_yet_gets_the_hook_only() -> None:
    (r,) = run_deploys("prod", [certbot], responses=existing(installed=False), override=NAMES).values()
    assert certbot_commands(r.commands) == [
        f"RENEWED_LINEAGE=/etc/letsencrypt/live/{PROD}-{k} {HOOK_PATH}" for k in ("ecdsa", "rsa")
    ]


def test_new_acme_server_or_names_reissue_now() -> None:
    staging = "https://acme-staging-v02.api.letsencrypt.org/directory"
    (r,) = run_deploys("prod", [certbot], responses=existing(server=staging), override=NAMES).values()
    cmds = certbot_commands(r.commands)
    assert len(cmds) == 2 and all("--force-renewal" in c and f"--server {LE}" in c for c in cmds)
    (r,) = run_deploys(
        "prod", [certbot], responses=existing(), override={"tls_domains": [PROD, f"api.{PROD}"]}
    ).values()
    cmds = certbot_commands(r.commands)
    assert len(cmds) == 2 and all(f"-d {PROD} -d api.{PROD}" in c and "--force-renewal" in c for c in cmds)


def test_reserved_names_keep_self_signed_certificates_and_the_broker_gets_one() -> None:
    # the lab (lab.telemetry.test) against Let's Encrypt: no doomed certonly, a certificate for Mosquitto
    (r,) = run_deploys("lab", [certbot]).values()
    assert certbot_commands(r.commands) == []
    (copy,) = [c for c in r.commands if c.startswith("install ")]
    assert (
        "install -m 0644 -o root -g mosquitto /etc/nginx/tls/rsa/fullchain.pem /etc/telemetry/tls/fullchain.pem" in copy
    )
    assert "install -m 0640 -o root -g mosquitto /etc/nginx/tls/rsa/privkey.pem /etc/telemetry/tls/privkey.pem" in copy
    # once the broker has its files, nothing more (zero-change re-deploys)
    present = {
        **LIVE_HOST,
        **{
            f"/etc/telemetry/tls/{n}": [f"user=root group=root mode=-rw-r----- atime=0 mtime=0 ctime=0 size=9 '/x/{n}'"]
            for n in ("fullchain.pem", "privkey.pem")
        },
    }
    (r,) = run_deploys("lab", [certbot], responses=present).values()
    assert not [c for c in r.commands if c.startswith("install ")]
    # a test ACME server may issue for them
    (r,) = run_deploys("lab", [certbot], override={"acme_server": "https://127.0.0.1:14000/dir"}).values()
    assert len(certbot_commands(r.commands)) == 2


def test_no_issuance_without_a_running_host() -> None:
    (r,) = run_deploys("prod", [certbot], responses=NO_SYSTEMD_HOST, override=NAMES).values()
    assert certbot_commands(r.commands) == []
    assert TIMER_DROPIN in r.files


def test_acme_server_setting() -> None:
    assert acme_server_url("letsencrypt-staging") == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert acme_server_url("https://127.0.0.1:14000/dir") == "https://127.0.0.1:14000/dir"
    with pytest.raises(RoleError):
        acme_server_url("http://insecure.example/dir")
    (r,) = run_deploys("prod", [certbot], override={**NAMES, "acme_server": "letsencrypt-staging"}).values()
    assert all("acme-staging-v02" in c for c in certbot_commands(r.commands))


def test_broker_files_must_be_where_the_hook_writes() -> None:
    with pytest.raises(RoleError, match="tls_key_file"):
        run_deploys("prod", [certbot], override={**NAMES, "tls_key_file": "/etc/telemetry/tls/key.pem"})


def test_renewal_time_is_stable_per_host_and_spread(tmp_path: Path) -> None:
    (a,) = run_deploys("prod", [certbot], override=NAMES).values()
    (b,) = run_deploys("prod", [certbot], override=NAMES).values()
    assert a.files[TIMER_DROPIN] == b.files[TIMER_DROPIN]
    times = {renewal_time(f"host{i}.example.net") for i in range(50)}
    assert len(times) > 25  # different hosts, different times
    hour, minute = renewal_time(HOST)
    spec = f"*-*-* {hour:02d},{hour + 12:02d}:{minute:02d}:00"
    assert f"OnCalendar={spec}\n" in a.files[TIMER_DROPIN]
    proc = v.run([v.tool("systemd-analyze"), "calendar", spec])
    assert proc.returncode == 0, proc.stderr
    # Debian's certbot.timer with the drop-in verifies cleanly
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    dropin = root / TIMER_DROPIN.lstrip("/")
    dropin.parent.mkdir(parents=True)
    dropin.write_text(a.files[TIMER_DROPIN])
    assert (root / "usr/lib/systemd/system/certbot.timer").exists(), "certbot not installed (make deps)"
    proc = v.run([v.tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", "certbot.timer"])
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- the hook, EMQX path -----------------------------------------------------------------------


def _hook_setup(tmp_path: Path, containers: str) -> tuple[dict[str, str], Path, Path]:
    lineage = tmp_path / "live/api.example.org-rsa"
    lineage.mkdir(parents=True)
    for name in ("fullchain.pem", "privkey.pem", "chain.pem"):
        (lineage / name).write_text(f"new {name}\n")
    calls = tmp_path / "docker-calls"
    docker = tmp_path / "docker"
    docker.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f'if [ "$1" = ps ]; then printf "{containers}"; fi\n'
    )  # fmt: skip
    docker.chmod(0o755)
    conf = tmp_path / "hook.json"
    conf.write_text(
        json.dumps(
            {
                "lineages": {"api.example.org-rsa": "rsa", "api.example.org-ecdsa": "ecdsa"},
                "nginx_tls_dir": str(tmp_path / "nginx-tls"),
                "nginx_test": ["true"],
                "nginx_reload": ["true"],
                "broker": {
                    "kind": "emqx",
                    "key_type": "rsa",
                    "tls_dir": str(tmp_path / "broker-tls"),
                    "owner": os.geteuid(),
                    "group": os.getegid(),
                    "cert_mode": "0644",
                    "key_mode": "0600",
                    "compose_project": "emqx",
                    "compose_service": "emqx",
                    "listeners": ["ssl:default", "wss:default"],
                    "docker": str(docker),
                },
                "log_file": str(tmp_path / "hook.log"),
            }
        )
    )
    env = {**os.environ, "TELEMETRY_CERTBOT_HOOK_CONFIG": str(conf), "RENEWED_LINEAGE": str(lineage)}
    return env, calls, tmp_path


def _hook(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HOOK_SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_hook_restarts_emqx_tls_listeners_in_its_container(tmp_path: Path) -> None:
    env, calls, d = _hook_setup(tmp_path, "abc123\\n")
    proc = _hook(env)
    assert proc.returncode == 0, proc.stderr
    recorded = calls.read_text().splitlines()
    assert "label=com.docker.compose.project=emqx" in recorded[0]
    assert recorded[1:] == [
        "exec abc123 emqx ctl listeners restart ssl:default",
        "exec abc123 emqx ctl listeners restart wss:default",
    ]
    assert (d / "broker-tls/privkey.pem").read_text() == "new privkey.pem\n"
    assert (d / "broker-tls/privkey.pem").stat().st_mode & 0o777 == 0o600
    assert (d / "nginx-tls/rsa/fullchain.pem").read_text() == "new fullchain.pem\n"
    assert "EMQX listener wss:default restarted" in (d / "hook.log").read_text()


def test_hook_leaves_a_stopped_emqx_alone(tmp_path: Path) -> None:
    env, calls, d = _hook_setup(tmp_path, "")
    proc = _hook(env)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls.read_text().splitlines() if c.startswith("exec")]
    assert "not running" in proc.stderr
    assert (d / "broker-tls/fullchain.pem").read_text() == "new fullchain.pem\n"


def test_hook_ignores_other_lineages_and_needs_its_variable(tmp_path: Path) -> None:
    env, calls, _ = _hook_setup(tmp_path, "abc\\n")
    other = tmp_path / "live/someone-else"
    other.mkdir(parents=True)
    proc = _hook({**env, "RENEWED_LINEAGE": str(other)})
    assert proc.returncode == 0 and "not a lineage of this platform" in proc.stderr
    assert not calls.exists()
    proc = _hook({k: val for k, val in env.items() if k != "RENEWED_LINEAGE"})
    assert proc.returncode == 2


def test_hook_fails_when_the_broker_reload_fails(tmp_path: Path) -> None:
    env, _, d = _hook_setup(tmp_path, "abc\\n")
    docker = d / "docker"
    docker.write_text(docker.read_text() + 'if [ "$1" = exec ]; then echo "listener not found" >&2; exit 1; fi\n')
    proc = _hook(env)
    assert proc.returncode == 1 and "listener not found" in proc.stderr
