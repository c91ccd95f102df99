#!/usr/bin/env bash
# Installs (Debian's postgresql, version 15) and starts a local PostgreSQL
# for the store tests, creates the superuser role "root" and its database
# "root" when missing, and prints the DATABASE_URL to use:
#
#   export HYPHAE_TEST_DATABASE_URL=$(scripts/postgres.sh)
#
# Idempotent: a second run installs, starts and creates nothing. Progress
# goes to stderr, so that stdout is only the URL.
set -euo pipefail
version=15
cluster=main
socket_dir=/var/run/postgresql

# setup's stdout goes to stderr (see the end): whatever the tools print
# ("Removed stale pid file." from pg_ctlcluster after an unclean shutdown
# once ended up inside the URL), and nothing it starts holds the stdout of
# $(postgres.sh) open.
setup() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: needs root (apt-get, pg_ctlcluster)" >&2
    exit 1
  fi
  if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "install ok installed"; then
    echo "postgres.sh: installing postgresql" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c { found = 1 } END { exit !found }'; then
    echo "postgres.sh: creating cluster $version/$cluster" >&2
    pg_createcluster "$version" "$cluster" >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c && $4 == "online" { found = 1 } END { exit !found }'; then
    echo "postgres.sh: starting cluster $version/$cluster" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start
  fi
  # Wait (bounded) until the server accepts connections.
  for _ in $(seq 1 60); do
    pg_isready -q -h "$socket_dir" && break
    sleep 0.5
  done
  pg_isready -q -h "$socket_dir" || { echo "postgres.sh: server did not become ready" >&2; exit 1; }

  psql_pg() { su postgres -c "psql -h $socket_dir -tAq -v ON_ERROR_STOP=1 $*"; }
  if [ "$(psql_pg "-c \"SELECT 1 FROM pg_roles WHERE rolname = 'root'\"")" != 1 ]; then
    echo "postgres.sh: creating role root" >&2
    psql_pg "-c 'CREATE ROLE root SUPERUSER LOGIN'"
  fi
  if [ "$(psql_pg "-c \"SELECT 1 FROM pg_database WHERE datname = 'root'\"")" != 1 ]; then
    echo "postgres.sh: creating database root" >&2
    psql_pg "-c 'CREATE DATABASE root OWNER root'"
  fi
}
setup >&2
echo "postgres:///root?host=$socket_dir"
