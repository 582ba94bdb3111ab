-- TimescaleDB variant: hypertable, compression, retention, hourly continuous aggregate.
-- Policies have no background worker in every environment (the WASM build used in tests has none);
-- they are plain jobs that `CALL run_job(id)` can drive.
CREATE EXTENSION IF NOT EXISTS timescaledb;

SELECT create_hypertable('telemetry', by_range('time', INTERVAL '1 day'), migrate_data => true);

-- Segment by device: queries are per device, and a segment compresses a device's series together.
ALTER TABLE telemetry SET (
  timescaledb.compress,
  timescaledb.compress_segmentby = 'device',
  timescaledb.compress_orderby = 'metric, time DESC'
);
SELECT add_compression_policy('telemetry', INTERVAL '7 days');
SELECT add_retention_policy('telemetry', INTERVAL '400 days');

CREATE MATERIALIZED VIEW telemetry_hourly WITH (timescaledb.continuous) AS
  SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, device, metric,
         avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS samples
  FROM telemetry
  GROUP BY 1, 2, 3
WITH NO DATA;
SELECT add_continuous_aggregate_policy('telemetry_hourly',
  start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
  schedule_interval => INTERVAL '30 minutes');

GRANT SELECT ON telemetry_hourly TO telemetry_readonly;
