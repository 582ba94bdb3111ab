# Defaults for every host: each setting the roles read, with why it has its value.
# Per-group files (prod.py, lab.py, brokers.py, ...) override these; inventories override per host.
# Secrets are NOT here: they live in <vault_dir>/*.vault.yml (ansible-vault), read by roles/secrets.py.
# Rule for this file: only plain data at module level -- no imports, no temporaries -- because pyinfra
# exports every top-level name as host data (tests/unit/test_inventories.py checks it).

# --- which backends and roles ----------------------------------------------------------------------
# Broker implementation on hosts of the "brokers" group: "emqx" (Docker compose) or "mosquitto" (apt).
broker_backend = "emqx"
# Database implementation on hosts of the "databases" group: "timescaledb" (compose) or "postgresql" (apt).
database_backend = "timescaledb"
# Where Docker comes from: "docker-ce" (Docker's apt repo, compose v2 plugin) or "debian"
# (docker.io + docker-compose from the distribution; compose v1, no `up --wait`).
docker_source = "docker-ce"

# --- secrets ----------------------------------------------------------------------------------------
# Folder holding all.vault.yml and <group>.vault.yml, relative to the repository root.
vault_dir = "group_data"

# --- base host --------------------------------------------------------------------------------------
# Extra packages every host gets (tools an operator expects when logged in at 3 a.m.).
base_packages = ["ca-certificates", "curl", "gnupg", "htop", "jq", "less", "rsync", "sudo", "vim-tiny"]
# Login used by operators; gets sudo without password (it has no password: keys only).
admin_user = "ops"
# Public SSH keys of the operators allowed in as admin_user. Public keys are not secrets.
admin_ssh_keys = []
# Root may log in with a key only ("prohibit-password") or not at all ("no").
ssh_permit_root_login = "prohibit-password"
# Port sshd listens on; ufw opens it only to ssh_allowed_from. (Not `ssh_port`: that one is how
# pyinfra connects, which differs when the host sits behind a forwarded port, as the lab does.)
sshd_port = 22
# Networks allowed to reach SSH (CIDR). Empty means anywhere -- acceptable only for a lab.
ssh_allowed_from = []
# TCP ports open to the world on every host: HTTP for ACME challenges and the provisioning API.
firewall_public_tcp_ports = [80, 443]
# fail2ban: bans after this many failed SSH logins within findtime, for bantime.
fail2ban_maxretry = 5
fail2ban_findtime = "10m"
fail2ban_bantime = "1h"
# Unattended upgrades: security updates only; reboot is left to operators (brokers hold sessions).
unattended_upgrades_reboot = False
# Time zone of the hosts; UTC keeps logs and telemetry timestamps comparable across sites.
timezone = "Etc/UTC"
# NTP servers for systemd-timesyncd; the distribution's pool is the fallback.
ntp_servers = ["0.debian.pool.ntp.org", "1.debian.pool.ntp.org"]
# Kernel tuning for many MQTT connections; applied only where /proc/sys is writable.
sysctl_settings = {
    "fs.file-max": 2097152,
    "fs.nr_open": 2097152,
    "net.core.somaxconn": 32768,
    "net.ipv4.tcp_max_syn_backlog": 16384,
    "net.core.netdev_max_backlog": 16384,
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.core.rmem_default": 262144,
    "net.core.wmem_default": 262144,
    "net.core.rmem_max": 16777216,
    "net.core.wmem_max": 16777216,
    "net.ipv4.tcp_rmem": "1024 4096 16777216",
    "net.ipv4.tcp_wmem": "1024 4096 16777216",
}
# Open-files limit for services (systemd DefaultLimitNOFILE); one MQTT connection is one descriptor.
nofile_limit = 1048576

# --- docker -----------------------------------------------------------------------------------------
# json-file log rotation: containers must not fill the disk.
docker_log_max_size = "20m"
docker_log_max_file = 5
# Docker's release key fingerprint; the downloaded key is checked against it before apt trusts it.
docker_apt_key_fingerprint = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
# Where compose projects live on the host (one folder per project).
compose_root = "/srv/telemetry"

# --- TLS (files placed by the certbot role; see README, "Deploying") ---------------------------------------
# Certificate chain and private key the MQTT listeners serve (readable by uid 1000 for EMQX).
tls_dir = "/etc/telemetry/tls"
tls_cert_file = "/etc/telemetry/tls/fullchain.pem"
tls_key_file = "/etc/telemetry/tls/privkey.pem"

# --- MQTT, shared by both brokers -------------------------------------------------------------------
# The ingest service's messages per database batch; the broker's in-flight window must exceed it.
ingest_batch_size = 500
# QoS 1/2 messages in flight per session. At least twice ingest_batch_size so a batch being written
# never stalls delivery of the next one (checked by the broker roles).
mqtt_max_inflight = 2000
# Messages queued per offline/slow session before the oldest QoS 0 messages are dropped.
mqtt_max_queued = 10000
# Largest accepted packet; telemetry is small, anything bigger is a misbehaving device.
mqtt_max_packet_size = "1MB"
# Loopback plain-TCP listener for the co-located ingest service (no TLS inside the host).
mqtt_loopback_port = 1883
# Public TLS listeners.
mqtt_tls_port = 8883
mqtt_wss_port = 8084

# --- EMQX -------------------------------------------------------------------------------------------
# Pinned image: the contract (shared/emqx-5.8-contract.md) was verified against this exact release.
emqx_image = "emqx/emqx:5.8.8"
# The part of the node name before "@". Must not end in a digit: EMQX derives the distribution port
# from a trailing number (emqx1 -> 4371).
emqx_node_short_name = "emqx"
# Cluster name shared by all nodes of one broker group.
emqx_cluster_name = "telemetry"
# Dashboard/REST API port, bound to 127.0.0.1 only (reach it through an SSH tunnel).
emqx_dashboard_port = 18083
# How many connections the TLS listeners accept (per node).
emqx_max_connections = 500000
# Password hashing EMQX applies to device_credentials; MUST match what provisioning writes (its
# default, see README and ingest/hashing.py; tests/unit/test_roles_broker_emqx.py checks they agree).
# Spec format (ingest/hashing.py): "<simple>[:<salt_position>]", "pbkdf2:<mac_fun>:<iterations>[:<dk_length>]",
# "bcrypt[:<rounds>]".
emqx_password_hash = "sha256:prefix"  # noqa: S105 -- an algorithm, not a password
# Connection pool from each EMQX node to PostgreSQL for authn/authz queries.
emqx_db_pool_size = 8
# Login users the broker and ingest use (members of the group roles the migrations create).
db_broker_user = "emqx_auth"
db_ingest_user = "ingest"
db_provisioner_user = "provisioner"
# EMQX log level on the console (docker logs); UI-editable (base.hocon).
emqx_log_level = "warning"

# --- Mosquitto --------------------------------------------------------------------------------------
# Where the password and ACL files go; Mosquitto re-reads them on SIGHUP.
mosquitto_passwd_file = "/etc/mosquitto/telemetry.passwd"  # noqa: S105 -- a path
mosquitto_acl_file = "/etc/mosquitto/telemetry.acl"
# provision CLI on the host (installed by the ingest role) that exports those files from the database.
provision_bin = "/opt/telemetry/venv/bin/provision"
# Seconds between writes of the in-memory store to disk (persistence is always on).
mosquitto_autosave_interval = 60
# How often a timer exports device accounts changed since the last deploy (devices registered through
# the provisioning API) to Mosquitto's files: the longest a new device waits before it may connect.
mosquitto_accounts_sync_interval = "30s"

# --- database ---------------------------------------------------------------------------------------
# Pinned TimescaleDB image (TimescaleDB 2.x on PostgreSQL 15).
timescaledb_image = "timescale/timescaledb:2.17.2-pg15"
# PostgreSQL major from apt for the "postgresql" backend (Debian 12 ships 15).
postgresql_version = 15
# Database name the platform uses.
database_name = "telemetry"
# Address the database listens on for other hosts; 127.0.0.1 = this host only.
database_listen_address = "127.0.0.1"
database_port = 5432
# Share of memory for shared_buffers / effective_cache_size (PostgreSQL tuning rule of thumb).
database_shared_buffers_ratio = 0.25
database_effective_cache_ratio = 0.75
# Fallback when the host's memory cannot be read (chroot, image build), in MiB.
database_memory_fallback_mib = 2048
database_max_connections = 200
# Networks (CIDR) allowed to connect with a password besides loopback; empty = loopback only.
database_allowed_networks = []
# ingest CLI on the host (installed by the ingest role) that applies the schema migrations.
ingest_bin = "/opt/telemetry/venv/bin/ingest"

# === nginx and certbot (roles/nginx.py, roles/certbot.py; README, "TLS: nginx and certbot") ===
# Names the HTTPS certificates cover; empty means the host's fqdn. The first one names the lineages.
tls_domains = []
# ACME directory: "letsencrypt", "letsencrypt-staging" (untrusted certificates, generous rate limits)
# or the URL of any ACME server (a test server such as Pebble).
acme_server = "letsencrypt"
# Contact address of the ACME account (expiry warnings); empty registers without one.
acme_email = ""
# Folder nginx serves at /.well-known/acme-challenge/ on port 80 (HTTP-01 challenges, no downtime).
acme_webroot = "/var/www/acme"
# Where nginx reads its two certificates (ecdsa/ and rsa/): self-signed until the first issuance,
# then copies the certbot deploy hook installs after `nginx -t` accepts them.
nginx_tls_dir = "/etc/nginx/tls"
# The ingest service's HTTP API (provisioning, health) nginx proxies /v1/ and /healthz to; the same
# address as the `listen` of the ingest service's [http] config.
ingest_http_address = "127.0.0.1:8081"
# API requests per second per client address. A client may spend one second's allowance at once
# (burst = rate - 1), so the (rate + 1)-th request within a second is refused with 429.
nginx_api_rate = 10
# Strict-Transport-Security max-age in seconds (2 years; HSTS preload asks for at least 1).
nginx_hsts_max_age = 63072000
# OCSP stapling: used when the chain names an OCSP responder (Let's Encrypt stopped in 2025; nginx
# then logs that stapling is ignored). The resolvers let nginx reach the responder.
nginx_ocsp_stapling = True
nginx_resolvers = ["1.1.1.1", "9.9.9.9"]
# EMQX dashboard through nginx: a path such as "/emqx/" served only to the networks (CIDR) in the
# allowlist. Empty path (the default): not public; use an SSH tunnel to 127.0.0.1:emqx_dashboard_port.
nginx_emqx_dashboard_path = ""
nginx_emqx_dashboard_allow = []
# Which lineage the MQTT listeners serve (one certificate per broker listener): "rsa" or "ecdsa".
# RSA by default because some device TLS stacks (older cellular modules) lack ECDSA.
broker_tls_key_type = "rsa"
# logrotate for the platform's own logs in logrotate_log_dir: weekly, or sooner past the size; keep N.
logrotate_log_dir = "/var/log/telemetry"
logrotate_max_size = "50M"
logrotate_keep = 8

# === monitoring (roles/monitoring.py; README, "Monitoring") ===
# Where Prometheus, Alertmanager and the exporters listen. Loopback: the exporters have no
# authentication, so the bind address -- not only the firewall -- keeps them private; people reach
# the UIs through an SSH tunnel. The role refuses addresses on every interface (0.0.0.0, ::).
prometheus_listen_address = "127.0.0.1:9090"
alertmanager_listen_address = "127.0.0.1:9093"
node_exporter_listen_address = "127.0.0.1:9100"
postgres_exporter_listen_address = "127.0.0.1:9187"
# Folder node exporter's textfile collector reads (Debian's default). backup, restore --drill and
# healthcheck write their *.prom files there: textfile_dir in /etc/telemetry/ops.yml names the same one.
node_exporter_textfile_dir = "/var/lib/prometheus/node-exporter"
# How often Prometheus scrapes and evaluates the alert rules, and how long it keeps samples.
prometheus_scrape_interval = "15s"
prometheus_retention = "30d"
# Where alerts go: Alertmanager's and the health check's (scripts/healthcheck.py) recipients. One
# address or a list; a generic JSON webhook (http/https). Both empty: Alertmanager routes to a null
# receiver (alerts visible only in its UI) -- acceptable for a lab, not for production.
alert_email = []
alert_webhook_url = ""
# Sender of alert e-mails; empty means alertmanager@<host name>.
alert_email_from = ""
# SMTP relay for alert e-mails. Debian 12 installs no local MTA, so set a real relay where
# alert_email is used; STARTTLS is off only for a relay on localhost.
alert_smtp_host = "localhost"
alert_smtp_port = 25
alert_smtp_starttls = False
# SMTP login, if the relay wants one; its password is the vault key alert_smtp_password.
alert_smtp_username = ""
# Alert thresholds, shared by the Prometheus rules and the health check (README, "Health checks and
# alerts"). Certificates: days left before expiry (warning, critical).
alert_cert_warn_days = 21
alert_cert_crit_days = 7
# Disk and memory use in percent (warning, critical).
alert_disk_warn_percent = 70
alert_disk_crit_percent = 85
alert_memory_warn_percent = 60
alert_memory_crit_percent = 85
# Hours without a verified backup before it is critical (a daily backup plus two hours of slack).
alert_backup_max_age_hours = 26
# Prometheus only: messages waiting in the ingest service above which a growing backlog alerts, and
# the share of rejected messages (0.05 = 5 %) above which devices are probably misbehaving.
alert_ingest_backlog = 1000
alert_rejected_ratio = 0.05

# === ingest service (roles/ingest.py; README, "The ingest service on a host") ===
# CPython of the hosts' distribution (Debian 12: 3.11). The wheelhouse is downloaded for it, and the
# deploy stops with a clear message on a host whose python3 differs.
ingest_host_python = "3.11"
# glibc of the hosts (Debian 12: 2.36): the newest manylinux tag a downloaded wheel may require.
ingest_host_glibc = "2.36"
# Where the project's wheel, its dependency wheels and their lock file are uploaded; pip installs from
# here with --no-index, so hosts need no route to PyPI.
ingest_wheelhouse_dir = "/opt/telemetry/wheelhouse"
# The host virtualenv: bin/ holds ingest, provision and the telemetry-* host scripts (ingest_bin and
# provision_bin above point into it). Root-owned, world-readable: the postgres user runs migrations from it.
ingest_venv_dir = "/opt/telemetry/venv"
# Dedicated system user (and group) the service runs as; only this group may read its secret files.
ingest_service_user = "telemetry-ingest"
# The service's configuration file, and the folder of its secret files (0640 root:<service group>).
ingest_config_file = "/etc/telemetry/ingest.toml"
ingest_secrets_dir = "/etc/telemetry/ingest"
# The service's MQTT account: created or refreshed by every deploy from the vault's mqtt_ingest_password.
ingest_mqtt_username = "ingest"
# Broker the service reads from. On 127.0.0.1 it uses the broker's plain loopback listener
# (mqtt_loopback_port); any other address gets TLS on mqtt_tls_port, verified by the system CAs.
ingest_mqtt_host = "127.0.0.1"
# MQTT client id (names the persistent session: unique and stable per worker). Empty: "ingest-" + the
# first label of the host's name.
ingest_mqtt_client_id = ""
# Subscribe through $share/<group>/... so several workers split the load ("" = a single worker). The
# ingest group sets it (group_data/ingest.py); see README, "Shared subscriptions", before using it with Mosquitto.
ingest_shared_group = ""
# Database host the service and its API connect to: loopback on a single host, the database's
# private_address on a cluster.
ingest_database_host = "127.0.0.1"
# SIGTERM bound: the service stops reading, commits and acknowledges what it holds within this many
# seconds. systemd waits ingest_stop_margin_s longer (TimeoutStopSec) before SIGKILL, for the process's
# own exit after the flush.
ingest_shutdown_timeout_s = 15
ingest_stop_margin_s = 10
# Serve POST /v1/devices/register (nginx proxies /v1/ to ingest_http_address); the HMAC key is the
# vault's ingest_api_hmac_key, the database login the provisioner's.
ingest_api_enabled = True

# === operations (roles/ops.py; README, "On the host: configuration, cron, boot and shutdown") ===
# Alert recipients, SMTP relay, thresholds and the textfile folder are the monitoring section's
# (alert_*, node_exporter_textfile_dir): the scripts and Alertmanager notify alike.
# Seconds before a check that stays bad alerts again (one alert per check and cooldown, so a
# flapping check cannot flood the recipients; warning -> critical alerts at once).
health_alert_cooldown_seconds = 3600
# Mosquitto's MQTT account for the health check's $SYS round trip (created by the deploy with a
# password generated on the host; it may read $SYS/broker/uptime only). "" = no account: the health
# check then has no broker check and the boot check only asks for a CONNACK. EMQX needs none.
health_mqtt_user = "healthcheck"
# Encrypted archives, on database hosts (a backup needs the database dump). Keep the folder on a
# different disk than the database where one exists; the off-site copy covers losing the host.
backup_dir = "/var/backups/telemetry"
# Retention: the newest archive of each of the last N days and of the last M ISO weeks (about a
# month back at 7 + 4 archives).
backup_keep_daily = 7
backup_keep_weekly = 4
# Hour (host time, UTC) of the daily backup; the minute is derived from the host name. 03:xx: least
# traffic on most sites. Docker cleanup runs an hour later, the weekly restore drill two hours later.
backup_hour = 3
# Day of the weekly restore drill, 0 = Sunday ... 6 = Saturday (cron's numbering).
restore_drill_weekday = 0
# Off-site copy by rsync after each verified backup: "user@host:/path/" over SSH, or a local path
# (a mounted disk); "" = none. The SSH key and known_hosts file are the operator's to create (README).
backup_offsite_target = ""
backup_offsite_ssh_key = "/root/.ssh/telemetry_backup_ed25519"
backup_offsite_known_hosts = "/root/.ssh/known_hosts_telemetry_backup"
# Boot check: seconds each component (database, broker, ingest) gets to become healthy, before a
# restart and again after each; and restarts per component. 180 s covers EMQX's and TimescaleDB's
# start after an unclean shutdown; the unit's TimeoutStartSec follows from both.
boot_check_wait_seconds = 180
boot_check_restarts = 2
