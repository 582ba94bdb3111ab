# Only the operations side: ops.yml, backup key and cron jobs, the boot check and the shutdown order.
# The host virtualenv (deploys/ingest.py) must already be there: cron runs its telemetry-* scripts.
from pyinfra import host

from roles.ops import ops_roles

for role in ops_roles(host):
    role()
