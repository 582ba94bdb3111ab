"""Names and queries shared by the migrations, the provisioning library, the broker templates and tests.

One place for them ties the EMQX HOCON templates to the schema: the deploy renders these exact strings
into ``authentication``/``authorization``, and integration tests run them against real PostgreSQL.
"""

from __future__ import annotations

import re

# Group roles (NOLOGIN) created by the migrations; deploys create LOGIN users that are members.
ROLE_BROKER = "telemetry_broker"  # SELECT credentials and ACL rows, nothing else
ROLE_INGEST = "telemetry_ingest"  # write telemetry and dead letters, read devices/metrics
ROLE_PROVISIONER = "telemetry_provisioner"  # manage devices, credentials, ACLs (provisioning API)
ROLE_READONLY = "telemetry_readonly"  # dashboards: telemetry and device inventory, never secrets

# EMQX 5.8 postgresql authenticator: first row only; salt must never be NULL (contract section 3).
EMQX_AUTHN_QUERY = (
    "SELECT password_hash, salt, is_superuser FROM device_credentials "
    "WHERE username = ${username} AND enabled AND (expires_at IS NULL OR expires_at > now()) LIMIT 1"
)
# EMQX 5.8 postgresql authorizer: rows tried in result order, first match wins (contract section 4).
EMQX_AUTHZ_QUERY = (
    "SELECT permission, action, topic, qos, retain FROM device_acl WHERE username = ${username} ORDER BY rule_order"
)

_PLACEHOLDER = re.compile(r"\$\{([a-z_.]+)\}")


def emqx_query_to_psycopg(query: str) -> tuple[str, list[str]]:
    """Turn an EMQX query into a psycopg one the way EMQX prepares it: each ``${var}`` becomes a bound
    parameter (never text-substituted). Returns the SQL and the variable names in parameter order."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        names.append(m.group(1))
        return "%s"

    return _PLACEHOLDER.sub(sub, query), names
