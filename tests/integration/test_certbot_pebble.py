"""A real ACME flow (issue 6 acceptance): Pebble + certbot + the real nginx of the nginx role + the hook.

certbot issues the ECDSA and RSA lineages through the webroot nginx serves on its port-80 stand-in
(Pebble really fetches the challenge), the role's explicit first hook run installs them, a forced
renewal runs the hook from certbot's renewal-hooks directory: nginx serves the new certificate
(serial changed) with the same master pid, and a Mosquitto stand-in gets its SIGHUP. A failing
`nginx -t` makes the hook exit non-zero and leaves the old certificate served and on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from roles.certbot import HOOK_SCRIPT, acme_server_url, certonly_command
from roles.nginx import KEY_TYPES, bootstrap_command, cert_files
from tests.support.nginx import NginxServer, served_certificate
from tests.support.pebble import Certbot, PebbleServer

pytestmark = pytest.mark.integration

NAME = "api.telemetry.test"
CIPHERS = {"ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256", "rsa": "ECDHE-RSA-AES128-GCM-SHA256"}
# Records every SIGHUP it receives: stands in for Mosquitto (the hook reads its pid file).
BROKER_STAND_IN = """
import os, signal, sys, time
log = sys.argv[2]
def hup(signum, frame):
    with open(log, "a") as f:
        f.write("HUP\\n")
signal.signal(signal.SIGHUP, hup)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""


@dataclass
class Acme:
    web: NginxServer
    pebble: PebbleServer
    certbot: Certbot
    root: Path
    broker_log: Path
    broker_tls: Path
    hook: Path
    hook_log: Path

    def lineage(self, key_type: str) -> str:
        return f"{NAME}-{key_type}"

    def served(self, key_type: str) -> x509.Certificate:
        der = served_certificate(self.web.https_port, server_name=NAME, ciphers=CIPHERS[key_type])
        return x509.load_der_x509_certificate(der)

    def wait_served(self, key_type: str, timeout: float = 10.0) -> x509.Certificate:
        """What nginx serves once it serves the lineage's certificate (bounded): a reload replaces
        the workers gracefully, so connections right after it may still meet an old worker."""
        deadline = time.monotonic() + timeout
        served = self.served(key_type)
        while served != self.lineage_cert(key_type) and time.monotonic() < deadline:
            time.sleep(0.1)
            served = self.served(key_type)
        return served

    def lineage_cert(self, key_type: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.certbot.live(self.lineage(key_type)) / "cert.pem").read_bytes())

    def run_hook(self, key_type: str) -> subprocess.CompletedProcess[str]:
        env = {**self.certbot.env(), "RENEWED_LINEAGE": str(self.certbot.live(self.lineage(key_type)))}
        return subprocess.run([str(self.hook)], env=env, capture_output=True, text=True, timeout=60, check=False)

    def hups(self) -> int:
        return self.broker_log.read_text().count("HUP") if self.broker_log.exists() else 0


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} not written within {timeout}s")


def _wait_hups(acme: Acme, count: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and acme.hups() < count:
        time.sleep(0.05)
    return acme.hups()


@pytest.fixture(scope="module")
def acme(request: pytest.FixtureRequest) -> Iterator[Acme]:
    root = Path(tempfile.mkdtemp(prefix="acme-test-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    web = NginxServer.create("127.0.0.1:9", [NAME])
    request.addfinalizer(web.stop)
    pebble = PebbleServer(root / "pebble", http_port=web.http_port)
    request.addfinalizer(pebble.stop)
    broker_pid_file, broker_log = root / "broker.pid", root / "broker.log"
    broker = subprocess.Popen([sys.executable, "-c", BROKER_STAND_IN, str(broker_pid_file), str(broker_log)])
    request.addfinalizer(lambda: (broker.kill(), broker.wait(timeout=10)))

    # nginx starts with the role's self-signed bootstrap certificates, as on a fresh host
    for key_type in KEY_TYPES:
        paths = cert_files(str(web.tls_dir), key_type)
        subprocess.run(  # noqa: S602 -- the role's own shell command
            bootstrap_command(paths["dir"], key_type, [NAME]),
            shell=True,
            check=True,
            capture_output=True,
            timeout=60,
        )
    web.write_config()
    web.start()
    pebble.start()
    _wait_for(broker_pid_file)

    broker_tls = root / "broker-tls"
    hook_log = root / "hook.log"
    hook_config = root / "certbot-hook.json"
    hook_config.write_text(
        json.dumps(
            {
                "lineages": {f"{NAME}-{k}": k for k in KEY_TYPES},
                "nginx_tls_dir": str(web.tls_dir),
                "nginx_test": web.argv("-t", "-q"),
                "nginx_reload": web.argv("-s", "reload"),
                "broker": {
                    "kind": "mosquitto",
                    "key_type": "rsa",
                    "tls_dir": str(broker_tls),
                    "owner": os.geteuid(),
                    "group": os.getegid(),
                    "cert_mode": "0644",
                    "key_mode": "0640",
                    "pid_file": str(broker_pid_file),
                },
                "log_file": str(hook_log),
            }
        )
    )
    certbot = Certbot(root / "certbot", pebble, hook_config)
    # The role installs the hook where certbot runs it after every renewal.
    hook = certbot.config_dir / "renewal-hooks/deploy/50-telemetry"
    hook.parent.mkdir(parents=True)
    shutil.copy(HOOK_SCRIPT, hook)
    hook.chmod(0o755)
    acme = Acme(web, pebble, certbot, root, broker_log, broker_tls, hook, hook_log)

    for key_type in KEY_TYPES:
        argv = certonly_command(
            name=acme.lineage(key_type),
            key_type=key_type,
            domains=[NAME],
            webroot=str(web.webroot),
            server_url=acme_server_url(pebble.directory_url),
            email="",
            force=False,
        )
        assert argv[0] == "certbot"
        issued = certbot.run(*argv[1:])
        assert issued.returncode == 0, issued.stderr + pebble.logs()[-3000:]
        # certbot runs no deploy hook on first issuance: the role runs it explicitly
        hooked = acme.run_hook(key_type)
        assert hooked.returncode == 0, hooked.stderr
    yield acme


def test_both_lineages_issued_through_the_webroot_and_served(acme: Acme) -> None:
    for key_type in KEY_TYPES:
        served = acme.wait_served(key_type)
        assert served == acme.lineage_cert(key_type), key_type
        assert "Pebble" in served.issuer.rfc4514_string()
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert "Attempting to validate w/ HTTP" in acme.pebble.logs()
    # the broker got the RSA lineage, with a key only its owner and group read
    assert (acme.broker_tls / "fullchain.pem").read_bytes() == (
        acme.certbot.live(acme.lineage("rsa")) / "fullchain.pem"
    ).read_bytes()
    assert (acme.broker_tls / "privkey.pem").stat().st_mode & 0o777 == 0o640
    assert acme.hups() >= 1


def test_forced_renewal_runs_the_hook_and_nginx_serves_the_new_certificate(acme: Acme) -> None:
    master = acme.web.master_pid
    before = {k: acme.wait_served(k).serial_number for k in KEY_TYPES}
    hups = acme.hups()
    renewed = acme.certbot.run("renew", "--force-renewal", "--no-random-sleep-on-renew")
    assert renewed.returncode == 0, renewed.stderr
    assert "certbot-deploy-hook" in acme.hook_log.read_text()
    after = {k: acme.wait_served(k).serial_number for k in KEY_TYPES}
    for key_type in KEY_TYPES:
        assert after[key_type] != before[key_type], key_type
        assert after[key_type] == acme.lineage_cert(key_type).serial_number
    assert acme.web.master_pid == master and acme.web.proc is not None and acme.web.proc.poll() is None
    # only the RSA lineage concerns the broker: exactly one more SIGHUP
    assert _wait_hups(acme, hups + 1) == hups + 1
    assert (acme.broker_tls / "fullchain.pem").read_bytes() == (
        acme.certbot.live(acme.lineage("rsa")) / "fullchain.pem"
    ).read_bytes()


def test_failing_nginx_test_keeps_the_old_certificate_and_fails_the_hook(acme: Acme) -> None:
    key_type = "rsa"
    served_before = acme.wait_served(key_type)
    nginx_copy = Path(cert_files(str(acme.web.tls_dir), key_type)["fullchain"])
    on_disk_before = nginx_copy.read_bytes()
    broker_before = (acme.broker_tls / "fullchain.pem").read_bytes()
    hups = acme.hups()
    renewed = acme.certbot.run(
        "renew",
        "--force-renewal",
        "--no-random-sleep-on-renew",
        "--no-directory-hooks",
        "--cert-name",
        acme.lineage(key_type),
    )
    assert renewed.returncode == 0, renewed.stderr
    assert acme.lineage_cert(key_type).serial_number != served_before.serial_number
    site = acme.web.root / "sites/telemetry.conf"
    good = site.read_text()
    site.write_text(good + "\nthis_is_not_a_directive on;\n")
    try:
        hooked = acme.run_hook(key_type)
    finally:
        site.write_text(good)
    assert hooked.returncode != 0
    assert "nginx -t failed" in hooked.stderr and "this_is_not_a_directive" in hooked.stderr
    time.sleep(0.5)  # a (wrong) reload would have replaced the workers by now
    assert acme.served(key_type).serial_number == served_before.serial_number
    assert nginx_copy.read_bytes() == on_disk_before  # previous files restored
    assert (acme.broker_tls / "fullchain.pem").read_bytes() == broker_before
    assert acme.hups() == hups
    # with the configuration fixed, the same hook run installs the renewed certificate
    assert acme.run_hook(key_type).returncode == 0
    assert acme.wait_served(key_type) == acme.lineage_cert(key_type)
