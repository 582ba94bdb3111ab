# Multi-host example: 3 EMQX nodes (static-seed cluster), 2 ingest workers sharing one MQTT shared
# subscription, 1 TimescaleDB host. Rendered and validated by the tests; not deployed here.
# private_address: the address peers use (cluster ports, database); names are examples.
_brokers = [
    ("broker-a.cluster.example.net", {"private_address": "10.0.0.11"}),
    ("broker-b.cluster.example.net", {"private_address": "10.0.0.12"}),
    ("broker-c.cluster.example.net", {"private_address": "10.0.0.13"}),
]
_ingest = [
    ("ingest-a.cluster.example.net", {"private_address": "10.0.0.21"}),
    ("ingest-b.cluster.example.net", {"private_address": "10.0.0.22"}),
]
_databases = [
    ("db-a.cluster.example.net", {"private_address": "10.0.0.31"}),
]

brokers = _brokers
ingest = _ingest
databases = _databases
cluster_example = _brokers + _ingest + _databases
