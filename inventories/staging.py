# Staging: the same single-host layout as production, on a smaller host (see group_data/staging.py).
_host = (
    "telemetry.staging.example.net",
    {
        "ssh_user": "ops",
        "ssh_port": 22,
    },
)

brokers = [_host]
databases = [_host]
ingest = [_host]
staging = [_host]
