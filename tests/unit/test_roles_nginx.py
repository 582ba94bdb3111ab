"""nginx role: operations in the right order, files that the real `nginx -t` accepts, data flowing through."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from roles._base import RoleError
from roles.nginx import KEY_TYPES, NGINX_CONF, SITE_AVAILABLE, bootstrap_command, cert_files, nginx
from tests.support.deploy_fake import LIVE_HOST, NO_SYSTEMD_HOST, run_deploys
from tests.support.nginx import NginxServer, directives


def _stat_line(path: str) -> list[str]:
    return [f"user=root group=root mode=-rw------- atime=0 mtime=0 ctime=0 size=40 '{path}'"]


def _certs_present(base: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key_type in KEY_TYPES:
        for name in ("fullchain", "privkey", "chain"):
            path = cert_files("/etc/nginx/tls", key_type)[name]
            out[path] = _stat_line(path)
    return out


def test_prod_files_and_operation_order() -> None:
    (r,) = run_deploys("prod", [nginx]).values()
    site = r.files[SITE_AVAILABLE]
    main = r.files[NGINX_CONF]
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in main and "TLSv1.1" not in main
    assert "ssl_session_tickets off;" in main
    for key_type in KEY_TYPES:
        assert f"ssl_certificate /etc/nginx/tls/{key_type}/fullchain.pem;" in site
    assert "server_name telemetry.example.net;" in site
    assert "rate=10r/s" in site and "limit_req zone=api burst=9 nodelay;" in site
    assert "server 127.0.0.1:8081;" in site and "location /v1/" in site and "location = /healthz" in site
    assert "root /var/www/acme;" in site and "return 301 https://$host$request_uri;" in site
    assert 'Strict-Transport-Security "max-age=63072000; includeSubDomains" always' in site
    # dashboard not public by default
    assert "18083" not in site
    names = r.op_names()
    boot = [n for n in names if "self-signed bootstrap" in n]
    assert len(boot) == 2
    # bootstrap before the test, the test before any reload
    test_at = next(i for i, n in enumerate(names) if "nginx -t" in n)
    reload_at = next(i for i, n in enumerate(names) if "reload nginx" in n)
    assert max(names.index(b) for b in boot) < test_at < reload_at
    assert "nginx -t -q" in r.commands


def test_existing_certificates_are_left_alone() -> None:
    (r,) = run_deploys("prod", [nginx], responses=_certs_present(LIVE_HOST)).values()
    assert not [n for n in r.op_names() if "bootstrap" in n]
    assert not [c for c in r.commands if "openssl req" in c]


def test_without_systemd_config_is_still_tested_but_nothing_starts() -> None:
    (r,) = run_deploys("prod", [nginx], responses=NO_SYSTEMD_HOST).values()
    assert "nginx -t -q" in r.commands
    assert not [c for c in r.commands if c.startswith("systemctl")]


def test_settings_flow_into_the_site() -> None:
    (r,) = run_deploys(
        "prod",
        [nginx],
        override={
            "tls_domains": ["api.example.org", "telemetry.example.org"],
            "ingest_http_address": "127.0.0.1:9090",
            "nginx_api_rate": 5,
            "nginx_ocsp_stapling": False,
        },
    ).values()
    site = r.files[SITE_AVAILABLE]
    assert "server_name api.example.org telemetry.example.org;" in site
    assert "server 127.0.0.1:9090;" in site
    assert "rate=5r/s" in site and "burst=4 nodelay" in site
    assert "ssl_stapling" not in site
    boot = [c for c in r.commands if "openssl req" in c]
    assert boot and all("subjectAltName=DNS:api.example.org,DNS:telemetry.example.org" in c for c in boot)


def test_dashboard_path_only_with_an_allowlist() -> None:
    with pytest.raises(RoleError, match="allow"):
        run_deploys("prod", [nginx], override={"nginx_emqx_dashboard_path": "/emqx/"})
    with pytest.raises(RoleError, match="allow"):
        run_deploys(
            "prod",
            [nginx],
            override={"nginx_emqx_dashboard_path": "/emqx/", "nginx_emqx_dashboard_allow": ["0.0.0.0/0"]},
        )
    (r,) = run_deploys(
        "prod",
        [nginx],
        override={"nginx_emqx_dashboard_path": "/emqx/", "nginx_emqx_dashboard_allow": ["198.51.100.0/24"]},
    ).values()
    site = r.files[SITE_AVAILABLE]
    block = site[site.index("location /emqx/") :]
    assert block.index("allow 198.51.100.0/24;") < block.index("deny all;") < block.index("proxy_pass")
    assert "proxy_pass http://127.0.0.1:18083/;" in block


def _skeleton(conf: str, drop: set[str] | None = None) -> list[str]:
    """Directives in order, repeats collapsed (the test has fewer listen addresses and includes)."""
    out: list[str] = []
    for d in directives(conf):
        if d in (drop or set()) or (out and out[-1] == d):
            continue
        out.append(d)
    return out


@pytest.mark.parametrize("bad", [["localhost"], ["bad name.example.org"], ["x.example.org; rm -rf /"]])
def test_domain_names_are_checked(bad: list[str]) -> None:
    with pytest.raises(RoleError, match="fully qualified"):
        run_deploys("prod", [nginx], override={"tls_domains": bad})


def test_rendered_config_passes_real_nginx_t(tmp_path: Path) -> None:
    (r,) = run_deploys("prod", [nginx]).values()
    server = NginxServer.create("127.0.0.1:9")
    try:
        for key_type in KEY_TYPES:
            paths = cert_files(str(server.tls_dir), key_type)
            subprocess.run(  # noqa: S602 -- the very shell command the role runs on hosts
                bootstrap_command(paths["dir"], key_type, ["telemetry.example.net"]),
                shell=True,
                check=True,
                capture_output=True,
            )
        site = server.write_config()
        # Same template, test paths: the production rendering has the same directives, except that
        # the test listens on one loopback address (no IPv6) and has no resolver (no network).
        assert _skeleton(site) == _skeleton(r.files[SITE_AVAILABLE], drop={"resolver", "resolver_timeout"})
        # ... and no Debian dynamic modules to include
        assert (
            _skeleton(server.conf.read_text())
            == _skeleton(r.files[NGINX_CONF])[:4] + _skeleton(r.files[NGINX_CONF])[5:]
        )
        proc = server.test_config()
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if "[warn]" in line or "[emerg]" in line]
        # self-signed certificates have no issuer or OCSP URL to staple: the only acceptable warning
        assert all('"ssl_stapling" ignored' in w for w in warnings), warnings
    finally:
        server.stop()
