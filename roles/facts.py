"""Small facts the roles need that pyinfra does not ship. Each prints one easily faked line."""

from __future__ import annotations

from typing import Any

from pyinfra.api.facts import FactBase


class ProcSysWritable(FactBase[bool]):
    """Whether sysctls can be applied: ``/proc/sys`` is read-only in containers and absent in a bare
    chroot, where ``sysctl -p`` would fail the deploy."""

    def command(self) -> str:
        return "test -w /proc/sys/net/core/somaxconn && echo writable || echo read-only"

    def process(self, output: list[str]) -> bool:
        return bool(output) and output[0].strip() == "writable"


class MemTotalMiB(FactBase[int]):
    """Total memory in MiB, for database tuning. ``None`` when /proc/meminfo is unreadable."""

    def command(self) -> str:
        return "awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo 2>/dev/null || true"

    def process(self, output: list[str]) -> Any:
        for line in output:
            if line.strip().isdigit():
                return int(line.strip())
        return None


class MosquittoExport(FactBase[dict[str, str]]):
    """Mosquitto password + ACL files as produced by ``provision export-mosquitto`` on the host.

    Prints nothing when the CLI is not installed yet (the ingest role installs it) -- the caller then
    falls back to deny-all files. Output: the password file, a line ``--8<-- acl``, the ACL file."""

    def command(self, provision_bin: str, dsn: str, password_file: str) -> str:
        return (
            f"if [ -x {provision_bin} ] && [ -r {password_file} ]; then "
            f"{provision_bin} export-mosquitto --dsn '{dsn}' --password-file {password_file} "
            "--passwd-out - --acl-out - --separator '--8<-- acl'; fi"
        )

    def process(self, output: list[str]) -> Any:
        if not output:
            return None
        passwd: list[str] = []
        acl: list[str] = []
        target = passwd
        for line in output:
            if line.strip() == "--8<-- acl":
                target = acl
                continue
            target.append(line)
        return {"passwd": "\n".join(passwd) + "\n", "acl": "\n".join(acl) + "\n"}


class DockerNetworks(FactBase[list[str]]):
    """Names of the Docker networks (empty when Docker is not running)."""

    def command(self) -> str:
        return "docker network ls --format '{{.Name}}' 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]
