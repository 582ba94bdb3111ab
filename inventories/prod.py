# Production: one host runs broker, ingest and database (the design's single-host first step).
# Replace the example name with your host's FQDN; it becomes the EMQX node name (emqx@<fqdn>), so
# keep it stable. SSH user/port come from host data here or ~/.ssh/config.
_host = (
    "telemetry.example.net",
    {
        "ssh_user": "ops",
        "ssh_port": 22,
    },
)

brokers = [_host]
databases = [_host]
ingest = [_host]
prod = [_host]
