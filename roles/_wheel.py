"""What the hosts' virtualenv is installed from, prepared on the operator's machine (README, "The ingest
service on a host").

Hosts may have no route to PyPI, so the deploy uploads everything pip needs and installs with
``--no-index``: the project's own wheel plus a *wheelhouse* of its runtime dependencies downloaded for
the host's interpreter and platform (CPython 3.11, manylinux x86_64 on Debian 12), with a lock file
(``name==version --hash=sha256:...`` for each wheel).

Both are cached under ``.cache/ingest/`` and rebuilt only when their inputs change:

* the wheelhouse is keyed by the dependency pins and the target; a deploy after the first downloads
  nothing;
* the project wheel is keyed by a digest of its sources, and built reproducibly: fixed zip timestamps
  (``SOURCE_DATE_EPOCH``), normalized file modes, pinned build tools, a fixed README. The same sources
  give the same bytes, so an unchanged wheel uploads nothing and the host re-installs nothing
  (the zero-change second deploy depends on it).

The wheel holds what runs on hosts -- ``ingest``, ``scripts``, ``simulator`` -- and not ``roles``
(deploy code) nor the README: editing a role or the documentation must not restart the ingest service.
Its ``Requires-Dist`` still names the deploy tools (pyinfra, ansible-core): the host installs the
locked set with ``--no-deps`` instead, which is exactly :data:`HOST_DISTRIBUTIONS` and what they need.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from roles._base import REPO_ROOT, RoleError, logger

CACHE = REPO_ROOT / ".cache" / "ingest"
# Packages of this repository that run on hosts (see the module docstring for what is left out).
SOURCES = ("ingest", "scripts", "simulator")
# Third-party distributions those packages import (tests/unit/test_roles_ingest.py checks the list
# against their imports); versions come from pyproject.toml's pins, the one place they are set.
HOST_DISTRIBUTIONS = ("paho-mqtt", "psycopg", "cryptography", "prometheus-client", "pyyaml", "bcrypt")
# The build backend pyproject.toml names, pinned: another setuptools would write another wheel.
BUILD_REQUIREMENTS = ("setuptools==80.9.0", "wheel==0.45.1")
# 1980-01-01, the earliest time a zip file can hold: the wheel's timestamps say nothing about when it
# was built, so two builds of the same sources are byte-identical.
SOURCE_DATE_EPOCH = 315532800
README_STUB = (
    "# telemetry-platform\n\nThe host package of the IoT telemetry platform: the ingest service, "
    "the provisioning CLI, the host scripts and the device simulator. See the repository's README.\n"
)
KEEP_WHEELS = 5
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


@dataclass(frozen=True)
class Target:
    """The host's interpreter and platform, as pip's ``download --platform/--python-version`` want them."""

    python: str  # "3.11"
    machine: str  # "x86_64", "aarch64"
    glibc: str  # "2.36": pip also accepts every older manylinux tag for it

    def __post_init__(self) -> None:
        if not re.fullmatch(r"3\.\d{1,2}", self.python):
            raise RoleError(f"ingest_host_python must look like 3.11, not {self.python!r}")
        if not re.fullmatch(r"\d\.\d{1,2}", self.glibc):
            raise RoleError(f"ingest_host_glibc must look like 2.36, not {self.glibc!r}")
        if not re.fullmatch(r"[a-z0-9_]+", self.machine):
            raise RoleError(f"unexpected machine name {self.machine!r} (uname -m)")

    @property
    def platform(self) -> str:
        return f"manylinux_{self.glibc.replace('.', '_')}_{self.machine}"

    @property
    def platforms(self) -> list[str]:
        """Every manylinux tag a wheel for this glibc may carry, newest first: pip's ``--platform``
        matches tags literally (it expands only the legacy ``manylinux2014`` alias, to 2010 and 1)."""
        major, minor = (int(x) for x in self.glibc.split("."))
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}"]

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


@dataclass(frozen=True)
class Bundle:
    """Everything uploaded to the host's wheelhouse: dependency wheels, their lock, the project wheel."""

    wheelhouse: Path  # local folder holding the dependency wheels and requirements.lock
    wheels: tuple[Path, ...]  # the dependency wheels
    lock: str  # requirements.lock: one `name==version --hash=sha256:...` per wheel
    project_wheel: Path

    @property
    def lock_digest(self) -> str:
        return hashlib.sha256(self.lock.encode()).hexdigest()

    @property
    def wheel_digest(self) -> str:
        return sha256_file(self.project_wheel)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], what: str, **kw: object) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RoleError(f"ingest: {what} failed ({' '.join(cmd[:4])} ...): {' / '.join(detail)}")


def _pins() -> dict[str, str]:
    """pyproject.toml's dependency pins by normalized name: {"psycopg": "psycopg[binary]==3.3.9", ...}."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for spec in project["dependencies"]:
        name = re.split(r"[\[=<>!~; ]", spec, maxsplit=1)[0]
        out[normalize(name)] = spec
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def host_requirements() -> list[str]:
    pins = _pins()
    missing = [d for d in HOST_DISTRIBUTIONS if normalize(d) not in pins]
    if missing:
        raise RoleError(f"ingest: {', '.join(missing)} not pinned in pyproject.toml's dependencies")
    return sorted(pins[normalize(d)] for d in HOST_DISTRIBUTIONS)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def lock_text(wheels: list[Path]) -> str:
    lines = []
    for wheel in sorted(wheels, key=lambda p: p.name.lower()):
        m = _WHEEL_NAME.match(wheel.name)
        if m is None:
            raise RoleError(f"ingest: unexpected file in the wheelhouse: {wheel.name}")
        lines.append(f"{normalize(m['name'])}=={m['version']} --hash=sha256:{sha256_file(wheel)}")
    return "".join(f"{line}\n" for line in lines)


def _publish(tmp: Path, folder: Path) -> None:
    """Move a finished build into the cache in one rename. A concurrent deploy that finished first
    (same key, so the same content) wins; a leftover incomplete folder is replaced."""
    if folder.exists() and not any(folder.glob("*.whl")):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if not any(folder.glob("*.whl")):
            raise


def wheelhouse(target: Target, requirements: list[str] | None = None) -> tuple[Path, str]:
    """The dependency wheels for ``target`` (downloaded once per pin set) and their lock file's text."""
    requirements = host_requirements() if requirements is None else requirements
    key = _digest("wheelhouse-v1", target.python, target.platform, *requirements)[:16]
    folder = CACHE / f"wheelhouse-{key}"
    if not (folder / "requirements.lock").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=CACHE))
        started = time.monotonic()
        try:
            _run(
                [
                    sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--only-binary=:all:", *(f"--platform={p}" for p in target.platforms),
                    "--python-version", target.python, "--implementation", "cp",
                    "--abi", target.abi, "--abi", "abi3", "--abi", "none",
                    "--dest", str(tmp), *requirements,
                ],
                f"downloading the dependencies for Python {target.python} on {target.platform}",
            )  # fmt: skip
            (tmp / "requirements.lock").write_text(lock_text(list(tmp.glob("*.whl"))))
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("ingest: wheelhouse %s downloaded in %.1f s", folder.name, time.monotonic() - started)
    return folder, (folder / "requirements.lock").read_text()


def _source_files() -> list[Path]:
    files = []
    for top in SOURCES:
        for path in sorted((REPO_ROOT / top).rglob("*")):
            rel = path.relative_to(REPO_ROOT)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
                files.append(rel)
    return files


def _build_env() -> Path:
    """A virtualenv holding exactly BUILD_REQUIREMENTS (made once, on the first build)."""
    env = CACHE / f"build-env-{_digest(sys.version, *BUILD_REQUIREMENTS)[:12]}"
    python = env / "bin" / "python"
    if not (env / ".complete").is_file():
        shutil.rmtree(env, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(env)], "creating the build environment")
        _run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *BUILD_REQUIREMENTS],
            "installing the build tools",
        )
        (env / ".complete").write_text("ok\n")
    return python


def project_wheel() -> Path:
    """The project's wheel for hosts, from the working tree (uncommitted changes included: what the
    operator sees is what is deployed). Cached by a digest of the sources and build settings."""
    files = _source_files()
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    parts: list[str | bytes] = ["wheel-v1", str(SOURCE_DATE_EPOCH), README_STUB, *BUILD_REQUIREMENTS, pyproject]
    for rel in files:
        parts += [str(rel), (REPO_ROOT / rel).read_bytes()]
    folder = CACHE / f"wheel-{_digest(*parts)[:16]}"
    built = sorted(folder.glob("*.whl"))
    if len(built) == 1:
        return built[0]
    python = _build_env()
    CACHE.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".wheel-stage-", dir=CACHE))
    try:
        src = stage / "src"
        for rel in files:
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / rel, dest)
            dest.chmod(0o644)  # the checkout's umask must not reach the wheel
        (src / "pyproject.toml").write_bytes(pyproject)
        (src / "README.md").write_text(README_STUB)
        out = stage / "out"
        _run(
            [
                str(python), "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                "--no-build-isolation", "--no-index", "--wheel-dir", str(out), str(src),
            ],
            "building the project's wheel",
            env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        (wheel,) = out.glob("*.whl")
        tmp = stage / "result"
        tmp.mkdir()
        shutil.move(str(wheel), tmp / wheel.name)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    # Every source edit makes a new wheel: keep the few latest (another checkout may deploy them).
    for old in sorted(CACHE.glob("wheel-*"), key=lambda p: p.stat().st_mtime)[:-KEEP_WHEELS]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / wheel.name


_BUNDLES: dict[Target, Bundle] = {}


def bundle(target: Target) -> Bundle:
    """Wheelhouse + project wheel for ``target``, computed once per deploy run (every host asks)."""
    if target not in _BUNDLES:
        folder, lock = wheelhouse(target)
        _BUNDLES[target] = Bundle(folder, tuple(sorted(folder.glob("*.whl"))), lock, project_wheel())
    return _BUNDLES[target]
