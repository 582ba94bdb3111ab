# Only the Docker engine and compose (where the host's stacks need them).
from pyinfra import host

from roles.plan import docker_roles

for role in docker_roles(host):
    role()
