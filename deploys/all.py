# Everything a host's groups ask for, in order: base, docker, database, broker.
# Usage: TELEMETRY_VAULT_PASSWORD_FILE=~/.telemetry-vault pyinfra inventories/prod.py deploys/all.py
from pyinfra import host

from roles.plan import all_roles

for role in all_roles(host):
    role()
