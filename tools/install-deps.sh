#!/usr/bin/env bash
# Installs, idempotently, the Debian packages the tests and the lab need on a fresh
# Debian 12 / Ubuntu 22.04+ machine. Run as root (CI does); as a user it re-runs itself with sudo.
# One list, one place: later features add their packages here, not in ad-hoc test code.
set -euo pipefail

packages=(
  python3 python3-venv python3-dev build-essential   # the project's virtualenv
  postgresql-15 postgresql-client-15                 # real database for integration tests
  mosquitto mosquitto-clients                        # real MQTT broker for integration tests
  openssl ca-certificates
  docker-compose shellcheck openssh-server systemd debootstrap   # deploy validators + chroot test
  docker.io                                          # private dockerd for the lab target (tools/lab)
  prometheus prometheus-alertmanager rsync           # promtool/amtool validators, backup off-site test
  nginx pebble certbot logrotate                     # TLS front end, ACME flow, log rotation tests
)

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# node + npm run the TimescaleDB WASM build (pglite). A NodeSource nodejs already bundles npm and
# conflicts with Debian's npm package, so ask for the commands, not the packages.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)

# Ubuntu 22.04 ships PostgreSQL 14 only; PGDG is not reachable from CI, so there we fall back to
# whatever major the distribution has and the fixtures find it via pg_config / /usr/lib/postgresql.
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  # Packages must not start their daemons here (nginx on :80, dockerd, mosquitto, postgresql): tests
  # start their own on free loopback ports. policy-rc.d is Debian's switch for that; it is removed
  # again on exit, and an existing one (container images ship it) is left as it is.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    # postgresql-15 is not in every release: retry with the distribution's default major.
    fallback=("${missing[@]/postgresql-15/postgresql}")
    fallback=("${fallback[@]/postgresql-client-15/postgresql-client}")
    apt-get install -y -qq --no-install-recommends "${fallback[@]}" >/dev/null
  fi
else
  echo "install-deps: all Debian packages present"
fi

# The packaged services are not wanted running: tests start their own instances on free ports.
for svc in mosquitto postgresql; do
  if [ -d /run/systemd/system ] && systemctl is-active -q "$svc" 2>/dev/null; then
    systemctl disable --now -q "$svc" || true
  fi
done
