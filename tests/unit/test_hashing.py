"""ingest.hashing against EMQX's own test vectors, the EMQX 5.8 comparison rules and real mosquitto_passwd."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import re
import shutil
import string
import subprocess
from pathlib import Path

import bcrypt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingest.hashing import (
    DEFAULT_ALGORITHM,
    MAC_FUNS,
    SALT_POSITIONS,
    SIMPLE_NAMES,
    HashAlgorithm,
    generate_password,
    generate_salt,
    hash_password,
    mosquitto_hash,
    mosquitto_verify,
    verify_password,
)

WRONG = "wrongpass"  # the wrong password EMQX's suites use

# ---------------------------------------------------------------------------------------------
# EMQX's own vectors, copied as data. Each row: (source, spec, password, salt, stored hash).
#   passwd   = emqx/emqx apps/emqx/test/emqx_passwd_SUITE.erl (t_hash_data, t_hash)
#   hashing  = emqx/emqx apps/emqx_auth/test/emqx_authn/emqx_authn_password_hashing_SUITE.erl
#              (hash_examples/0)
#   pgsql    = emqx/emqx apps/emqx_auth_postgresql/test/emqx_authn_postgresql_SUITE.erl (user_seeds/0)
#   docs     = EMQX docs PostgreSQL authn page, checked in /work/shared/emqx-5.8-contract.md section 10
# hash_data(Algo, Password) in t_hash_data is the same as salt_position = disable.
# ---------------------------------------------------------------------------------------------
EMQX_VECTORS: list[tuple[str, str, str, str, str]] = [
    ("docs", "sha256:prefix", "secret", "salt", "bede90386d450cea8b77b822f8887065e4e5abf132c2f9dccfcc7fbd4cba5e35"),
    ("passwd", "plain:disable", "password", "", "password"),
    ("passwd", "md5:disable", "password", "", "5f4dcc3b5aa765d61d8327deb882cf99"),
    ("passwd", "sha:disable", "password", "", "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"),
    (
        "passwd",
        "sha256:disable",
        "password",
        "",
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
    ),
    (
        "passwd",
        "sha512:disable",
        "password",
        "",
        "b109f3bbbc244eb82441917ed06d618b9008dd09b3befd1b5e07394c706a8bb9"
        "80b1d7785e5976ec049b46df5f1326af5a2ea6d103fd07c95385ffab0cacbc86",
    ),
    ("passwd", "md5:prefix", "password", "salt", "67a1e09bb1f83f5007dc119c14d663aa"),
    ("passwd", "sha:prefix", "password", "salt", "59b3e8d637cf97edbe2384cf59cb7453dfe30789"),
    (
        "passwd",
        "sha256:suffix",
        "password",
        "salt",
        "7a37b85c8918eac19a9089c0fa5a2ab4dce3f90528dcdeec108b23ddf3607b99",
    ),
    (
        "passwd",
        "sha512:suffix",
        "password",
        "salt",
        "fa6a2185b3e0a9a85ef41ffb67ef3c1fb6f74980f8ebf970e4e72e353ed9537d"
        "593083c201dfd6e43e1c8a7aac2bc8dbb119c7dfb7d4b8f131111395bd70e97f",
    ),
    (
        "passwd",
        "pbkdf2:sha:2:32",
        "password",
        "ATHENA.MIT.EDUraeburn",
        "01dbee7f4a9e243e988b62c73cda935da05378b93244ec8f48a99e61ad799d86",
    ),
    ("hashing", "plain:suffix", "plain", "salt", "plainsalt"),
    ("hashing", "md5:disable", "md5", "salt", "1bc29b36f623ba82aaf6724fd3b16718"),
    ("hashing", "sha:prefix", "sha", "salt", "c665d4c0a9e5498806b7d9fd0b417d272853660e"),
    (
        "hashing",
        "sha256:prefix",
        "sha256",
        "salt",
        "ac63a624e7074776d677dd61a003b8c803eb11db004d0ec6ae032a5d7c9c5caf",
    ),
    (
        "hashing",
        "sha512:prefix",
        "sha512",
        "salt",
        "a1509ab67bfacbad020927b5ac9d91e9100a82e33a0ebb01459367ce921c0aa8"
        "157aa5652f94bc84fa3babc08283e44887d61c48bcf8ad7bcb3259ee7d0eafcd",
    ),
    (
        "hashing",
        "pbkdf2:sha:2:32",
        "password",
        "ATHENA.MIT.EDUraeburn",
        "01dbee7f4a9e243e988b62c73cda935da05378b93244ec8f48a99e61ad799d86",
    ),
    # No dk_length: EMQX falls back to the digest size (20 bytes for sha).
    ("hashing", "pbkdf2:sha:2", "password", "ATHENA.MIT.EDUraeburn", "01dbee7f4a9e243e988b62c73cda935da05378b9"),
    ("pgsql", "md5:suffix", "md5", "salt", "9b4d0c43d206d48279e69b9ad7132e22"),
]

# bcrypt rows from the same files. The salt column is what EMQX's fixtures store; EMQX ignores it for
# the postgresql backend, and the second value is the bcrypt setting hashpw reproduces the hash from.
EMQX_BCRYPT_VECTORS: list[tuple[str, str, str, str]] = [
    # (source, password, bcrypt setting, stored hash)
    (
        "passwd",
        "password",
        "$2b$12$wtY3h20mUjjmeaClpqZVve",
        "$2b$12$wtY3h20mUjjmeaClpqZVvehyw7F.V78F3rbK2xDkCzRTMi6pmfUB6",
    ),
    (
        "hashing+pgsql",
        "bcrypt",
        "$2b$12$wtY3h20mUjjmeaClpqZVve",
        "$2b$12$wtY3h20mUjjmeaClpqZVveDWGlHzCGsvuThMlneGHA7wVeFYyns2u",
    ),
]

# Openwall crypt_blowfish test vectors (crypt_blowfish.c, `tests[]` under #ifdef TEST): independent
# of EMQX, and cheap (cost 5). They cover the $2a$ minor and the 72-byte key limit.
OPENWALL_BCRYPT_VECTORS: list[tuple[str, str]] = [
    ("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"),
    ("U*U*", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK"),
    ("U*U*U", "$2a$05$XXXXXXXXXXXXXXXXXXXXXOAcXxm9kjPGEMsLznoKqmqw7tc8WCx4a"),
    ("", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.7uG0VCzI2bS7j6ymqJi9CdcdxiRTWNy"),
    (
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789chars after 72 are ignored",
        "$2a$05$abcdefghijklmnopqrstuu5s2v8.iXieOjg/.AySBTTZIIVFJeBui",
    ),
]

BCRYPT = HashAlgorithm("bcrypt")


def _vector_id(row: tuple[str, ...]) -> str:
    return f"{row[0]}-{row[1]}-{row[2] or 'empty'}"


# --- EMQX vectors --------------------------------------------------------------------------------


@pytest.mark.parametrize("row", EMQX_VECTORS, ids=_vector_id)
def test_hash_password_reproduces_emqx_vector(row: tuple[str, str, str, str, str]) -> None:
    _, spec, password, salt, expected = row
    assert hash_password(password, salt, HashAlgorithm.parse(spec)) == expected


@pytest.mark.parametrize("row", EMQX_VECTORS, ids=_vector_id)
def test_emqx_vector_verifies_and_wrong_password_does_not(row: tuple[str, str, str, str, str]) -> None:
    _, spec, password, salt, stored = row
    algo = HashAlgorithm.parse(spec)
    assert verify_password(password, stored, salt, algo) is True
    assert verify_password(WRONG, stored, salt, algo) is False


def test_docs_example_is_prefix_not_suffix() -> None:
    # The EMQX docs label this example `suffix`; only prefix reproduces it.
    stored = "bede90386d450cea8b77b822f8887065e4e5abf132c2f9dccfcc7fbd4cba5e35"
    assert verify_password("secret", stored, "salt", HashAlgorithm("sha256", "prefix"))
    assert not verify_password("secret", stored, "salt", HashAlgorithm("sha256", "suffix"))


@pytest.mark.parametrize("row", EMQX_BCRYPT_VECTORS, ids=lambda r: r[0])
def test_emqx_bcrypt_vector(row: tuple[str, str, str, str]) -> None:
    _, password, setting, stored = row
    # The library we hash with computes exactly EMQX's value from the same bcrypt setting.
    assert bcrypt.hashpw(password.encode(), setting.encode()).decode() == stored
    assert verify_password(password, stored, setting, BCRYPT) is True
    # The salt column is ignored for bcrypt, whatever it holds.
    assert verify_password(password, stored, "", BCRYPT) is True
    assert verify_password(WRONG, stored, setting, BCRYPT) is False


def test_empty_bcrypt_hash_does_not_verify() -> None:
    # emqx_passwd_SUITE: check_pass({bcrypt, <<>>}, <<>>, WrongPassword) is false.
    assert verify_password(WRONG, "", "", BCRYPT) is False
    assert verify_password("", "", "", BCRYPT) is False


# --- comparison rules ----------------------------------------------------------------------------


def test_uppercase_stored_hex_verifies() -> None:
    # emqx_passwd_SUITE checks string:uppercase(Sha512) and string:uppercase(Pbkdf2) verify.
    sha512 = HashAlgorithm("sha512", "suffix")
    stored = hash_password("password", "salt", sha512)
    assert stored == stored.lower()
    assert verify_password("password", stored.upper(), "salt", sha512)
    assert not verify_password(WRONG, stored.upper(), "salt", sha512)

    pbkdf2 = HashAlgorithm("pbkdf2", mac_fun="sha", iterations=2, dk_length=32)
    stored = "01dbee7f4a9e243e988b62c73cda935da05378b93244ec8f48a99e61ad799d86".upper()
    assert verify_password("password", stored, "ATHENA.MIT.EDUraeburn", pbkdf2)
    assert not verify_password(WRONG, stored, "ATHENA.MIT.EDUraeburn", pbkdf2)


def test_mixed_case_stored_hex_verifies_for_every_simple_digest() -> None:
    for name in ("md5", "sha", "sha256", "sha512"):
        algo = HashAlgorithm.parse(f"{name}:prefix")
        stored = hash_password("pw", "s", algo)
        mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(stored))
        assert mixed != stored
        assert verify_password("pw", mixed, "s", algo), name


def test_plain_comparison_is_case_insensitive_in_emqx_5_8() -> None:
    # EMQX 5.8.5+ lowercases both sides for plain too; 5.10.4/6.0.3 (PR #17643/#17644) made plain
    # case-sensitive again. If this starts failing after an EMQX bump, the bump changed the rule.
    algo = HashAlgorithm("plain", "suffix")
    assert verify_password("PLAIN", "plainsalt", "salt", algo)
    assert verify_password("plain", "PLAINSALT", "salt", algo)
    assert not verify_password("plainx", "plainsalt", "salt", algo)
    disable = HashAlgorithm("plain", "disable")
    assert verify_password("Password", "password", "", disable)
    assert not verify_password("passwort", "password", "", disable)


def test_salt_is_used_as_text_not_hex_decoded() -> None:
    salt = "73616c74"  # hex of b"salt"; EMQX hashes the eight characters, not the four bytes
    got = hash_password("secret", salt, DEFAULT_ALGORITHM)
    assert got == hashlib.sha256(b"73616c74secret").hexdigest()
    assert got != hashlib.sha256(b"saltsecret").hexdigest()


def test_non_ascii_password_and_salt_are_utf8() -> None:
    algo = HashAlgorithm("sha256", "suffix")
    assert hash_password("pässwörd", "sält", algo) == hashlib.sha256("pässwördsält".encode()).hexdigest()
    assert verify_password("pässwörd", hash_password("pässwörd", "sält", algo), "sält", algo)


def test_salt_position_disable_ignores_salt() -> None:
    algo = HashAlgorithm("sha256", "disable")
    assert hash_password("pw", "anything", algo) == hash_password("pw", "", algo)
    assert verify_password("pw", hash_password("pw", "", algo), "other", algo)


def test_hash_of_different_length_never_verifies() -> None:
    algo = HashAlgorithm("sha256", "prefix")
    stored = hash_password("pw", "s", algo)
    assert not verify_password("pw", stored[:-1], "s", algo)
    assert not verify_password("pw", stored + "0", "s", algo)
    assert not verify_password("pw", "", "s", algo)


def test_none_salt_is_rejected_with_a_hint() -> None:
    # A NULL salt crashes EMQX's check, so we refuse it when provisioning rather than store it.
    with pytest.raises(TypeError, match=r"^salt must be str, got NoneType .*never None"):
        hash_password("pw", None, DEFAULT_ALGORITHM)  # type: ignore[arg-type]


# --- pbkdf2 --------------------------------------------------------------------------------------

# RFC 6070 (PBKDF2-HMAC-SHA1) and RFC 7914 section 11 (PBKDF2-HMAC-SHA256): independent of EMQX,
# for mac_funs EMQX's suites do not cover.
RFC_PBKDF2_VECTORS: list[tuple[str, str, str, str]] = [
    ("pbkdf2:sha:1:20", "password", "salt", "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
    ("pbkdf2:sha:2", "password", "salt", "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
    ("pbkdf2:sha:4096", "password", "salt", "4b007901b765489abead49d926f721d065a429c1"),
    (
        "pbkdf2:sha256:1:64",
        "passwd",
        "salt",
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
    ),
]


@pytest.mark.parametrize(("spec", "password", "salt", "expected"), RFC_PBKDF2_VECTORS)
def test_pbkdf2_rfc_vectors(spec: str, password: str, salt: str, expected: str) -> None:
    algo = HashAlgorithm.parse(spec)
    assert hash_password(password, salt, algo) == expected
    assert verify_password(password, expected, salt, algo)
    assert not verify_password(WRONG, expected, salt, algo)


@pytest.mark.parametrize(
    ("mac_fun", "digest_size"), [("sha", 20), ("sha224", 28), ("sha256", 32), ("sha384", 48), ("sha512", 64)]
)
def test_pbkdf2_default_dk_length_is_digest_size(mac_fun: str, digest_size: int) -> None:
    default = HashAlgorithm.parse(f"pbkdf2:{mac_fun}:3")
    explicit = HashAlgorithm.parse(f"pbkdf2:{mac_fun}:3:{digest_size}")
    assert default.effective_dk_length == digest_size
    got = hash_password("pw", "salt", default)
    assert len(got) == 2 * digest_size
    assert got == hash_password("pw", "salt", explicit)
    assert re.fullmatch(r"[0-9a-f]+", got)


def test_pbkdf2_explicit_dk_length_truncates_and_extends() -> None:
    long = hash_password("pw", "salt", HashAlgorithm.parse("pbkdf2:sha256:3:80"))
    short = hash_password("pw", "salt", HashAlgorithm.parse("pbkdf2:sha256:3:16"))
    full = hash_password("pw", "salt", HashAlgorithm.parse("pbkdf2:sha256:3"))
    assert len(long) == 160
    assert len(short) == 32
    assert full.startswith(short)
    assert long.startswith(full)
    # The stored length is part of the check: a prefix of the right hash is still wrong.
    assert not verify_password("pw", short, "salt", HashAlgorithm.parse("pbkdf2:sha256:3"))


def test_pbkdf2_depends_on_iterations_and_salt() -> None:
    a = hash_password("pw", "salt", HashAlgorithm.parse("pbkdf2:sha256:3"))
    assert a != hash_password("pw", "salt", HashAlgorithm.parse("pbkdf2:sha256:4"))
    assert a != hash_password("pw", "salt2", HashAlgorithm.parse("pbkdf2:sha256:3"))


# --- bcrypt --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("password", "stored"), OPENWALL_BCRYPT_VECTORS, ids=lambda v: v[:12] or "empty")
def test_openwall_2a_vectors_verify(password: str, stored: str) -> None:
    assert verify_password(password, stored, "", BCRYPT) is True
    # Change the first character: a change past byte 72 would (correctly) still verify.
    assert verify_password("!" + password[1:], stored, "", BCRYPT) is False


def test_bcrypt_bytes_past_72_do_not_count() -> None:
    password, stored = OPENWALL_BCRYPT_VECTORS[-1]
    assert len(password.encode()) > 72
    assert verify_password(password[:72] + "something else", stored, "", BCRYPT) is True
    assert verify_password(password[:71], stored, "", BCRYPT) is False


@pytest.mark.parametrize("minor", ["2a", "2b", "2y"])
def test_bcrypt_minor_versions_accepted(minor: str) -> None:
    # For ASCII passwords under 72 bytes the three minors compute the same thing (2b and 2y only fix
    # edge cases of long or 8-bit keys), so relabelling a known vector yields a valid hash of each.
    stored = "$" + minor + "$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
    assert verify_password("U*U", stored, "", BCRYPT) is True
    assert verify_password("U*V", stored, "", BCRYPT) is False


def test_bcrypt_other_minors_and_garbage_rejected() -> None:
    tail = "05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
    assert verify_password("U*U", "$2x$" + tail, "", BCRYPT) is False
    assert verify_password("U*U", "$2$" + tail, "", BCRYPT) is False
    assert verify_password("U*U", "$2a$03$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "", BCRYPT) is False
    assert verify_password("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOe", "", BCRYPT) is False
    assert verify_password("U*U", "not a hash", "", BCRYPT) is False
    # A hex digest in a bcrypt-configured table must not be accepted in any way.
    assert verify_password("pw", hash_password("pw", "", DEFAULT_ALGORITHM), "", BCRYPT) is False


def test_bcrypt_hash_is_2b_with_configured_cost_and_random_salt() -> None:
    algo = HashAlgorithm("bcrypt", bcrypt_rounds=4)
    first = hash_password("correct horse", "ignored", algo)
    second = hash_password("correct horse", "ignored", algo)
    assert re.fullmatch(r"\$2b\$04\$[./A-Za-z0-9]{53}", first)
    assert first != second
    assert verify_password("correct horse", first, "", algo)
    assert verify_password("correct horse", second, "whatever", algo)
    assert not verify_password("correct horsE", first, "", algo)
    assert hash_password("pw", "", HashAlgorithm("bcrypt", bcrypt_rounds=5)).startswith("$2b$05$")


def test_bcrypt_refuses_passwords_it_would_silently_shorten() -> None:
    algo = HashAlgorithm("bcrypt", bcrypt_rounds=4)
    assert verify_password("x" * 72, hash_password("x" * 72, "", algo), "", algo)
    with pytest.raises(ValueError, match=r"^password: bcrypt uses only the first 72 bytes.*73 bytes"):
        hash_password("x" * 73, "", algo)
    with pytest.raises(ValueError, match="contains NUL"):
        hash_password("a\0b", "", algo)
    # 25 three-byte characters = 75 bytes: the limit is bytes, not characters.
    with pytest.raises(ValueError, match="75 bytes"):
        hash_password("€" * 25, "", algo)


def test_bcrypt_verify_uses_only_first_72_bytes_like_emqx() -> None:
    algo = HashAlgorithm("bcrypt", bcrypt_rounds=4)
    stored = hash_password("y" * 72, "", algo)
    assert verify_password("y" * 72 + "anything", stored, "", algo)
    assert not verify_password("y" * 71, stored, "", algo)


# --- property tests ------------------------------------------------------------------------------

# No lone surrogates (not encodable, and PostgreSQL text cannot hold them); no NUL, which bcrypt
# refuses to hash; at most 17 * 4 = 68 UTF-8 bytes so bcrypt's 72-byte limit is never reached.
passwords = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=17
)  # <= 68 UTF-8 bytes
salts = st.one_of(st.just(""), st.just("salt"), st.text(max_size=24))
simple_algorithms = st.builds(HashAlgorithm, st.sampled_from(SIMPLE_NAMES), st.sampled_from(SALT_POSITIONS))
pbkdf2_algorithms = st.builds(
    HashAlgorithm,
    st.just("pbkdf2"),
    mac_fun=st.sampled_from(MAC_FUNS),
    iterations=st.integers(min_value=1, max_value=20),
    dk_length=st.none() | st.integers(min_value=1, max_value=96),
)
bcrypt_algorithms = st.just(HashAlgorithm("bcrypt", bcrypt_rounds=4))
algorithms = st.one_of(simple_algorithms, pbkdf2_algorithms, bcrypt_algorithms)

_property = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


@_property
@given(password=passwords, salt=salts, algo=algorithms)
def test_property_hash_then_verify(password: str, salt: str, algo: HashAlgorithm) -> None:
    stored = hash_password(password, salt, algo)
    assert verify_password(password, stored, salt, algo) is True
    # Appending a character changes the compared string's length for every algorithm, including
    # plain under case folding, so this must always fail.
    assert verify_password(password + "7", stored, salt, algo) is False


@_property
@given(password=passwords, other=passwords, salt=salts, algo=algorithms)
def test_property_different_password_rejected(password: str, other: str, salt: str, algo: HashAlgorithm) -> None:
    assume(other != password)
    if algo.name == "plain":
        # plain compares case-insensitively in EMQX 5.8, so case variants legitimately match.
        assume(other.lower() != password.lower())
        assume(hash_password(other, salt, algo).lower() != hash_password(password, salt, algo).lower())
    stored = hash_password(password, salt, algo)
    assert verify_password(other, stored, salt, algo) is False


@_property
@given(algo=algorithms | st.builds(HashAlgorithm, st.just("bcrypt"), bcrypt_rounds=st.integers(4, 31)))
def test_property_spec_round_trips(algo: HashAlgorithm) -> None:
    parsed = HashAlgorithm.parse(algo.spec)
    assert parsed == algo
    assert parsed.spec == algo.spec
    assert parsed.to_hocon() == algo.to_hocon()


# --- spec, validation, HOCON ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected", "canonical"),
    [
        ("sha256", HashAlgorithm("sha256", "prefix"), "sha256:prefix"),
        ("sha256:suffix", HashAlgorithm("sha256", "suffix"), "sha256:suffix"),
        ("sha512:disable", HashAlgorithm("sha512", "disable"), "sha512:disable"),
        ("plain:suffix", HashAlgorithm("plain", "suffix"), "plain:suffix"),
        ("md5", HashAlgorithm("md5"), "md5:prefix"),
        ("sha:prefix", HashAlgorithm("sha"), "sha:prefix"),
        ("pbkdf2:sha256:100000", HashAlgorithm("pbkdf2", mac_fun="sha256", iterations=100000), None),
        (
            "pbkdf2:sha512:10000:32",
            HashAlgorithm("pbkdf2", mac_fun="sha512", iterations=10000, dk_length=32),
            None,
        ),
        ("pbkdf2:sha:1", HashAlgorithm("pbkdf2", mac_fun="sha", iterations=1), None),
        ("bcrypt", HashAlgorithm("bcrypt"), "bcrypt:10"),
        ("bcrypt:12", HashAlgorithm("bcrypt", bcrypt_rounds=12), None),
        ("  sha256:suffix\n", HashAlgorithm("sha256", "suffix"), "sha256:suffix"),
    ],
)
def test_parse_and_spec(spec: str, expected: HashAlgorithm, canonical: str | None) -> None:
    got = HashAlgorithm.parse(spec)
    assert got == expected
    assert got.spec == (canonical or spec)
    assert HashAlgorithm.parse(got.spec) == got


def test_default_algorithm() -> None:
    assert HashAlgorithm("sha256", "prefix") == DEFAULT_ALGORITHM
    assert DEFAULT_ALGORITHM.to_hocon() == "{name = sha256, salt_position = prefix}"


@pytest.mark.parametrize(
    ("spec", "hocon"),
    [
        ("sha256:prefix", "{name = sha256, salt_position = prefix}"),
        ("sha512:suffix", "{name = sha512, salt_position = suffix}"),
        ("plain:disable", "{name = plain, salt_position = disable}"),
        ("md5", "{name = md5, salt_position = prefix}"),
        ("pbkdf2:sha256:100000", "{name = pbkdf2, mac_fun = sha256, iterations = 100000}"),
        ("pbkdf2:sha256:100000:32", "{name = pbkdf2, mac_fun = sha256, iterations = 100000, dk_length = 32}"),
        ("pbkdf2:sha:2:20", "{name = pbkdf2, mac_fun = sha, iterations = 2, dk_length = 20}"),
        ("bcrypt", "{name = bcrypt}"),
        # The database bcrypt variant has no salt_rounds; our generation cost must not leak into it.
        ("bcrypt:12", "{name = bcrypt}"),
    ],
)
def test_to_hocon(spec: str, hocon: str) -> None:
    assert HashAlgorithm.parse(spec).to_hocon() == hocon


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", r"spec is empty"),
        ("   ", r"spec is empty"),
        ("md4", r"name: unknown hash algorithm 'md4'"),
        ("SHA256", r"name: unknown hash algorithm 'SHA256'"),
        ("sha256:middle", r"salt_position: must be one of prefix, suffix, disable, got 'middle'"),
        ("sha256:prefix:extra", r"expected sha256\[:<salt_position>\]"),
        ("sha256:", r"salt_position: .*got ''"),
        ("pbkdf2", r"expected pbkdf2:<mac_fun>:<iterations>\[:<dk_length>\]"),
        ("pbkdf2:sha256", r"expected pbkdf2:<mac_fun>"),
        ("pbkdf2:sha256:1:2:3", r"expected pbkdf2:<mac_fun>"),
        ("pbkdf2:md5:1000", r"mac_fun: must be one of sha, sha224, sha256, sha384, sha512, got 'md5'"),
        ("pbkdf2:sha256:0", r"iterations: must be a positive integer, got 0"),
        ("pbkdf2:sha256:many", r"iterations: must be a decimal integer, got 'many'"),
        ("pbkdf2:sha256:-5", r"iterations: must be a decimal integer, got '-5'"),
        ("pbkdf2:sha256:1_000", r"iterations: must be a decimal integer"),
        ("pbkdf2:sha256:1000:0", r"dk_length: must be an integer in 1\.\.1024"),
        ("pbkdf2:sha256:1000:4096", r"dk_length: must be an integer in 1\.\.1024"),
        ("bcrypt:3", r"bcrypt_rounds: must be an integer in 4\.\.31, got 3"),
        ("bcrypt:32", r"bcrypt_rounds: must be an integer in 4\.\.31, got 32"),
        ("bcrypt:ten", r"bcrypt_rounds: must be a decimal integer, got 'ten'"),
        ("bcrypt:10:2b", r"expected bcrypt\[:<rounds>\]"),
        ("sha256\n:suffix", r"name: unknown hash algorithm 'sha256\\n'"),
    ],
)
def test_bad_specs_raise_one_line_value_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        HashAlgorithm.parse(spec)
    text = str(info.value)
    assert "\n" not in text
    if spec.strip():
        assert repr(spec) in text, "the message should quote the spec the user gave"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "md4"}, "name"),
        ({"name": "sha256", "salt_position": "middle"}, "salt_position"),
        ({"name": "pbkdf2", "iterations": 10, "salt_position": "suffix"}, "salt_position"),
        ({"name": "bcrypt", "salt_position": "disable"}, "salt_position"),
        ({"name": "pbkdf2", "mac_fun": "md5", "iterations": 10}, "mac_fun"),
        ({"name": "sha256", "mac_fun": "sha512"}, "mac_fun"),
        ({"name": "pbkdf2"}, "iterations"),
        ({"name": "pbkdf2", "iterations": 0}, "iterations"),
        ({"name": "pbkdf2", "iterations": True}, "iterations"),
        ({"name": "pbkdf2", "iterations": "1000"}, "iterations"),
        ({"name": "sha256", "iterations": 1000}, "iterations"),
        ({"name": "pbkdf2", "iterations": 10, "dk_length": 0}, "dk_length"),
        ({"name": "pbkdf2", "iterations": 10, "dk_length": 32.0}, "dk_length"),
        ({"name": "bcrypt", "dk_length": 32}, "dk_length"),
        ({"name": "bcrypt", "bcrypt_rounds": 3}, "bcrypt_rounds"),
        ({"name": "bcrypt", "bcrypt_rounds": 32}, "bcrypt_rounds"),
        ({"name": "sha256", "bcrypt_rounds": 12}, "bcrypt_rounds"),
    ],
)
def test_constructor_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: ") as info:
        HashAlgorithm(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_hash_algorithm_is_frozen_and_hashable() -> None:
    algo = HashAlgorithm("sha256")
    with pytest.raises(dataclasses.FrozenInstanceError):
        algo.name = "md5"  # type: ignore[misc]
    assert {algo, HashAlgorithm("sha256", "prefix")} == {algo}


def test_effective_dk_length_only_for_pbkdf2() -> None:
    assert HashAlgorithm.parse("pbkdf2:sha384:5").effective_dk_length == 48
    assert HashAlgorithm.parse("pbkdf2:sha384:5:7").effective_dk_length == 7
    with pytest.raises(ValueError, match=r"^dk_length: only applies to pbkdf2"):
        _ = HashAlgorithm("sha256").effective_dk_length


# --- generation ----------------------------------------------------------------------------------


def test_generate_password_is_long_random_and_safe() -> None:
    safe = set(string.ascii_letters + string.digits)
    generated = {generate_password() for _ in range(200)}
    assert len(generated) == 200
    for pw in generated:
        assert set(pw) <= safe, pw
        assert len(pw) * math.log2(len(safe)) >= 192
    # Uniformity smoke check: across 200 passwords every symbol of the alphabet shows up.
    assert set("".join(generated)) == safe


@pytest.mark.parametrize("spec", ["sha256:prefix", "sha512:suffix", "plain:prefix", "md5:suffix", "pbkdf2:sha:2"])
def test_generate_salt_is_16_random_bytes_as_lower_hex(spec: str) -> None:
    algo = HashAlgorithm.parse(spec)
    salts = {generate_salt(algo) for _ in range(50)}
    assert len(salts) == 50
    for salt in salts:
        assert re.fullmatch(r"[0-9a-f]{32}", salt), salt
        assert verify_password("pw", hash_password("pw", salt, algo), salt, algo)


@pytest.mark.parametrize("spec", ["bcrypt", "sha256:disable", "plain:disable", "md5:disable"])
def test_generate_salt_is_empty_string_when_unused(spec: str) -> None:
    salt = generate_salt(HashAlgorithm.parse(spec))
    assert salt == ""
    assert salt is not None


# --- Mosquitto -----------------------------------------------------------------------------------

MOSQUITTO_7 = re.compile(r"\$7\$(\d+)\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)")


def test_mosquitto_hash_format_and_rederivation() -> None:
    line = mosquitto_hash("pass")
    match = MOSQUITTO_7.fullmatch(line)
    assert match, line
    iterations, salt_b64, hash_b64 = match.groups()
    assert iterations == "101"
    salt = base64.b64decode(salt_b64)
    assert len(salt) == 12
    assert base64.b64decode(hash_b64) == hashlib.pbkdf2_hmac("sha512", b"pass", salt, 101, 64)
    assert mosquitto_verify("pass", line)
    assert not mosquitto_verify("Pass", line)
    assert mosquitto_hash("pass") != line


def test_mosquitto_hash_fixed_salt_and_iterations() -> None:
    salt = bytes(range(12))
    line = mosquitto_hash("pässword", iterations=7, salt=salt)
    expected = hashlib.pbkdf2_hmac("sha512", "pässword".encode(), salt, 7, 64)
    assert line == f"$7$7${base64.b64encode(salt).decode()}${base64.b64encode(expected).decode()}"
    assert mosquitto_verify("pässword", line)


def test_mosquitto_hash_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^salt: must be exactly 12 bytes"):
        mosquitto_hash("p", salt=b"short")
    with pytest.raises(ValueError, match=r"^iterations: must be a positive integer"):
        mosquitto_hash("p", iterations=0)


def test_mosquitto_verify_sha512_format() -> None:
    salt = b"0123456789ab"
    digest = hashlib.sha512(b"pass" + salt).digest()
    line = f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert mosquitto_verify("pass", line)
    assert mosquitto_verify("pass", line + "\n")
    assert not mosquitto_verify("pas", line)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "pass",
        "$7$$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
        "$7$0$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
        "$7$x$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
        "$7$101$not*base64$" + "A" * 86 + "==",
        "$7$101$AAAAAAAAAAAAAAAA$AAAA",
        "$5$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
        "$6$AAAAAAAAAAAAAAAA",
        "user:$7$101$AAAAAAAAAAAAAAAA$" + "A" * 86 + "==",
    ],
)
def test_mosquitto_verify_malformed_is_false(bad: str) -> None:
    assert mosquitto_verify("pass", bad) is False


_MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
_needs_mosquitto_passwd = pytest.mark.skipif(
    _MOSQUITTO_PASSWD is None, reason="mosquitto_passwd binary not installed (apt install mosquitto)"
)


def _real_mosquitto_hash(tmp_path: Path, password: str, *extra: str) -> str:
    assert _MOSQUITTO_PASSWD is not None
    pwfile = tmp_path / "passwd"
    subprocess.run(
        [_MOSQUITTO_PASSWD, *extra, "-c", "-b", str(pwfile), "user", password],
        check=True,
        capture_output=True,
        timeout=30,
    )
    lines = pwfile.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("user:"), lines
    return lines[0].split(":", 1)[1]


@_needs_mosquitto_passwd
def test_real_mosquitto_passwd_hash_verifies(tmp_path: Path) -> None:
    line = _real_mosquitto_hash(tmp_path, "s3cret pässword")
    assert MOSQUITTO_7.fullmatch(line), line
    assert mosquitto_verify("s3cret pässword", line)
    assert not mosquitto_verify("s3cret password", line)
    # Same salt and iterations through our code gives the identical string: same format, byte for byte.
    match = MOSQUITTO_7.fullmatch(line)
    assert match
    salt = base64.b64decode(match.group(2))
    assert mosquitto_hash("s3cret pässword", int(match.group(1)), salt) == line


@_needs_mosquitto_passwd
def test_real_mosquitto_passwd_sha512_hash_verifies(tmp_path: Path) -> None:
    line = _real_mosquitto_hash(tmp_path, "legacy", "-H", "sha512")
    assert line.startswith("$6$"), line
    assert mosquitto_verify("legacy", line)
    assert not mosquitto_verify("Legacy", line)
