# Staging: production's stack on smaller hosts; its own secrets in group_data/staging.vault.yml.
environment = "staging"
# Operators' networks allowed to SSH in (documentation range: replace with yours).
ssh_allowed_from = ["198.51.100.0/24"]
# Small hosts: fewer connections, smaller database pool.
emqx_max_connections = 20000
database_max_connections = 100
