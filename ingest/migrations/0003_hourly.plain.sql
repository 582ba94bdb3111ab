-- Plain PostgreSQL variant: the same relation name and columns as the continuous aggregate, computed
-- on read, so every query written against telemetry_hourly works on both backends.
CREATE VIEW telemetry_hourly AS
  SELECT date_trunc('hour', time) AS bucket, device, metric,
         avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS samples
  FROM telemetry
  GROUP BY 1, 2, 3;

GRANT SELECT ON telemetry_hourly TO telemetry_readonly;
