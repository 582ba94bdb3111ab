"""base: sshd drop-in accepted by sshd, firewall script by shellcheck, exactly the inventory's ports."""

from __future__ import annotations

from pathlib import Path

from roles.base import FIREWALL_SCRIPT, SSHD_DROPIN, base
from tests.support import deploy_validators as v
from tests.support.deploy_fake import NO_SYSTEMD_HOST, run_deploys


def _ufw_rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("ufw allow")]


def test_prod_sshd_and_firewall(tmp_path: Path) -> None:
    (r,) = run_deploys("prod", [base]).values()
    sshd = r.files[SSHD_DROPIN]
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin prohibit-password" in sshd
    v.sshd_ok(sshd, tmp_path)
    script = r.files[FIREWALL_SCRIPT]
    v.shellcheck_ok(script, tmp_path, "telemetry-firewall")
    assert "ufw default deny incoming" in script
    rules = _ufw_rules(script)
    assert rules == [
        "ufw allow proto tcp from 198.51.100.0/24 to any port 22 comment 'ssh from admin network'",
        "ufw allow proto tcp from any to any port 80 comment 'public'",
        "ufw allow proto tcp from any to any port 443 comment 'public'",
        "ufw allow proto tcp from any to any port 8084 comment 'public'",
        "ufw allow proto tcp from any to any port 8883 comment 'public'",
    ]


def test_cluster_peers_only_reach_cluster_and_database_ports(tmp_path: Path) -> None:
    results = run_deploys("cluster-example", [base])
    broker = _ufw_rules(results["broker-a.cluster.example.net"].files[FIREWALL_SCRIPT])
    assert "ufw allow proto tcp from 10.0.0.12 to any port 4370 comment 'emqx cluster'" in broker
    assert "ufw allow proto tcp from 10.0.0.13 to any port 5369 comment 'emqx cluster'" in broker
    assert not any("10.0.0.11 " in r for r in broker)  # not itself
    db_script = results["db-a.cluster.example.net"].files[FIREWALL_SCRIPT]
    db = _ufw_rules(db_script)
    clients = {r.split()[5] for r in db if r.endswith("'database client'")}
    assert clients == {"10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.21", "10.0.0.22"}
    assert not any("8883" in r for r in db)  # not a broker
    ingest = _ufw_rules(results["ingest-a.cluster.example.net"].files[FIREWALL_SCRIPT])
    assert len(ingest) == 3  # ssh, 80, 443
    v.shellcheck_ok(db_script, tmp_path)


def test_live_host_activates_and_chroot_does_not() -> None:
    (live,) = run_deploys("lab", [base]).values()
    assert any("sysctl -q -p" in c for c in live.commands)
    assert FIREWALL_SCRIPT in live.commands
    (chroot,) = run_deploys("lab", [base], responses=NO_SYSTEMD_HOST).values()
    assert not any("systemctl" in c or "sysctl -q" in c or c == FIREWALL_SCRIPT for c in chroot.commands)
    assert set(chroot.files) == set(live.files)


def test_lab_allows_ssh_from_anywhere_but_nothing_else_extra() -> None:
    (r,) = run_deploys("lab", [base]).values()
    rules = _ufw_rules(r.files[FIREWALL_SCRIPT])
    assert rules[0] == "ufw allow proto tcp from any to any port 22 comment 'ssh'"
    assert len(rules) == 5


def test_one_setting_changes_only_its_file() -> None:
    (a,) = run_deploys("prod", [base]).values()
    (b,) = run_deploys("prod", [base], override={"fail2ban_maxretry": 3}).values()
    assert {p for p in a.files if a.files[p] != b.files.get(p)} == {"/etc/fail2ban/jail.d/sshd.local"}
