-- Least-privilege group roles (NOLOGIN). Deploys create LOGIN users and grant them one of these.
-- Roles are cluster-wide, so create them only when missing (several databases may share a cluster).
DO $$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['telemetry_broker', 'telemetry_ingest', 'telemetry_provisioner',
                           'telemetry_readonly'] LOOP
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO telemetry_broker, telemetry_ingest, telemetry_provisioner,
  telemetry_readonly;

-- The broker reads exactly what its authn/authz queries need: not mosquitto_hash, not devices.
GRANT SELECT (username, password_hash, salt, is_superuser, enabled, expires_at)
  ON device_credentials TO telemetry_broker;
GRANT SELECT (username, rule_order, permission, action, topic, qos, retain)
  ON device_acl TO telemetry_broker;

-- Ingest: append telemetry and dead letters, register new metric names, touch device liveness.
GRANT SELECT ON devices, metrics TO telemetry_ingest;
GRANT INSERT ON telemetry, rejected_messages, metrics TO telemetry_ingest;
GRANT UPDATE (status, status_at, last_seen_at) ON devices TO telemetry_ingest;

-- Provisioning API / CLI: manage accounts; no access to telemetry.
GRANT SELECT, INSERT, UPDATE, DELETE ON devices, device_credentials, device_acl
  TO telemetry_provisioner;

-- Dashboards: data and inventory, never credentials.
GRANT SELECT ON telemetry, metrics, devices, rejected_messages, telemetry_named
  TO telemetry_readonly;
