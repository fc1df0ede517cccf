#!/usr/bin/env bash
# dbhost container: initialise and start PostgreSQL 15 (WAL archived by barman-cloud into the cluster's
# prefix), then run the command (the Airflow Celery worker) as the postgres OS user.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/15/main}"
: "${PGOPS_DBHOST_CLUSTER:=main}"
PG_BIN=${PGOPS_PG_BIN:-/usr/lib/postgresql/15/bin}
install -d -o postgres -g postgres -m 0700 "$PGDATA"
install -d -o postgres -g postgres -m 0775 /var/run/postgresql
install -d -o postgres -g postgres -m 0755 "${PGOPS_RESTORE_SCRATCH_ROOT:-/var/tmp/pgops-restore}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp); chown postgres "$pwfile"; chmod 0600 "$pwfile"
  printf '%s\n' "${PGOPS_MAIN_PG_PASSWORD:?PGOPS_MAIN_PG_PASSWORD is not set}" > "$pwfile"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PGDATA" -U postgres --pwfile "$pwfile" \
    --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8
  rm -f "$pwfile"
  echo "host all postgres 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi

# archive_command from the inventory (bucket, prefix, server name, compression, the background pusher), as
# `pgops archive-command` prints it, quoted with shlex.
archive_command=$(python -c '
import os, shlex
from pgops.engines import barman_cloud
from pgops.inventory import load_inventory
cluster = load_inventory().get(os.environ.get("PGOPS_DBHOST_CLUSTER", "main"))
argv = barman_cloud.archive_command_argv(cluster, endpoint_url=os.environ.get("PGOPS_ARCHIVE_ENDPOINT") or None)
print(shlex.join(argv) + " %p")')
cat > "$PGDATA/pgops-dbhost.conf" <<CONF
# written by docker/dbhost-entrypoint.sh at every start
listen_addresses = '*'
wal_level = replica
archive_mode = on
archive_timeout = 60
archive_command = '${archive_command//\'/\'\'}'
CONF
chown postgres:postgres "$PGDATA/pgops-dbhost.conf"
grep -q "include 'pgops-dbhost.conf'" "$PGDATA/postgresql.conf" || echo "include 'pgops-dbhost.conf'" >> "$PGDATA/postgresql.conf"

# AWS_* from the container environment reach archive_command through the postmaster's environment.
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/../postgres.log" -w -t 120 start
trap 'runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop' EXIT
runuser -u postgres -- "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child" || true
wait "$child" 2>/dev/null || true
