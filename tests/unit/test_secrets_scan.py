"""No secret sits in git in clear: every file outside the vault files is scanned."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from roles import secrets as vault
from tests.support.deploy_fake import REPO, TEST_VAULT_PASSWORD, vault_env

# Built from pieces so this file does not match its own patterns.
_BEGIN = "-----" + "BEGIN"
PATTERNS = {
    "private key": re.compile(_BEGIN + r" (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "password/secret/token literal": re.compile(
        # a quoted value of 16+ characters with a digit and a lowercase letter: generated secrets
        # look like that; constant names such as an environment variable's do not
        r"""(?i:\w*(?:password|passwd|secret|token|api_key|cookie)\w*)\s*[:=]\s*["']"""
        r"""(?=[^"']*\d)(?=[^"']*[a-z])[A-Za-z0-9+/_\-]{16,}["']"""
    ),
    "URL with credentials": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s:@]+)@"),
}
# Obvious placeholders in tests that check a DSN with a password is refused.
PLACEHOLDERS = {"hunter2", "secret", "password", "pass", "pw", "x", "xxx"}


def _repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for name in filter(None, out.split("\0")):
        if name.endswith(".vault.yml") or name.startswith("tests/fixtures/vault/"):
            continue
        path = REPO / name
        if path.is_file() and path.stat().st_size < 2_000_000:
            files.append(path)
    return files


def test_no_secret_patterns_in_the_repository() -> None:
    hits = []
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for what, pattern in PATTERNS.items():
            for m in pattern.finditer(text):
                if m.groups() and m.group(1) in PLACEHOLDERS:
                    continue
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not hits, "\n".join(hits)


def test_test_vault_values_appear_nowhere_else() -> None:
    vault.clear_cache()
    with vault_env():
        values = list(vault.load(REPO / "tests/fixtures/vault", []).values())
    values.append(TEST_VAULT_PASSWORD.read_text().strip())
    leaks = []
    for path in _repo_files():
        data = path.read_bytes()
        leaks += [str(path.relative_to(REPO)) for v in values if v.encode() in data]
    assert not leaks, leaks


def test_the_scanner_catches_a_planted_key() -> None:
    planted = _BEGIN + " OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
    assert PATTERNS["private key"].search(planted)
    literal = "db_pass" + 'word = "Zx81kQmP0aLr7TtY"'
    assert PATTERNS["password/secret/token literal"].search(literal)
    assert PATTERNS["URL with credentials"].search("postgresql://u:" + "Zx81kQmP0a@db/x")
