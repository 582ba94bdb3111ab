"""The host itself: packages, admin login, sshd, firewall, fail2ban, upgrades, time, kernel tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyinfra.api.host import Host
from pyinfra.operations import apt, files, server

from roles._base import Role, render, role_deploy

SSHD_DROPIN = "/etc/ssh/sshd_config.d/10-telemetry.conf"
FIREWALL_SCRIPT = "/usr/local/sbin/telemetry-firewall"
SYSCTL_FILE = "/etc/sysctl.d/60-telemetry.conf"

# Cluster ports (contract section 8): Erlang distribution 4370, gen_rpc 5369 in the Docker image.
EMQX_PEER_PORTS = (4370, 5369)


@dataclass(frozen=True)
class PeerRule:
    source: str
    port: int
    comment: str


def _address(host: Host) -> str:
    return str(host.data.get("private_address") or host.name)


def peer_rules(host: Host) -> list[PeerRule]:
    """Ports only other hosts of this inventory may reach: EMQX cluster traffic between brokers, and
    the database from brokers and ingest workers when it listens beyond loopback."""
    inventory = host.inventory
    rules: list[PeerRule] = []
    brokers = list(inventory.get_group("brokers", [])) if "brokers" in inventory.groups else []
    # Compare names: `host` may be pyinfra's context proxy, never identical to the inventory's object.
    if host.name in {b.name for b in brokers} and len(brokers) > 1 and host.data.get("broker_backend") == "emqx":
        for peer in brokers:
            if peer.name == host.name:
                continue
            rules.extend(PeerRule(_address(peer), port, "emqx cluster") for port in EMQX_PEER_PORTS)
    if "databases" in host.groups and host.data.get("database_listen_address") != "127.0.0.1":
        clients = [h for h in inventory if h.name != host.name and ({"brokers", "ingest"} & set(h.groups))]
        port = int(host.data.get("database_port"))
        rules.extend(PeerRule(_address(c), port, "database client") for c in clients)
    return rules


def public_ports(host: Host) -> list[int]:
    ports = list(host.data.get("firewall_public_tcp_ports") or [])
    if "brokers" in host.groups:
        ports += list(host.data.get("firewall_broker_tcp_ports") or [])
    return sorted(set(ports))


class Base(Role):
    name = "base"

    def install(self) -> None:
        apt.update(name="base: apt update", cache_time=3600)
        packages = [
            *self.data("base_packages"),
            "openssh-server",
            "ufw",
            "fail2ban",
            # fail2ban's `backend = systemd` imports it; no_recommends would leave it out (exit 255).
            "python3-systemd",
            "unattended-upgrades",
            "systemd-timesyncd",
            "tzdata",
        ]
        apt.packages(name="base: packages", packages=sorted(set(packages)), no_recommends=True)
        admin = self.data("admin_user")
        server.user(  # noqa: S604 -- `shell` is the login shell, not a subprocess flag
            name=f"base: admin user {admin}",
            user=admin,
            shell="/bin/bash",
            create_home=True,
            groups=["sudo"],
            public_keys=list(self.data("admin_ssh_keys")),
            delete_keys=True,
        )

    def configure(self) -> None:
        admin = self.data("admin_user")
        self.put(render("base/sudoers.j2", admin_user=admin), f"/etc/sudoers.d/90-{admin}", key="sudo", mode="0440")
        self.template(
            "base/sshd_telemetry.conf.j2",
            SSHD_DROPIN,
            key="sshd",
            sshd_port=self.data("sshd_port"),
            permit_root_login=self.data("ssh_permit_root_login"),
        )
        self.template(
            "base/firewall.sh.j2",
            FIREWALL_SCRIPT,
            key="firewall",
            mode="0755",
            **self.firewall_context(),
        )
        self.template(
            "base/fail2ban-sshd.local.j2",
            "/etc/fail2ban/jail.d/sshd.local",
            key="fail2ban",
            sshd_port=self.data("sshd_port"),
            maxretry=self.data("fail2ban_maxretry"),
            findtime=self.data("fail2ban_findtime"),
            bantime=self.data("fail2ban_bantime"),
        )
        self.template("base/20auto-upgrades.j2", "/etc/apt/apt.conf.d/20auto-upgrades", key="upgrades")
        self.template(
            "base/52telemetry-unattended-upgrades.j2",
            "/etc/apt/apt.conf.d/52telemetry-unattended-upgrades",
            key="upgrades",
            reboot=self.data("unattended_upgrades_reboot") is True,
        )
        self.template(
            "base/timesyncd.conf.j2",
            "/etc/systemd/timesyncd.conf.d/telemetry.conf",
            key="ntp",
            ntp_servers=self.data("ntp_servers"),
        )
        tz = self.data("timezone")
        self.put(f"{tz}\n", "/etc/timezone", key="timezone")
        self.record(
            "timezone",
            files.link(name="base: /etc/localtime", path="/etc/localtime", target=f"/usr/share/zoneinfo/{tz}"),
        )
        self.template("base/sysctl.conf.j2", SYSCTL_FILE, key="sysctl", settings=self.data("sysctl_settings"))
        self.template(
            "base/limits.conf.j2",
            "/etc/systemd/system.conf.d/60-telemetry-limits.conf",
            key="limits",
            nofile=self.data("nofile_limit"),
        )

    def firewall_context(self) -> dict[str, Any]:
        return {
            "sshd_port": self.data("sshd_port"),
            "ssh_allowed_from": list(self.data("ssh_allowed_from")),
            "public_tcp_ports": public_ports(self.host),
            "peer_rules": peer_rules(self.host),
        }

    def activate(self) -> None:
        if self.proc_sys_writable:
            server.shell(
                name="base: apply sysctl settings",
                commands=[f"sysctl -q -p {SYSCTL_FILE}"],
                _if=self.changed("sysctl"),
            )
        else:
            self.warn_once(f"/proc/sys is read-only: {SYSCTL_FILE} applies at next boot of a real host")
        if not self.has_systemd:
            # No init, no netfilter we may touch (chroot, image build): files are in place, nothing runs.
            self.warn_once("systemd is not PID 1: firewall, sshd, fail2ban and NTP activate on first boot")
            return
        server.shell(
            name="base: apply firewall rules",
            commands=[FIREWALL_SCRIPT],
            _if=self.changed("firewall"),
        )
        server.shell(name="base: sshd config test", commands=["sshd -t"], _if=self.changed("sshd"))
        self.service("ssh", reload_if=self.changed("sshd"))
        self.service("fail2ban", restart_if=self.changed("fail2ban"))
        if self.in_container:
            # The container's clock is the host's; systemd refuses to start timesyncd here.
            self.warn_once("container: systemd-timesyncd is skipped by systemd, time comes from the host")
        else:
            self.service("systemd-timesyncd", restart_if=self.changed("ntp"))
        self.daemon_reload(_if=self.changed("limits"))


base = role_deploy(Base)
