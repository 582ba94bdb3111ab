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


class InContainer(FactBase[bool]):
    """Whether the host is a container (the lab target): systemd skips units such as
    systemd-timesyncd there (ConditionVirtualization=!container), so "keep it running" would report a
    change on every deploy."""

    def command(self) -> str:
        return "systemd-detect-virt --container --quiet 2>/dev/null && echo container || echo host"

    def process(self, output: list[str]) -> bool:
        return bool(output) and output[0].strip() == "container"


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
    """Mosquitto password + ACL files as ``provision export-mosquitto`` renders them on the host.

    Exported into a private temporary folder and printed (password file, a ``--8<-- acl`` line, ACL
    file), so the deploy uploads them like any other file and knows whether they changed. Prints
    nothing when the CLI is not installed yet or the database does not answer."""

    def command(self, provision_bin: str, dsn: str, password_file: str) -> str:
        return (
            f"if [ -x {provision_bin} ] && [ -r {password_file} ]; then "
            "d=$(mktemp -d) && "
            f"{provision_bin} export-mosquitto --dsn '{dsn}' --password-file {password_file} "
            '--passwords "$d/passwd" --acl "$d/acl" >/dev/null 2>&1 && '
            'cat "$d/passwd" && echo \'--8<-- acl\' && cat "$d/acl"; rm -rf "$d"; fi; true'
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
        if target is passwd:
            return None  # incomplete output: keep the current files rather than upload half
        return {"passwd": "".join(f"{x}\n" for x in passwd), "acl": "".join(f"{x}\n" for x in acl)}


class DockerNetworks(FactBase[list[str]]):
    """Names of the Docker networks (empty when Docker is not running)."""

    def command(self) -> str:
        return "docker network ls --format '{{.Name}}' 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]
