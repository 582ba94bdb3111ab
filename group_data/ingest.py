# Hosts running the ingest workers (the ingest role arrives with a later issue). They share one MQTT
# shared subscription, so adding a host here adds throughput without configuration elsewhere.
ingest_shared_group = "ingest"
