"""Docker engine + compose: Docker's apt repository (Ubuntu/Debian), or Debian's own packages."""

from __future__ import annotations

import json

from pyinfra.facts.deb import DebArch
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt, files, server

from roles._base import Role, RoleError, render, role_deploy

KEYRING = "/etc/apt/keyrings/docker.asc"
DAEMON_JSON = "/etc/docker/daemon.json"


def daemon_json(max_size: str, max_file: int) -> str:
    text = render("docker/daemon.json.j2", max_size=max_size, max_file=max_file)
    json.loads(text)  # a syntax error here would stop dockerd from starting: fail the deploy instead
    return text


def compose_command(docker_source: str) -> str:
    """The compose CLI each source provides: the v2 plugin from Docker's repo, v1 from Debian 12."""
    return "docker compose" if docker_source == "docker-ce" else "docker-compose"


class Docker(Role):
    name = "docker"

    def install(self) -> None:
        source = self.data("docker_source")
        if source == "debian":
            apt.packages(
                name="docker: docker.io and docker-compose from the distribution",
                packages=["docker.io", "docker-compose"],
                no_recommends=True,
                update=True,
                cache_time=3600,
            )
            return
        if source != "docker-ce":
            raise RoleError(f"docker: docker_source must be 'docker-ce' or 'debian', not {source!r}")
        distro = self.host.get_fact(LinuxDistribution) or {}
        name = str(distro.get("name") or "").lower()
        codename = (distro.get("release_meta") or {}).get("VERSION_CODENAME") or "bookworm"
        distro_path = "ubuntu" if "ubuntu" in name else "debian"
        arch = self.host.get_fact(DebArch) or "amd64"
        apt.packages(name="docker: repository prerequisites", packages=["ca-certificates", "curl", "gnupg"])
        files.directory(name="docker: /etc/apt/keyrings", path="/etc/apt/keyrings", mode="0755")
        key = files.download(
            name="docker: release key",
            src=f"https://download.docker.com/linux/{distro_path}/gpg",
            dest=KEYRING,
            mode="0644",
        )
        fingerprint = self.data("docker_apt_key_fingerprint")
        # The key came over HTTPS; the fingerprint check makes a swapped key fail loudly before apt uses it.
        server.shell(
            name="docker: verify release key fingerprint",
            commands=[
                f"gpg --show-keys --with-colons {KEYRING} | grep -q '^fpr:::::::::{fingerprint}:' "
                f"|| {{ rm -f {KEYRING}; echo 'docker: release key fingerprint mismatch' >&2; exit 1; }}"
            ],
            _if=key.did_change,
        )
        repo = self.put(
            render("docker/docker.sources.j2", distro=distro_path, codename=codename, arch=arch, keyring=KEYRING),
            "/etc/apt/sources.list.d/docker.sources",
            key="repo",
        )
        apt.update(name="docker: apt update (repository added)", _if=repo.did_change)
        apt.packages(
            name="docker: engine and compose plugin",
            packages=["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"],
            no_recommends=True,
        )

    def configure(self) -> None:
        self.put(
            daemon_json(self.data("docker_log_max_size"), int(self.data("docker_log_max_file"))),
            DAEMON_JSON,
            key="daemon",
        )

    def activate(self) -> None:
        # live-restore keeps containers running while dockerd restarts for a daemon.json change.
        self.service("docker", restart_if=self.changed("daemon"))


docker = role_deploy(Docker)
