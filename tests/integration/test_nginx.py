"""The nginx role's configuration in a real nginx on loopback (issue 6 acceptance).

One nginx for the module: the role's templates with paths in a temp prefix, free ports, two
certificates (ECDSA and RSA) from the test CA, and a small HTTP server standing in for ingest.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from roles.nginx import cert_files
from tests.support.nginx import NginxServer, served_certificate
from tests.support.pki import CertificateAuthority
from tests.support.ports import LOOPBACK

pytestmark = pytest.mark.integration

NAME = "api.telemetry.test"
ECDSA_ONLY = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
RSA_ONLY = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class IngestStandIn(BaseHTTPRequestHandler):
    """Answers every GET with what it received, so tests see what nginx forwarded."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "proto": self.headers.get("X-Forwarded-Proto")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def ingest() -> Iterator[str]:
    httpd = ThreadingHTTPServer((LOOPBACK, 0), IngestStandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{LOOPBACK}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def install_test_certificates(server: NginxServer, ca: CertificateAuthority, names: list[str]) -> None:
    for key_type, kind in (("ecdsa", "ec"), ("rsa", "rsa")):
        paths = cert_files(str(server.tls_dir), key_type)
        d = Path(paths["dir"])
        pair = ca.issue_server(d, name="leaf", hostnames=names, ips=(), key_type=kind)  # type: ignore[arg-type]
        Path(paths["fullchain"]).write_bytes(pair.cert.read_bytes())
        Path(paths["privkey"]).write_bytes(pair.key.read_bytes())
        Path(paths["chain"]).write_bytes(ca.cert_path.read_bytes())


@pytest.fixture(scope="module")
def web(ingest: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> NginxServer:
    server = NginxServer.create(ingest, [NAME])
    request.addfinalizer(server.stop)
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("nginx-ca"))
    install_test_certificates(server, ca, [NAME])
    server.write_config()
    proc = server.test_config()
    assert proc.returncode == 0, proc.stderr
    server.start()
    return server


def tls_context(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def https(web: NginxServer) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(LOOPBACK, web.https_port, timeout=5, context=tls_context())


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers={"Host": NAME})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_http_redirects_to_https(web: NginxServer) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, web.http_port, timeout=5)
    status, headers, _ = get(conn, "/v1/devices?x=1")
    assert status == 301
    assert headers["location"] == f"https://{NAME}/v1/devices?x=1"


def test_acme_webroot_is_served_over_http(web: NginxServer) -> None:
    challenge = web.webroot / ".well-known/acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    challenge.chmod(0o755)
    (challenge.parent).chmod(0o755)
    token = challenge / "tok3n_-AbC"
    token.write_text("tok3n_-AbC.thumbprint")
    token.chmod(0o644)
    conn = http.client.HTTPConnection(LOOPBACK, web.http_port, timeout=5)
    status, _, body = get(conn, "/.well-known/acme-challenge/tok3n_-AbC")
    assert (status, body) == (200, b"tok3n_-AbC.thumbprint")
    # a missing token is a 404, not a redirect to HTTPS
    status, _, _ = get(conn, "/.well-known/acme-challenge/missing")
    assert status == 404


def _key_of(der: bytes) -> object:
    return x509.load_der_x509_certificate(der).public_key()


def test_ecdsa_and_rsa_certificates_by_client_suites(web: NginxServer) -> None:
    ecdsa_der = served_certificate(web.https_port, server_name=NAME, ciphers=ECDSA_ONLY)
    rsa_der = served_certificate(web.https_port, server_name=NAME, ciphers=RSA_ONLY)
    assert isinstance(_key_of(ecdsa_der), ec.EllipticCurvePublicKey)
    assert isinstance(_key_of(rsa_der), rsa.RSAPublicKey)
    for key_type, der in (("ecdsa", ecdsa_der), ("rsa", rsa_der)):
        on_disk = x509.load_pem_x509_certificate(Path(cert_files(str(web.tls_dir), key_type)["fullchain"]).read_bytes())
        assert on_disk.public_bytes(Encoding.DER) == der


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_12_and_13_succeed(web: NginxServer, version: ssl.TLSVersion) -> None:
    with (
        socket.create_connection((LOOPBACK, web.https_port), timeout=5) as raw,
        tls_context(version).wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_is_refused_by_the_server(web: NginxServer, version: ssl.TLSVersion) -> None:
    ctx = tls_context(version)
    # Let this client offer the old protocol at all (OpenSSL 3's default security level forbids it),
    # so the refusal we observe is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection((LOOPBACK, web.https_port), timeout=5) as raw,
        pytest.raises(ssl.SSLError) as err,
    ):
        ctx.wrap_socket(raw, server_hostname=NAME)
    assert "ALERT_PROTOCOL_VERSION" in str(err.value) or "UNSUPPORTED_PROTOCOL" in str(err.value), err.value
    assert "NO_PROTOCOLS_AVAILABLE" not in str(err.value)


def test_api_is_proxied_with_security_headers(web: NginxServer) -> None:
    conn = https(web)
    status, headers, body = get(conn, "/v1/devices")
    assert status == 200
    assert json.loads(body) == {"path": "/v1/devices", "proto": "https"}
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, headers)
    assert "content-security-policy" in headers
    assert headers.get("server") == "nginx"  # no version
    status, _, body = get(conn, "/healthz")
    assert status == 200 and json.loads(body)["path"] == "/healthz"
    # anything else, the EMQX dashboard included, is not served -- and errors carry the headers too
    status, headers, _ = get(conn, "/emqx/")
    assert status == 404
    assert headers.get("strict-transport-security") == SECURITY_HEADERS["strict-transport-security"]


def test_eleventh_request_in_a_second_is_refused(web: NginxServer) -> None:
    statuses: list[int] = []
    for _attempt in range(3):
        time.sleep(1.2)  # let this client's bucket (shared with the other tests) drain
        conn = https(web)
        get(conn, "/healthz")  # handshake and first request out of the timed part
        time.sleep(1.2)
        start = time.monotonic()
        statuses = [get(conn, "/v1/ping")[0] for _ in range(11)]
        elapsed = time.monotonic() - start
        conn.close()
        # The bucket leaks 10 requests per second: only a burst well inside 100 ms is conclusive.
        if elapsed < 0.08:
            break
    assert statuses[:10] == [200] * 10, statuses
    assert statuses[10] in (429, 503), statuses
