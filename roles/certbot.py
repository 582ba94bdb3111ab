"""certbot from apt: ECDSA and RSA lineages by webroot, renewal twice a day, the deploy hook (README: TLS).

Issuance goes through nginx's ACME webroot (the nginx role runs first and serves it with its bootstrap
certificate): no downtime, nothing stopped. certbot runs deploy hooks on renewals only, so the role
runs the hook itself after the first ``certonly``, and again whenever nginx's copy of a certificate
differs from the lineage (a hook that failed earlier is retried by the next deploy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.facts.files import File
from pyinfra.facts.server import Groups
from pyinfra.operations import apt, files, server

from roles._base import REPO_ROOT, Role, RoleError, render, role_deploy
from roles.broker_emqx import EMQX_UID, fqdn
from roles.broker_emqx import PROJECT as EMQX_PROJECT
from roles.nginx import KEY_TYPES, cert_files, tls_domains

LETSENCRYPT_LIVE = "/etc/letsencrypt/live"
HOOK_SCRIPT = REPO_ROOT / "scripts/certbot-deploy-hook.py"
# certbot runs every executable here after each renewal, with RENEWED_LINEAGE set.
HOOK_PATH = "/etc/letsencrypt/renewal-hooks/deploy/50-telemetry"
HOOK_CONFIG = "/etc/telemetry/certbot-hook.json"
HOOK_LOG = "/var/log/telemetry/certbot-deploy-hook.log"
TIMER_DROPIN = "/etc/systemd/system/certbot.timer.d/50-telemetry.conf"
ACME_SERVERS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
KEY_OPTIONS = {
    "ecdsa": ["--key-type", "ecdsa", "--elliptic-curve", "secp256r1"],
    "rsa": ["--key-type", "rsa", "--rsa-key-size", "2048"],
}
MOSQUITTO_PID_FILE = "/run/mosquitto/mosquitto.pid"
# Names no public CA issues for (RFC 2606, RFC 6761): the lab's *.test, the inventories' examples.
RESERVED_SUFFIXES = (".test", ".example", ".invalid", ".localhost", ".example.com", ".example.net", ".example.org")


@dataclass(frozen=True)
class LineageState:
    domains: tuple[str, ...]
    server: str
    installed: bool  # nginx's copy is this lineage's certificate


class CertbotLineage(FactBase[LineageState | None]):
    """A lineage's names and ACME server, and whether nginx serves it. None when it does not exist."""

    def command(self, lineage: str, nginx_fullchain: str) -> str:
        live = f"{LETSENCRYPT_LIVE}/{lineage}"
        return (
            f"if [ -r {live}/fullchain.pem ]; then "
            f"echo \"server=$(sed -n 's/^server *= *//p' /etc/letsencrypt/renewal/{lineage}.conf)\"; "
            f'echo "dns=$(openssl x509 -noout -ext subjectAltName -in {live}/cert.pem | '
            "grep -o 'DNS:[^,]*' | sed 's/^DNS://' | sort | tr '\\n' ' ')\"; "
            f"if cmp -s {live}/fullchain.pem {nginx_fullchain}; then echo installed=yes; else echo installed=no; fi; "
            "fi; true"
        )

    def process(self, output: list[str]) -> LineageState | None:
        values = dict(line.strip().partition("=")[::2] for line in output if "=" in line)
        if "dns" not in values:
            return None
        return LineageState(
            domains=tuple(sorted(values["dns"].split())),
            server=values.get("server", ""),
            installed=values.get("installed") == "yes",
        )


def acme_server_url(value: str) -> str:
    url = ACME_SERVERS.get(value, value)
    if not url.startswith("https://"):
        raise RoleError(f"certbot: acme_server {value!r}: one of {', '.join(ACME_SERVERS)} or an https:// URL")
    return url


def renewal_time(host_name: str) -> tuple[int, int]:
    """(hour 0-11, minute): the first of two daily renewal times, derived from the host name so it
    is spread across hosts but identical on every deploy."""
    n = int.from_bytes(hashlib.sha256(host_name.encode()).digest()[:8], "big")
    return (n // 60) % 12, n % 60


def publicly_issuable(domains: list[str], server_url: str) -> bool:
    """False when a public ACME server would refuse the names anyway (a test server may accept them)."""
    public = server_url in ACME_SERVERS.values()
    return not (public and any(f".{d}".endswith(RESERVED_SUFFIXES) for d in domains))


def lineage_name(host: Host, key_type: str) -> str:
    return f"{tls_domains(host)[0]}-{key_type}"


def broker_hook_config(host: Host) -> dict[str, Any] | None:
    """What the hook does for the broker on this host (None: no broker here)."""
    if "brokers" not in host.groups:
        return None
    key_type = str(host.data.get("broker_tls_key_type"))
    if key_type not in KEY_TYPES:
        raise RoleError(f"certbot: broker_tls_key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    tls_dir = str(host.data.get("tls_dir")).rstrip("/")
    # The hook writes these two names; the broker roles read tls_cert_file / tls_key_file.
    for key, name in (("tls_cert_file", "fullchain.pem"), ("tls_key_file", "privkey.pem")):
        if str(host.data.get(key)) != f"{tls_dir}/{name}":
            raise RoleError(f"certbot: {key} must be {tls_dir}/{name} (what the deploy hook writes)")
    common = {"key_type": key_type, "tls_dir": tls_dir, "cert_mode": "0644"}
    backend = host.data.get("broker_backend")
    if backend == "emqx":
        # EMQX runs as uid 1000 in its image and reads the mounted directory as that user.
        return {
            **common,
            "kind": "emqx",
            "owner": EMQX_UID,
            "group": EMQX_UID,
            "key_mode": "0600",
            "compose_project": EMQX_PROJECT,
            "compose_service": "emqx",
            "listeners": ["ssl:default", "wss:default"],
        }
    if backend == "mosquitto":
        # Mosquitto 2 reads certificates after dropping to its own user.
        return {
            **common,
            "kind": "mosquitto",
            "owner": "root",
            "group": "mosquitto",
            "key_mode": "0640",
            "pid_file": MOSQUITTO_PID_FILE,
        }
    raise RoleError(f"certbot: unknown broker_backend {backend!r}")


def hook_config(host: Host) -> dict[str, Any]:
    return {
        "lineages": {lineage_name(host, k): k for k in KEY_TYPES},
        "nginx_tls_dir": str(host.data.get("nginx_tls_dir")),
        "nginx_test": ["/usr/sbin/nginx", "-t", "-q"],
        # What Debian's nginx.service runs on reload; works with or without systemd.
        "nginx_reload": ["/usr/sbin/nginx", "-s", "reload"],
        "broker": broker_hook_config(host),
        "log_file": HOOK_LOG,
    }


def certonly_command(
    *, name: str, key_type: str, domains: list[str], webroot: str, server_url: str, email: str, force: bool
) -> list[str]:
    argv = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--webroot", "-w", webroot]
    argv += ["--cert-name", name, *KEY_OPTIONS[key_type], "--server", server_url]
    argv += ["--email", email] if email else ["--register-unsafely-without-email"]
    for d in domains:
        argv += ["-d", d]
    if force:
        # Names or ACME server changed: issue now instead of waiting for the renewal window.
        argv.append("--force-renewal")
    return argv


class Certbot(Role):
    name = "certbot"

    def install(self) -> None:
        apt.packages(
            name="certbot: certbot", packages=["certbot", "openssl"], no_recommends=True, update=True, cache_time=3600
        )
        broker = broker_hook_config(self.host)
        owner: str | int = "root"
        group: str | int = "root"
        if broker is not None:
            owner, group = broker["owner"], broker["group"]
            # The broker role installs Mosquitto after this role; Debian's postinst reuses an
            # existing system group, so the key can be group-readable before the package exists.
            if broker["kind"] == "mosquitto" and "mosquitto" not in (self.host.get_fact(Groups) or []):
                server.shell(
                    name="certbot: mosquitto system group",
                    commands=["getent group mosquitto >/dev/null || groupadd --system mosquitto"],
                )
        for path, mode, user, grp in (
            ("/etc/telemetry", "0755", "root", "root"),
            (str(self.data("tls_dir")), "0750", owner, group),
            (str(Path(HOOK_LOG).parent), "0755", "root", "root"),
            (str(Path(HOOK_PATH).parent), "0755", "root", "root"),
        ):
            files.directory(name=f"certbot: {path}", path=path, mode=mode, user=str(user), group=str(grp))

    def configure(self) -> None:
        self.put(HOOK_SCRIPT.read_text(), HOOK_PATH, key="hook", mode="0755")
        self.put(json.dumps(hook_config(self.host), indent=2, sort_keys=True) + "\n", HOOK_CONFIG, key="hook")
        # The fqdn rather than pyinfra's connection name, which may be an address or an alias.
        hour, minute = renewal_time(fqdn(self.host))
        self.put(render("certbot/certbot-timer.conf.j2", hour=hour, minute=minute), TIMER_DROPIN, key="timer")

    def activate(self) -> None:
        self.daemon_reload(_if=self.changed("timer"))
        self.service("certbot.timer", restart_if=self.changed("timer"))
        if not self.has_systemd:
            # No running nginx to answer the challenge (chroot, image build): issue on a live host.
            self.warn_once("systemd is not PID 1: certificates are issued by the first deploy to a live host")
            return
        domains = tls_domains(self.host)
        server_url = acme_server_url(str(self.data("acme_server")))
        if not publicly_issuable(domains, server_url):
            self.warn_once(
                f"{', '.join(domains)}: reserved names {server_url} refuses; keeping the self-signed "
                "certificates (set tls_domains, or acme_server to a test ACME server)"
            )
            self.bootstrap_broker_certificate()
            return
        for key_type in KEY_TYPES:
            name = lineage_name(self.host, key_type)
            nginx_copy = cert_files(str(self.data("nginx_tls_dir")), key_type)["fullchain"]
            state = self.host.get_fact(CertbotLineage, lineage=name, nginx_fullchain=nginx_copy)
            hook = f"RENEWED_LINEAGE={LETSENCRYPT_LIVE}/{name} {HOOK_PATH}"
            if state is None or state.domains != tuple(sorted(domains)) or state.server != server_url:
                argv = certonly_command(
                    name=name,
                    key_type=key_type,
                    domains=domains,
                    webroot=str(self.data("acme_webroot")),
                    server_url=server_url,
                    email=str(self.data("acme_email")),
                    force=state is not None,
                )
                server.shell(
                    name=f"certbot: issue {name}, then run the deploy hook",
                    commands=[" ".join(argv) + " && " + hook],
                )
            elif not state.installed:
                server.shell(name=f"certbot: install {name} (deploy hook)", commands=[hook])

    def bootstrap_broker_certificate(self) -> None:
        """Without issuance, the broker gets nginx's self-signed certificate once, so it can start
        its TLS listeners (it refuses to start without the files)."""
        broker = broker_hook_config(self.host)
        if broker is None:
            return
        target = broker["tls_dir"]
        if all(self.host.get_fact(File, path=f"{target}/{n}") for n in ("fullchain.pem", "privkey.pem")):
            return
        source = cert_files(str(self.data("nginx_tls_dir")), broker["key_type"])
        owner = f"-o {broker['owner']} -g {broker['group']}"
        server.shell(
            name="certbot: self-signed certificate for the broker (no issuance)",
            commands=[
                f"install -m {broker['cert_mode']} {owner} {source['fullchain']} {target}/fullchain.pem && "
                f"install -m {broker['key_mode']} {owner} {source['privkey']} {target}/privkey.pem"
            ],
        )


certbot = role_deploy(Certbot)
