"""Pebble (Debian package), the ACME test server, on loopback, plus certbot runs against it.

Debian's package ships no certificates (``dpkg -L pebble``: binaries and man pages only), so Pebble's
HTTPS listener gets a certificate from the test CA, and certbot trusts that CA through
``REQUESTS_CA_BUNDLE``. Names resolve through ``pebble-challtestsrv`` acting as Pebble's DNS server
(every name -> 127.0.0.1), and Pebble validates HTTP-01 on ``httpPort`` = nginx's port 80 stand-in.
``PEBBLE_VA_ALWAYS_VALID=0``: challenges are really fetched from nginx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.pki import CertificateAuthority
from tests.support.ports import LOOPBACK, free_port, is_listening


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} not installed: run `make deps` (tools/install-deps.sh)")
    return found


@dataclass
class PebbleServer:
    root: Path
    http_port: int  # where Pebble fetches HTTP-01 challenges (nginx's port 80)
    acme_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    dns_port: int = field(default_factory=free_port)
    dns_management_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.acme_port}/dir"

    @property
    def ca_bundle(self) -> Path:
        return self.root / "ca.crt"

    def start(self, timeout: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create(self.root, name="ca")
        tls = ca.issue_server(self.root, name="pebble", hostnames=["localhost"], ips=[LOOPBACK])
        config = {
            "pebble": {
                "listenAddress": f"{LOOPBACK}:{self.acme_port}",
                "managementListenAddress": f"{LOOPBACK}:{self.management_port}",
                "certificate": str(tls.cert),
                "privateKey": str(tls.key),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.root / "pebble.json").write_text(json.dumps(config))
        dns = [
            binary("pebble-challtestsrv"),
            "-defaultIPv4", LOOPBACK, "-defaultIPv6", "",
            "-dns01", f"{LOOPBACK}:{self.dns_port}",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-management", f"{LOOPBACK}:{self.dns_management_port}",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PEBBLE_VA_ALWAYS_VALID": "0",
            "PEBBLE_VA_NOSLEEP": "1",
            # Pebble rejects 5% of nonces by default to exercise clients' retries: not what we test.
            "PEBBLE_WFE_NONCEREJECT": "0",
            # Every order gets fresh authorizations, so each issuance really fetches the challenge.
            "PEBBLE_AUTHZREUSE": "0",
        }
        pebble = [
            binary("pebble"),
            "-config",
            str(self.root / "pebble.json"),
            "-dnsserver",
            f"{LOOPBACK}:{self.dns_port}",
        ]
        for argv in (dns, pebble):
            log = open(self.root / f"{Path(argv[0]).name}.log", "wb")  # noqa: SIM115 -- lives with the process
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args!r} exited {proc.returncode}: {self.logs()}")
            if is_listening(self.acme_port) and is_listening(self.dns_management_port):
                return
            time.sleep(0.1)
        raise AssertionError(f"pebble did not listen within {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@dataclass
class Certbot:
    """certbot with its configuration, work and log directories in ``root``, trusting Pebble's CA."""

    root: Path
    pebble: PebbleServer
    hook_config: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def live(self, name: str) -> Path:
        return self.config_dir / "live" / name

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REQUESTS_CA_BUNDLE": str(self.pebble.ca_bundle),
            "TELEMETRY_CERTBOT_HOOK_CONFIG": str(self.hook_config),
        }

    def run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        dirs = ["--config-dir", str(self.config_dir), "--work-dir", str(self.root / "work")]
        dirs += ["--logs-dir", str(self.root / "logs")]
        return subprocess.run(
            [binary("certbot"), *argv, *dirs],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )
