"""Secrets from ansible-vault files, decrypted in-process, never stored in host data.

Host data carries only ``vault_dir`` (a path). A role asks :func:`secrets_for` for one value when it
renders a file; the decrypted mapping stays in this module's cache and its ``repr`` shows key names
only, so ``pyinfra ... debug-inventory``, logs and tracebacks never print a secret.

Files read for a host, later ones overriding earlier ones: ``<vault_dir>/all.vault.yml`` then
``<vault_dir>/<group>.vault.yml`` for each inventory group of the host, in the inventory's order.
Each file is a YAML mapping encrypted whole with ``ansible-vault``; the password comes from the file
named by ``$TELEMETRY_VAULT_PASSWORD_FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from ansible.errors import AnsibleError  # type: ignore[import-untyped]
from ansible.parsing.vault import VaultLib, VaultSecret, is_encrypted  # type: ignore[import-untyped]

PASSWORD_ENV = "TELEMETRY_VAULT_PASSWORD_FILE"  # noqa: S105 -- a variable name, not a password


class VaultError(Exception):
    """One line an operator can act on: which file, which variable, what to do."""


class Secrets(Mapping[str, str]):
    """Read-only secret values; printing it shows the key names only."""

    def __init__(self, values: dict[str, str], sources: list[str]) -> None:
        self._values = values
        self.sources = sources

    def __getitem__(self, key: str) -> str:
        try:
            return self._values[key]
        except KeyError:
            raise VaultError(
                f"secret {key!r} is in none of {', '.join(self.sources) or 'the vault files (none found)'}; "
                f"add it with: ansible-vault edit <file> (password file from ${PASSWORD_ENV})"
            ) from None

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<Secrets keys={sorted(self._values)} from={self.sources}>"

    __str__ = __repr__


def _password() -> bytes:
    name = os.environ.get(PASSWORD_ENV)
    if not name:
        raise VaultError(f"${PASSWORD_ENV} is not set: point it at the file holding the vault password")
    path = Path(name)
    try:
        password = path.read_bytes().strip()
    except OSError as exc:
        raise VaultError(f"cannot read vault password file {path} (from ${PASSWORD_ENV}): {exc.strerror}") from None
    if not password:
        raise VaultError(f"vault password file {path} (from ${PASSWORD_ENV}) is empty")
    return password


def decrypt_file(path: Path, password: bytes | None = None) -> dict[str, str]:
    """Decrypt one vault file into a flat ``{name: value}`` mapping of strings."""
    raw = path.read_bytes()
    if not is_encrypted(raw):
        # A clear-text file named *.vault.yml is a secret about to be committed: refuse it.
        raise VaultError(f"{path} is not encrypted: run ansible-vault encrypt {path}")
    vault = VaultLib([("default", VaultSecret(password if password is not None else _password()))])
    try:
        plain = vault.decrypt(raw)
    except AnsibleError:
        raise VaultError(f"cannot decrypt {path}: wrong vault password in the file named by ${PASSWORD_ENV}") from None
    data = yaml.safe_load(plain) or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise VaultError(f"{path} must hold a YAML mapping of names to values")
    return {key: str(value) for key, value in data.items()}


def encrypt_mapping(values: Mapping[str, str], password: bytes) -> bytes:
    """The inverse of :func:`decrypt_file`, for tests and for generating a new vault."""
    vault = VaultLib([("default", VaultSecret(password))])
    plain = yaml.safe_dump(dict(values), default_flow_style=False, sort_keys=True)
    return bytes(vault.encrypt(plain.encode(), VaultSecret(password)))


_CACHE: dict[tuple[str, ...], Secrets] = {}


def load(vault_dir: Path, groups: Iterable[str]) -> Secrets:
    files = [vault_dir / "all.vault.yml", *(vault_dir / f"{g}.vault.yml" for g in groups if g != "all")]
    existing = [f for f in files if f.is_file()]
    key = tuple(str(f.resolve()) for f in existing)
    if key not in _CACHE:
        password = _password() if existing else None
        merged: dict[str, str] = {}
        for f in existing:
            merged.update(decrypt_file(f, password))
        _CACHE[key] = Secrets(merged, [str(f) for f in existing])
    return _CACHE[key]


def secrets_for(host: Any) -> Secrets:
    """The secrets for a pyinfra host, from its groups' vault files under ``host.data.vault_dir``."""
    vault_dir = Path(host.data.get("vault_dir") or "group_data")
    if not vault_dir.is_absolute():
        # Relative to the repository, not the working directory: tests and operators agree.
        vault_dir = Path(__file__).resolve().parent.parent / vault_dir
    return load(vault_dir, host.groups)


def clear_cache() -> None:
    _CACHE.clear()
