# The throwaway lab target (a Debian 12 container or VM on the CI machine): the small-site stack
# (Mosquitto + PostgreSQL from apt, Docker from Debian) so it runs where images cannot be pulled.
environment = "lab"
broker_backend = "mosquitto"
database_backend = "postgresql"
docker_source = "debian"
# The lab uses the CI vault (random test secrets, never used elsewhere); see tests/fixtures/vault.
vault_dir = "tests/fixtures/vault"
# The lab is reached through a port on 127.0.0.1 only, so SSH may come from anywhere it can.
ssh_allowed_from = []
# The lab logs in as root with a key; keep that possible.
ssh_permit_root_login = "prohibit-password"
