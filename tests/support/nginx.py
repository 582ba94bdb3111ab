"""A real nginx (Debian package) on loopback, running the role's templates with paths in a temp prefix.

The role's own render functions produce the configuration; only host paths, listen addresses and
the upstream change (``test_site_context``). Tests compare the directive skeleton with the production
rendering, so what runs here is the template the hosts get.

nginx runs in the foreground (``daemon off``) as a child of the test: its master pid is the Popen
pid, and ``stop`` signals exactly that process. The directory is created world-traversable because
workers run as www-data when the test runs as root, and must read the ACME webroot.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roles.nginx import CIPHERS, KEY_TYPES, cert_files, render_main, render_site
from tests.support.ports import LOOPBACK, free_port, is_listening

NGINX = "/usr/sbin/nginx"


def nginx_binary() -> str:
    found = shutil.which("nginx") or (NGINX if Path(NGINX).is_file() else None)
    if not found:
        raise AssertionError("nginx not installed: run `make deps` (tools/install-deps.sh)")
    return found


def test_site_context(
    *,
    root: Path,
    http_port: int,
    https_port: int,
    ingest_address: str,
    server_names: list[str],
    api_rate: int = 10,
    **overrides: Any,
) -> dict[str, Any]:
    """The site template's context with the group-data defaults, remapped into ``root``."""
    tls_dir = str(root / "tls")
    certs = [cert_files(tls_dir, k) for k in KEY_TYPES]
    ctx: dict[str, Any] = {
        "listen_http": [f"{LOOPBACK}:{http_port}"],
        "listen_https": [f"{LOOPBACK}:{https_port}"],
        "server_names": server_names,
        "webroot": str(root / "acme"),
        "certificates": certs,
        "ocsp_stapling": True,
        "trusted_chain": certs[0]["chain"],
        # No network in tests: no resolver (nginx only warns that stapling is ignored).
        "resolvers": [],
        "hsts_max_age": 63072000,
        "api_rate": api_rate,
        "api_burst": api_rate - 1,
        "ingest_address": ingest_address,
        "dashboard_path": "",
        "dashboard_allow": [],
        "dashboard_address": "127.0.0.1:18083",
    }
    ctx.update(overrides)
    return ctx


def test_main_context(root: Path) -> dict[str, Any]:
    return {
        # Workers drop to www-data only when the master runs as root (else nginx warns).
        "user": "www-data" if os.geteuid() == 0 else None,
        "pid_file": str(root / "nginx.pid"),
        "error_log": str(root / "logs/error.log"),
        "access_log": str(root / "logs/access.log"),
        "mime_types": "/etc/nginx/mime.types",
        "module_includes": [],
        "http_includes": [str(root / "sites/*.conf")],
        "ciphers": CIPHERS,
    }


def directives(conf: str) -> list[str]:
    """The first word of every non-comment line: the configuration's skeleton."""
    out = []
    for line in conf.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s.split()[0])
    return out


@dataclass
class NginxServer:
    root: Path
    server_names: list[str]
    ingest_address: str
    http_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    @classmethod
    def create(cls, ingest_address: str, server_names: list[str] | None = None) -> NginxServer:
        root = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        root.chmod(0o755)
        for sub in ("logs", "sites", "acme", "tls"):
            (root / sub).mkdir(mode=0o755)
        (root / "acme").chmod(0o755)
        return cls(root=root, server_names=server_names or ["localhost.test"], ingest_address=ingest_address)

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def webroot(self) -> Path:
        return self.root / "acme"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    def site_context(self, **overrides: Any) -> dict[str, Any]:
        return test_site_context(
            root=self.root,
            http_port=self.http_port,
            https_port=self.https_port,
            ingest_address=self.ingest_address,
            server_names=self.server_names,
            **overrides,
        )

    def write_config(self, **overrides: Any) -> str:
        site = render_site(self.site_context(**overrides))
        (self.root / "sites/telemetry.conf").write_text(site)
        self.conf.write_text(render_main(test_main_context(self.root)))
        return site

    def argv(self, *extra: str) -> list[str]:
        """nginx with this prefix and configuration (what the deploy hook's commands run, too)."""
        error_log = str(self.root / "logs/error.log")
        return [nginx_binary(), "-p", str(self.root), "-e", error_log, "-c", str(self.conf), *extra]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30, check=False)

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            self.argv("-g", "daemon off;"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.communicate(timeout=5)[0]
                raise AssertionError(f"nginx exited {self.proc.returncode}: {out}\n{self.error_log()}")
            if is_listening(self.http_port) and is_listening(self.https_port):
                return
            time.sleep(0.05)
        raise AssertionError(f"nginx did not listen within {timeout}s: {self.error_log()}")

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def error_log(self) -> str:
        path = self.root / "logs/error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop the master started here (by its pid), then remove the prefix."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def served_certificate(port: int, *, server_name: str, ciphers: str | None = None, tls13: bool = False) -> bytes:
    """The DER certificate the server presents (TLS 1.2 with ``ciphers`` unless ``tls13``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    import socket

    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
