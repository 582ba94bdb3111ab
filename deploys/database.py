# Only the database backend of hosts in the "databases" group (TimescaleDB or PostgreSQL).
from pyinfra import host

from roles.plan import database_roles

for role in database_roles(host):
    role()
