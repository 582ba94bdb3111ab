"""MQTT password hashes exactly as EMQX 5.8 checks them, plus Mosquitto 2 password-file hashes.

EMQX reads ``password_hash`` and ``salt`` from PostgreSQL and recomputes the hash itself
(``emqx_passwd.erl``), so whatever we store must be byte-for-byte what EMQX would compute. The rules
reproduced here, from the contract in ``/work/shared/emqx-5.8-contract.md`` section 3:

* salt and password are the raw UTF-8 bytes of the text; a hex-looking salt is *not* hex-decoded;
* simple algorithms hash ``salt+password`` (prefix), ``password+salt`` (suffix) or ``password``
  (disable) and store the lowercase hex digest; ``plain`` stores the concatenation itself;
* pbkdf2 stores the lowercase hex of PBKDF2-HMAC(mac_fun, password, salt, iterations, dk_length);
* bcrypt stores the whole modular-crypt string and ignores the salt column;
* comparison is constant-time and case-insensitive for everything except bcrypt. EMQX 5.8.5 added
  the case folding (emqx/emqx PR #14592) and applied it to ``plain`` too; 5.10.4/6.0.3 made
  ``plain`` case-sensitive again (PR #17643/#17644), so revisit ``plain`` when upgrading.

Mosquitto cannot read EMQX hashes, so it gets its own ``$7$`` format (see :func:`mosquitto_hash`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from typing import Final, Literal, cast

import bcrypt

__all__ = [
    "BCRYPT_MAX_PASSWORD_BYTES",
    "DEFAULT_ALGORITHM",
    "MAC_FUNS",
    "MOSQUITTO_DEFAULT_ITERATIONS",
    "MOSQUITTO_SALT_BYTES",
    "NAMES",
    "SALT_POSITIONS",
    "SIMPLE_NAMES",
    "HashAlgorithm",
    "generate_password",
    "generate_salt",
    "hash_password",
    "mosquitto_hash",
    "mosquitto_verify",
    "verify_password",
]

AlgorithmName = Literal["plain", "md5", "sha", "sha256", "sha512", "pbkdf2", "bcrypt"]
SaltPosition = Literal["prefix", "suffix", "disable"]
MacFun = Literal["sha", "sha224", "sha256", "sha384", "sha512"]

SIMPLE_NAMES: Final[tuple[str, ...]] = ("plain", "md5", "sha", "sha256", "sha512")
NAMES: Final[tuple[str, ...]] = (*SIMPLE_NAMES, "pbkdf2", "bcrypt")
SALT_POSITIONS: Final[tuple[str, ...]] = ("prefix", "suffix", "disable")
# md4/md5/ripemd160 were dropped from EMQX's pbkdf2 schema in 5.8.3, so a config using them is rejected.
MAC_FUNS: Final[tuple[str, ...]] = ("sha", "sha224", "sha256", "sha384", "sha512")

# EMQX says "sha" where hashlib says "sha1".
_HASHLIB_NAME: Final[dict[str, str]] = {
    "md5": "md5",
    "sha": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}

_DEFAULT_MAC_FUN: Final = "sha256"
_DEFAULT_BCRYPT_ROUNDS: Final = 10
# The bcrypt library refuses costs outside 4..31; a cost of 31 already takes days per hash.
_BCRYPT_MIN_ROUNDS: Final = 4
_BCRYPT_MAX_ROUNDS: Final = 31
# Anything past the digest size only makes EMQX compute extra PBKDF2 blocks; the cap keeps a typo
# (an extra zero or three) from producing a megabyte "hash" that no column or CPU budget wants.
_MAX_DK_LENGTH: Final = 1024
# Blowfish keys stop at 72 bytes; both the C bcrypt EMQX links and the Python package agree on that.
BCRYPT_MAX_PASSWORD_BYTES: Final = 72

_SPEC_INT = re.compile(r"[0-9]+")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(?P<cost>[0-9]{2})\$[./A-Za-z0-9]{53}")


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as an iteration count is a bug, not a request for 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class HashAlgorithm:
    """One EMQX ``password_hash_algorithm``, plus the bcrypt cost we use when creating hashes.

    Fields that do not apply to ``name`` must keep their defaults, so that :attr:`spec` and
    :meth:`to_hocon` can never silently drop a setting the caller thought was in effect.
    """

    name: AlgorithmName
    salt_position: SaltPosition = "prefix"
    mac_fun: MacFun = _DEFAULT_MAC_FUN
    iterations: int | None = None
    dk_length: int | None = None
    bcrypt_rounds: int = _DEFAULT_BCRYPT_ROUNDS

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"name: unknown hash algorithm {self.name!r}; expected one of {', '.join(NAMES)}")
        if self.salt_position not in SALT_POSITIONS:
            raise ValueError(f"salt_position: must be one of {', '.join(SALT_POSITIONS)}, got {self.salt_position!r}")
        if self.salt_position != "prefix" and not self.is_simple:
            raise ValueError(f"salt_position: only applies to {', '.join(SIMPLE_NAMES)}, not {self.name}")
        if self.mac_fun not in MAC_FUNS:
            raise ValueError(f"mac_fun: must be one of {', '.join(MAC_FUNS)}, got {self.mac_fun!r}")
        if self.name == "pbkdf2":
            if self.iterations is None:
                raise ValueError("iterations: required for pbkdf2")
            if not _is_int(self.iterations) or self.iterations < 1:
                raise ValueError(f"iterations: must be a positive integer, got {self.iterations!r}")
            if self.dk_length is not None and (
                not _is_int(self.dk_length) or not 1 <= self.dk_length <= _MAX_DK_LENGTH
            ):
                raise ValueError(
                    f"dk_length: must be an integer in 1..{_MAX_DK_LENGTH} or None, got {self.dk_length!r}"
                )
        else:
            if self.mac_fun != _DEFAULT_MAC_FUN:
                raise ValueError(f"mac_fun: only applies to pbkdf2, not {self.name}")
            if self.iterations is not None:
                raise ValueError(f"iterations: only applies to pbkdf2, not {self.name}")
            if self.dk_length is not None:
                raise ValueError(f"dk_length: only applies to pbkdf2, not {self.name}")
        if not _is_int(self.bcrypt_rounds) or not _BCRYPT_MIN_ROUNDS <= self.bcrypt_rounds <= _BCRYPT_MAX_ROUNDS:
            raise ValueError(
                f"bcrypt_rounds: must be an integer in {_BCRYPT_MIN_ROUNDS}..{_BCRYPT_MAX_ROUNDS}, "
                f"got {self.bcrypt_rounds!r}"
            )
        if self.name != "bcrypt" and self.bcrypt_rounds != _DEFAULT_BCRYPT_ROUNDS:
            raise ValueError(f"bcrypt_rounds: only applies to bcrypt, not {self.name}")

    @property
    def is_simple(self) -> bool:
        return self.name in SIMPLE_NAMES

    @property
    def uses_salt(self) -> bool:
        """Whether EMQX reads the salt column at all for this algorithm."""
        if self.name == "bcrypt":
            return False
        return not (self.is_simple and self.salt_position == "disable")

    @property
    def effective_dk_length(self) -> int:
        """Derived-key length in bytes for pbkdf2: ``dk_length``, or the digest size like EMQX."""
        if self.name != "pbkdf2":
            raise ValueError(f"dk_length: only applies to pbkdf2, not {self.name}")
        if self.dk_length is not None:
            return self.dk_length
        return hashlib.new(_HASHLIB_NAME[self.mac_fun]).digest_size

    @classmethod
    def parse(cls, spec: str) -> HashAlgorithm:
        """Parse the compact form used on command lines and in our own config.

        ``<simple>[:<salt_position>]`` (simple = plain|md5|sha|sha256|sha512),
        ``pbkdf2:<mac_fun>:<iterations>[:<dk_length>]``, ``bcrypt[:<rounds>]``.
        """
        if not isinstance(spec, str):
            raise ValueError(f"hash algorithm spec must be a string, got {type(spec).__name__}")
        text = spec.strip()
        if not text:
            raise ValueError("hash algorithm spec is empty; expected e.g. sha256:prefix or bcrypt")
        name, *rest = text.split(":")
        try:
            if name in SIMPLE_NAMES:
                if len(rest) > 1:
                    raise ValueError(f"expected {name}[:<salt_position>]")
                position = rest[0] if rest else "prefix"
                if position not in SALT_POSITIONS:
                    raise ValueError(f"salt_position: must be one of {', '.join(SALT_POSITIONS)}, got {position!r}")
                return cls(cast(AlgorithmName, name), cast(SaltPosition, position))
            if name == "pbkdf2":
                if len(rest) not in (2, 3):
                    raise ValueError("expected pbkdf2:<mac_fun>:<iterations>[:<dk_length>]")
                mac_fun = rest[0]
                if mac_fun not in MAC_FUNS:
                    raise ValueError(f"mac_fun: must be one of {', '.join(MAC_FUNS)}, got {mac_fun!r}")
                iterations = _parse_spec_int("iterations", rest[1])
                dk_length = _parse_spec_int("dk_length", rest[2]) if len(rest) == 3 else None
                return cls("pbkdf2", mac_fun=cast(MacFun, mac_fun), iterations=iterations, dk_length=dk_length)
            if name == "bcrypt":
                if len(rest) > 1:
                    raise ValueError("expected bcrypt[:<rounds>]")
                rounds = _parse_spec_int("bcrypt_rounds", rest[0]) if rest else _DEFAULT_BCRYPT_ROUNDS
                return cls("bcrypt", bcrypt_rounds=rounds)
            raise ValueError(f"name: unknown hash algorithm {name!r}; expected one of {', '.join(NAMES)}")
        except ValueError as exc:
            raise ValueError(f"invalid hash algorithm spec {spec!r}: {exc}") from None

    @property
    def spec(self) -> str:
        """Canonical compact form; ``HashAlgorithm.parse(a.spec) == a`` for every valid ``a``.

        The salt position is always spelled out: the EMQX docs themselves mislabel a prefix hash as
        suffix, so an implicit default is exactly the detail people get wrong.
        """
        if self.is_simple:
            return f"{self.name}:{self.salt_position}"
        if self.name == "pbkdf2":
            base = f"pbkdf2:{self.mac_fun}:{self.iterations}"
            return base if self.dk_length is None else f"{base}:{self.dk_length}"
        return f"bcrypt:{self.bcrypt_rounds}"

    def to_hocon(self) -> str:
        """The value of EMQX's ``password_hash_algorithm`` for a postgresql authenticator."""
        if self.is_simple:
            return f"{{name = {self.name}, salt_position = {self.salt_position}}}"
        if self.name == "pbkdf2":
            fields = f"name = pbkdf2, mac_fun = {self.mac_fun}, iterations = {self.iterations}"
            if self.dk_length is not None:
                fields += f", dk_length = {self.dk_length}"
            return f"{{{fields}}}"
        # The read-only (database) bcrypt variant has no salt_rounds: the cost lives in each stored hash.
        return "{name = bcrypt}"


def _parse_spec_int(field: str, text: str) -> int:
    # int() would also take "+5", " 5", "1_000" and non-ASCII digits; a spec should have one spelling.
    if not _SPEC_INT.fullmatch(text):
        raise ValueError(f"{field}: must be a decimal integer, got {text!r}")
    return int(text)


DEFAULT_ALGORITHM: Final = HashAlgorithm("sha256", "prefix")

_PASSWORD_ALPHABET: Final = string.ascii_letters + string.digits
# 33 symbols of log2(62) ~ 5.95 bits each = ~196 bits, just above the 192-bit target.
_PASSWORD_LENGTH: Final = 33


def generate_password() -> str:
    """A random password of ~196 bits using only ``[A-Za-z0-9]``.

    Letters and digits only, so the value needs no quoting in shells, URLs, HOCON, YAML or SQL and
    cannot start with ``-`` and be mistaken for a command-line option.
    """
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(_PASSWORD_LENGTH))


def generate_salt(algo: HashAlgorithm) -> str:
    """16 random bytes as lowercase hex, or ``""`` when EMQX ignores the salt.

    Never None: EMQX crashes on a NULL salt for salted algorithms, and the column is NOT NULL.
    The hex text itself is the salt EMQX hashes (it is not decoded), which is fine: it is 128 bits
    of entropy in printable form that survives every client and CSV tool unchanged.
    """
    if not algo.uses_salt:
        return ""
    return secrets.token_hex(16)


def _require_str(field: str, value: object) -> None:
    if not isinstance(value, str):
        # Mirrors EMQX's salt_not_string/password_not_string crash, but at provisioning time.
        hint = " (use '' for no salt, never None)" if field == "salt" else ""
        raise TypeError(f"{field} must be str, got {type(value).__name__}{hint}")


def _bcrypt_key(password: str) -> bytes:
    # EMQX's NIF hands the password to C bcrypt as a C string, which stops at the first NUL and
    # uses at most 72 bytes; the Python package would instead hash the NUL or raise past 72 bytes.
    return password.encode("utf-8").split(b"\0", 1)[0][:BCRYPT_MAX_PASSWORD_BYTES]


def hash_password(password: str, salt: str, algo: HashAlgorithm) -> str:
    """The ``password_hash`` value EMQX will accept for ``password`` with this ``salt``.

    For bcrypt the salt argument is ignored (the random bcrypt salt is inside the result) and each
    call returns a different string.
    """
    _require_str("password", password)
    _require_str("salt", salt)
    if algo.name == "bcrypt":
        raw = password.encode("utf-8")
        has_nul = b"\0" in raw
        if has_nul or len(raw) > BCRYPT_MAX_PASSWORD_BYTES:
            # Storing it would work, but the user would believe the whole password counts.
            raise ValueError(
                f"password: bcrypt uses only the first {BCRYPT_MAX_PASSWORD_BYTES} bytes up to any NUL; "
                f"this one is {len(raw)} bytes{' and contains NUL' if has_nul else ''}"
            )
        salt_setting = bcrypt.gensalt(rounds=algo.bcrypt_rounds, prefix=b"2b")
        return bcrypt.hashpw(raw, salt_setting).decode("ascii")
    pw = password.encode("utf-8")
    if algo.name == "pbkdf2":
        assert algo.iterations is not None  # guaranteed by __post_init__
        derived = hashlib.pbkdf2_hmac(
            _HASHLIB_NAME[algo.mac_fun], pw, salt.encode("utf-8"), algo.iterations, algo.effective_dk_length
        )
        return derived.hex()
    if algo.salt_position == "prefix":
        data = salt.encode("utf-8") + pw
    elif algo.salt_position == "suffix":
        data = pw + salt.encode("utf-8")
    else:
        data = pw
    if algo.name == "plain":
        return data.decode("utf-8")
    return hashlib.new(_HASHLIB_NAME[algo.name], data).hexdigest()


def _lower(text: str) -> str:
    # Per code point, not str.lower(): Python's final-sigma rule looks at neighbours, so the same
    # characters could fold differently in the stored and the computed string; Erlang's
    # string:lowercase has no such context rule.
    return "".join(ch.lower() for ch in text)


def _equal_caseless(computed: str, stored: str) -> bool:
    return hmac.compare_digest(_lower(computed).encode("utf-8"), _lower(stored).encode("utf-8"))


def verify_password(password: str, stored_hash: str, salt: str, algo: HashAlgorithm) -> bool:
    """Whether EMQX 5.8 would accept ``password`` against the stored row (``stored_hash``, ``salt``)."""
    _require_str("password", password)
    _require_str("stored_hash", stored_hash)
    _require_str("salt", salt)
    if algo.name == "bcrypt":
        match = _BCRYPT_HASH.fullmatch(stored_hash)
        if match is None or not _BCRYPT_MIN_ROUNDS <= int(match["cost"]) <= _BCRYPT_MAX_ROUNDS:
            return False
        stored = stored_hash.encode("ascii")
        try:
            # EMQX's rule, hashpw(password, stored) == stored, rather than checkpw: the minor
            # version ($2a$/$2b$/$2y$) is echoed back, so all three verify.
            computed = bcrypt.hashpw(_bcrypt_key(password), stored)
        except ValueError:
            return False
        return hmac.compare_digest(computed, stored)
    return _equal_caseless(hash_password(password, salt, algo), stored_hash)


# Mosquitto 2.0 (src/password_mosq.h, apps/mosquitto_passwd): SALT_LEN 12, sha512 digests, and
# 101 PBKDF2 iterations unless `mosquitto_passwd -I` says otherwise.
MOSQUITTO_SALT_BYTES: Final = 12
MOSQUITTO_DEFAULT_ITERATIONS: Final = 101
_MOSQUITTO_HASH_BYTES: Final = 64


def mosquitto_hash(password: str, iterations: int = MOSQUITTO_DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``.

    The same text ``mosquitto_passwd`` writes after ``user:``; standard base64 with padding.
    """
    _require_str("password", password)
    if not _is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations: must be a positive integer, got {iterations!r}")
    if salt is None:
        salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    elif not isinstance(salt, bytes) or len(salt) != MOSQUITTO_SALT_BYTES:
        raise ValueError(f"salt: must be exactly {MOSQUITTO_SALT_BYTES} bytes like mosquitto_passwd's")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _MOSQUITTO_HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def mosquitto_verify(password: str, line_hash: str) -> bool:
    """Whether ``password`` matches a Mosquitto password-file hash (the part after ``user:``).

    Accepts ``$7$`` (PBKDF2-SHA512, Mosquitto >= 1.6 default) and the older ``$6$`` (one round of
    sha512 over password+salt). Anything malformed is simply not a match.
    """
    _require_str("password", password)
    if not isinstance(line_hash, str):
        return False
    parts = line_hash.strip().split("$")
    pw = password.encode("utf-8")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            if not _SPEC_INT.fullmatch(parts[2]) or int(parts[2]) < 1:
                return False
            salt, expected = _unb64(parts[3]), _unb64(parts[4])
            computed = hashlib.pbkdf2_hmac("sha512", pw, salt, int(parts[2]), _MOSQUITTO_HASH_BYTES)
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            salt, expected = _unb64(parts[2]), _unb64(parts[3])
            computed = hashlib.sha512(pw + salt).digest()
        else:
            return False
    except (binascii.Error, ValueError):
        return False
    return len(expected) == _MOSQUITTO_HASH_BYTES and hmac.compare_digest(computed, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)
