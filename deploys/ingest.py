# Only the ingest service: the host virtualenv (hosts of databases, brokers, ingest), then on ingest
# hosts its account and the service. The database and broker must already be deployed.
from pyinfra import host

from roles.plan import ingest_roles

for stage in ingest_roles(host):
    for role in stage:
        role()
