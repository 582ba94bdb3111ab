# The multi-host example (3 brokers, 2 ingest workers, 1 database): renders and validates in tests,
# not deployed here. The database listens on the private network for the broker and ingest hosts.
environment = "cluster-example"
ssh_allowed_from = ["198.51.100.0/24"]
database_listen_address = "0.0.0.0"  # noqa: S104 -- ufw admits only the listed peers
database_allowed_networks = ["10.0.0.0/24"]
