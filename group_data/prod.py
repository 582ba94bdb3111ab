# Production: the product's defaults from all.py (EMQX + TimescaleDB from Docker's repository).
# Secrets: group_data/prod.vault.yml (create with `ansible-vault create`, see README, "Deploying").
environment = "prod"
# Operators' networks allowed to SSH in (documentation range: replace with yours).
ssh_allowed_from = ["198.51.100.0/24"]
