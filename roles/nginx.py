"""nginx from apt: the ACME webroot and redirect on port 80, the provisioning API on 443 (README: TLS).

nginx reads its certificates from ``nginx_tls_dir``/{ecdsa,rsa}/: self-signed until certbot's first
issuance (so nginx can start and serve the ACME challenge that issuance needs), then the copies the
certbot deploy hook installs after ``nginx -t`` accepted them. Every reload follows an ``nginx -t``;
when the test fails the operation fails the deploy with nginx's message, and the running nginx keeps
its previous configuration (nothing reloads it).
"""

from __future__ import annotations

import re
from typing import Any

from pyinfra.api.host import Host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server

from roles._base import Role, RoleError, render, role_deploy

NGINX_CONF = "/etc/nginx/nginx.conf"
SITE_AVAILABLE = "/etc/nginx/sites-available/telemetry.conf"
SITE_ENABLED = "/etc/nginx/sites-enabled/telemetry.conf"
DEBIAN_DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
# The two lineages, in the order nginx lists them (the first is the default for clients that offer
# both, and OpenSSL prefers ECDSA anyway when the client supports it).
KEY_TYPES = ("ecdsa", "rsa")
# Mozilla "intermediate" TLS 1.2 suites without DHE (no dhparam to manage): forward secrecy + AEAD.
# TLS 1.3 suites are OpenSSL's defaults, all of them modern.
CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# Bootstrap certificates live only until the first issuance; short, so one that lingers is noticed.
BOOTSTRAP_DAYS = 30

_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")
_CIDR = re.compile(r"^[0-9A-Fa-f:.]+(/\d{1,3})?$")
_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*/$")


def tls_domains(host: Host) -> list[str]:
    """The names the certificates cover: ``tls_domains``, or the host's fqdn. Checked here because
    they end up in nginx's config and on certbot's and openssl's command lines."""
    names = list(host.data.get("tls_domains") or []) or [str(host.data.get("fqdn") or host.name)]
    for name in names:
        if not _DOMAIN.match(str(name)):
            raise RoleError(f"tls_domains: {name!r} is not a fully qualified domain name")
    return [str(n) for n in names]


def cert_files(tls_dir: str, key_type: str) -> dict[str, str]:
    """Where nginx reads one certificate; the deploy hook writes the same names."""
    d = f"{tls_dir.rstrip('/')}/{key_type}"
    return {"dir": d, "fullchain": f"{d}/fullchain.pem", "privkey": f"{d}/privkey.pem", "chain": f"{d}/chain.pem"}


def render_main(ctx: dict[str, Any]) -> str:
    return render("nginx/nginx.conf.j2", **ctx)


def render_site(ctx: dict[str, Any]) -> str:
    return render("nginx/site.conf.j2", **ctx)


def main_context() -> dict[str, Any]:
    """/etc/nginx/nginx.conf on a Debian host (tests render the same template with their own paths)."""
    return {
        "user": "www-data",
        "pid_file": "/run/nginx.pid",
        "error_log": "/var/log/nginx/error.log",
        "access_log": "/var/log/nginx/access.log",
        "mime_types": "/etc/nginx/mime.types",
        "module_includes": ["/etc/nginx/modules-enabled/*.conf"],
        "http_includes": ["/etc/nginx/conf.d/*.conf", "/etc/nginx/sites-enabled/*"],
        "ciphers": CIPHERS,
    }


def bootstrap_command(directory: str, key_type: str, domains: list[str]) -> str:
    """A self-signed certificate for ``domains`` in ``directory`` (fullchain, chain, privkey), written
    under umask 077 so the key is never readable by others."""
    newkey = "ec -pkeyopt ec_paramgen_curve:prime256v1" if key_type == "ecdsa" else "rsa:2048"
    san = ",".join(f"DNS:{d}" for d in domains)
    return (
        f"umask 077 && mkdir -p {directory} && "
        f"openssl req -x509 -newkey {newkey} -nodes -days {BOOTSTRAP_DAYS} "
        f"-subj '/CN={domains[0]}' -addext 'subjectAltName={san}' "
        f"-keyout {directory}/privkey.pem -out {directory}/fullchain.pem 2>&1 && "
        f"cp {directory}/fullchain.pem {directory}/chain.pem && "
        f"chmod 0644 {directory}/fullchain.pem {directory}/chain.pem"
    )


class Nginx(Role):
    name = "nginx"

    def site_context(self) -> dict[str, Any]:
        rate = int(self.data("nginx_api_rate"))
        if rate < 1:
            raise RoleError(f"nginx: nginx_api_rate must be at least 1, not {rate}")
        ingest = str(self.data("ingest_http_address"))
        if not _ADDRESS.match(ingest):
            raise RoleError(f"nginx: ingest_http_address {ingest!r} must be host:port")
        tls_dir = str(self.data("nginx_tls_dir"))
        certs = [cert_files(tls_dir, k) for k in KEY_TYPES]
        dashboard_path = str(self.data("nginx_emqx_dashboard_path"))
        allow = [str(a) for a in self.data("nginx_emqx_dashboard_allow")]
        if dashboard_path:
            if not _PATH.match(dashboard_path) or dashboard_path == "/":
                raise RoleError(f"nginx: nginx_emqx_dashboard_path {dashboard_path!r} must look like /emqx/")
            if not allow or not all(_CIDR.match(a) for a in allow) or "0.0.0.0/0" in allow:
                raise RoleError(
                    "nginx: a public EMQX dashboard path needs nginx_emqx_dashboard_allow (CIDR networks, "
                    "not 0.0.0.0/0); leave the path empty and use an SSH tunnel otherwise"
                )
        return {
            "listen_http": ["80", "[::]:80"],
            "listen_https": ["443", "[::]:443"],
            "server_names": tls_domains(self.host),
            "webroot": str(self.data("acme_webroot")).rstrip("/"),
            "certificates": certs,
            "ocsp_stapling": bool(self.data("nginx_ocsp_stapling")),
            # Both lineages come from the same CA: one chain verifies the stapled responses.
            "trusted_chain": certs[0]["chain"],
            "resolvers": list(self.data("nginx_resolvers")),
            "hsts_max_age": int(self.data("nginx_hsts_max_age")),
            "api_rate": rate,
            # A client may spend a whole second's allowance at once; the next one that second is refused.
            "api_burst": rate - 1,
            "ingest_address": ingest,
            "dashboard_path": dashboard_path,
            "dashboard_allow": allow,
            "dashboard_address": f"127.0.0.1:{self.data('emqx_dashboard_port')}",
        }

    def install(self) -> None:
        apt.packages(
            name="nginx: nginx and openssl",
            packages=["nginx", "openssl"],
            no_recommends=True,
            update=True,
            cache_time=3600,
        )
        files.directory(name="nginx: ACME webroot", path=str(self.data("acme_webroot")), mode="0755")
        tls_dir = str(self.data("nginx_tls_dir"))
        # Only the master process (root) reads the keys.
        files.directory(name="nginx: TLS directory", path=tls_dir, mode="0700")
        for key_type in KEY_TYPES:
            files.directory(name=f"nginx: TLS {key_type}", path=cert_files(tls_dir, key_type)["dir"], mode="0700")

    def configure(self) -> None:
        self.put(render_main(main_context()), NGINX_CONF, key="config")
        self.put(render_site(self.site_context()), SITE_AVAILABLE, key="config")
        self.record("config", files.link(name="nginx: enable site", path=SITE_ENABLED, target=SITE_AVAILABLE))
        # Debian's default site also claims default_server on port 80.
        self.record(
            "config",
            files.link(name="nginx: disable Debian default site", path=DEBIAN_DEFAULT_SITE, present=False),
        )
        self.bootstrap_certificates()

    def bootstrap_certificates(self) -> None:
        """Self-signed certificates where none exist yet: nginx refuses to start without its
        certificate files, and must run before the first issuance to serve the ACME challenge.
        Guarded by a fact, so a host with certificates (bootstrap or issued) gets no operation."""
        tls_dir = str(self.data("nginx_tls_dir"))
        domains = tls_domains(self.host)
        for key_type in KEY_TYPES:
            paths = cert_files(tls_dir, key_type)
            present = all(self.host.get_fact(File, path=paths[k]) for k in ("fullchain", "privkey", "chain"))
            if present:
                continue
            self.record(
                "certs",
                server.shell(
                    name=f"nginx: self-signed bootstrap certificate ({key_type})",
                    commands=[bootstrap_command(paths["dir"], key_type, domains)],
                ),
            )

    def activate(self) -> None:
        changed = self.changed("config", "certs")
        # Fails the deploy with nginx's own message; the reload below is then never reached and the
        # running nginx keeps serving its previous configuration.
        server.shell(name="nginx: test configuration (nginx -t)", commands=["nginx -t -q"], _if=changed)
        self.service("nginx", reload_if=changed)


nginx = role_deploy(Nginx)
