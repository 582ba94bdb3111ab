"""A throwaway certificate authority for TLS tests.

Everything is generated in-process with `cryptography` (no openssl CLI, no network) and written as
PEM files, because every consumer we test (Mosquitto, nginx, paho, psycopg) takes file paths. ECDSA
P-256 is the default: key generation is instant, whereas RSA-2048 costs tens of milliseconds per key.

This module also holds the small file-ownership helpers the service wrappers share: services started
as root run as their own system user, and that user must be able to reach the files we write.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Backdated so that a client whose clock is slightly behind still accepts fresh certificates.
_BACKDATE = dt.timedelta(hours=1)
_DEFAULT_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PkiFiles:
    """Paths of a CA plus the leaf certificates issued by `create_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def server(self) -> CertPair:
        return CertPair(self.server_cert, self.server_key)

    @property
    def client(self) -> CertPair:
        if self.client_cert is None or self.client_key is None:
            raise ValueError("this PKI was created without a client certificate")
        return CertPair(self.client_cert, self.client_key)


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key with mode 0600 from the first byte on."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # os.open with the mode, then fchmod: the file is never readable by others, not even briefly,
    # and an existing file with looser permissions is tightened too.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "telemetry-platform tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 RSA kx) needs keyEncipherment; ECDSA keys only sign.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """A self-signed CA that can issue server and client certificates into any directory."""

    def __init__(self, key: PrivateKey, cert: x509.Certificate, cert_path: Path, key_path: Path) -> None:
        self.key = key
        self.cert = cert
        self.cert_path = cert_path
        self.key_path = key_path

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        common_name: str = "telemetry-platform test CA",
        key_type: KeyType = "ec",
        name: str = "ca",
        validity: dt.timedelta = _DEFAULT_VALIDITY,
    ) -> CertificateAuthority:
        """Generate a CA and write `<name>.crt` / `<name>.key` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        key = generate_key(key_type)
        now = dt.datetime.now(dt.UTC)
        subject = _name(common_name)
        public_key = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        write_cert(cert_path, cert)
        write_private_key(key_path, key)
        return cls(key, cert, cert_path, key_path)

    def _issue(
        self,
        directory: Path,
        name: str,
        common_name: str,
        key_type: KeyType,
        usage: x509.ObjectIdentifier,
        san: Sequence[x509.GeneralName],
        validity: dt.timedelta,
    ) -> CertPair:
        directory.mkdir(parents=True, exist_ok=True)
        key = generate_key(key_type)
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            # Python 3.13's default context (VERIFY_X509_STRICT) rejects leaves without an AKI.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
        write_cert(pair.cert, cert)
        write_private_key(pair.key, key)
        return pair

    def issue_server(
        self,
        directory: Path,
        *,
        name: str = "server",
        hostnames: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1",),
        key_type: KeyType = "ec",
        validity: dt.timedelta = _DEFAULT_VALIDITY,
    ) -> CertPair:
        """Issue a serverAuth certificate whose SANs are `hostnames` and `ips`."""
        hostnames = list(hostnames)
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        common_name = hostnames[0] if hostnames else "server"
        return self._issue(directory, name, common_name, key_type, ExtendedKeyUsageOID.SERVER_AUTH, san, validity)

    def issue_client(
        self,
        directory: Path,
        common_name: str,
        *,
        name: str | None = None,
        key_type: KeyType = "ec",
        validity: dt.timedelta = _DEFAULT_VALIDITY,
    ) -> CertPair:
        """Issue a clientAuth certificate with CN `common_name` (e.g. a device id for mTLS)."""
        return self._issue(
            directory,
            name or f"client-{common_name}",
            common_name,
            key_type,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            (),
            validity,
        )


def create_pki(
    directory: Path,
    *,
    key_type: KeyType = "ec",
    client_common_name: str | None = "client",
    server_hostnames: Iterable[str] = ("localhost",),
    server_ips: Iterable[str] = ("127.0.0.1",),
) -> PkiFiles:
    """Create a CA, a server certificate and (unless `client_common_name` is None) a client one."""
    ca = CertificateAuthority.create(directory, key_type=key_type)
    server = ca.issue_server(directory, hostnames=server_hostnames, ips=server_ips, key_type=key_type)
    client = (
        ca.issue_client(directory, client_common_name, name="client", key_type=key_type)
        if client_common_name is not None
        else None
    )
    return PkiFiles(
        directory=directory,
        ca_cert=ca.cert_path,
        ca_key=ca.key_path,
        server_cert=server.cert,
        server_key=server.key,
        client_cert=client.cert if client else None,
        client_key=client.key if client else None,
    )


def chown_tree(path: Path, user: str | None) -> None:
    """Give the tree `path` to system user `user` (when we are root; otherwise a no-op).

    Services started as root run as their own user (PostgreSQL must not run as root; Mosquitto
    drops to `mosquitto`) and must own their directory. Not running as root, the service runs as
    us and already owns everything.
    """
    if user is None or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    if not path.is_dir() or path.is_symlink():
        return
    for root, dirs, files in os.walk(path):
        for child in (*dirs, *files):
            os.chown(os.path.join(root, child), entry.pw_uid, entry.pw_gid, follow_symlinks=False)
