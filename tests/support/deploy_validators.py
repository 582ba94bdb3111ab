"""Real validators for rendered deploy artifacts, plus the EMQX contract's rules as checks.

Each validator needs a Debian tool listed in tools/install-deps.sh (docker-compose, systemd,
openssh-server, shellcheck, mosquitto); a missing tool fails the test rather than skipping it, since
an unvalidated artifact would pass silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pyhocon import ConfigFactory, ConfigTree  # type: ignore[import-untyped]


def tool(name: str, *candidates: str) -> str:
    for c in (name, *candidates):
        found = shutil.which(c) or (c if Path(c).is_file() else None)
        if found:
            return found
    raise AssertionError(f"{name} not installed: run `make deps` (tools/install-deps.sh)")


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def compose_config_ok(project_files: dict[str, str], tmp: Path) -> None:
    """``docker-compose config -q`` on the project laid out as on the host (env files, secrets)."""
    for rel, content in project_files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    proc = run([tool("docker-compose"), "-f", str(tmp / "compose.yaml"), "config", "-q"], cwd=tmp)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def systemd_verify_ok(units: dict[str, str], tmp: Path) -> None:
    """``systemd-analyze verify`` with empty stderr, in a root holding the system's units plus stubs
    for docker (not installed on the test machine: only its name matters to the unit)."""
    root = tmp / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for binary in ("usr/bin/docker", "usr/bin/docker-compose"):
        stub = root / binary
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    (etc / "docker.service").write_text("[Unit]\nDescription=stub\n[Service]\nExecStart=/usr/bin/docker\n")
    for name, content in units.items():
        (etc / name).write_text(content)
        proc = run([tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", f"/etc/systemd/system/{name}"])
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{name}: {proc.stderr}"


def shellcheck_ok(script: str, tmp: Path, name: str = "script.sh") -> None:
    path = tmp / name
    path.write_text(script)
    proc = run([tool("shellcheck"), "--shell=sh", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sshd_ok(config: str, tmp: Path) -> None:
    key = tmp / "hostkey"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    conf = tmp / "sshd_config"
    conf.write_text(config)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd -t insists on its privilege-separation dir
    proc = run([tool("sshd", "/usr/sbin/sshd"), "-t", "-f", str(conf), "-h", str(key)])
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- EMQX contract (shared/emqx-5.8-contract.md) --------------------------------------------------

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT = re.compile(r"(#|//).*$", re.MULTILINE)
_NODE = re.compile(r"^[A-Za-z_]*[A-Za-z_]@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def parse_hocon(text: str) -> ConfigTree:
    return ConfigFactory.parse_string(text, resolve=False)


def no_single_quoted_strings(text: str) -> None:
    stripped = _COMMENT.sub("", _QUOTED.sub('""', text))
    assert "'" not in stripped, "single-quoted HOCON string (EMQX scan error, issue #10727)"


def _ssl_blocks(conf: ConfigTree) -> list[ConfigTree]:
    out = []
    for kind in ("ssl", "wss"):
        for _, listener in (conf.get(f"listeners.{kind}", None) or {}).items():
            if isinstance(listener, ConfigTree) and "ssl_options" in listener:
                out.append(listener["ssl_options"])
    return out


def emqx_contract_ok(emqx_conf: str, base_hocon: str, env: dict[str, str]) -> ConfigTree:
    for text in (emqx_conf, base_hocon):
        no_single_quoted_strings(text)
        parse_hocon(text)
    conf = parse_hocon(emqx_conf)
    for ssl in _ssl_blocks(conf):
        if ssl.get("fail_if_no_peer_cert", False) is True:
            assert ssl.get("verify") == "verify_peer", "fail_if_no_peer_cert needs verify = verify_peer"
    tcp = conf.get("listeners.tcp.default")
    assert tcp.get("enable", True) is False or str(tcp.get("bind")).startswith("127.0.0.1:"), tcp
    assert conf.get("authorization.no_match") == "deny"
    sources = conf.get("authorization.sources")
    assert [s.get("type") for s in sources] == ["postgresql"], sources
    node = conf.get("node.name")
    assert _NODE.match(node), f"node name {node!r}: name@host.with.dot, no digit before @"
    assert env.get("EMQX_NODE__COOKIE") not in (None, "", "emqxsecretcookie", "emqx50elixir")
    assert env.get("EMQX_DASHBOARD__DEFAULT_PASSWORD") not in (None, "", "public", "admin")
    return conf


def env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def compose_env_escaped(compose_yaml: str) -> None:
    """Every ``$`` in a compose environment value is doubled, or compose substitutes it away."""
    doc = yaml.safe_load(compose_yaml)
    for service in doc["services"].values():
        env = service.get("environment") or {}
        values = env.values() if isinstance(env, dict) else [e.partition("=")[2] for e in env]
        for value in values:
            assert "$" not in str(value).replace("$$", ""), f"unescaped $ in compose env: {value}"
