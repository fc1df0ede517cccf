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
fi
# Password logins only from the network that must reach PostgreSQL (dbnet: the Airflow workers and triggerer),
# rewritten at every start; a volume from an older image loses its "0.0.0.0/0" line here.
client_cidr=${PGOPS_PG_CLIENT_CIDR:?PGOPS_PG_CLIENT_CIDR is not set (the dbnet subnet)}
case "$client_cidr" in
  0.0.0.0/0|::/0|*[!0-9./]*) echo "PGOPS_PG_CLIENT_CIDR=$client_cidr: give the dbnet subnet, e.g. 172.29.57.0/24" >&2; exit 1;;
esac
sed -i -e '/# pgops-dbhost$/d' -e '/^host all postgres 0\.0\.0\.0\/0 /d' "$PGDATA/pg_hba.conf"
echo "host all postgres $client_cidr scram-sha-256 # pgops-dbhost" >> "$PGDATA/pg_hba.conf"

# archive_command from the inventory (bucket, prefix, server name, compression, the background pusher), as
# `pgops archive-command` prints it, quoted with shlex.
archive_command=$(python -c '
import os, shlex
from pgops.dbhost.engines import barman_cloud
from pgops.inventory import load_inventory
cluster = load_inventory().get(os.environ.get("PGOPS_DBHOST_CLUSTER", "main"))
argv = barman_cloud.archive_command_argv(cluster, endpoint_url=os.environ.get("PGOPS_ARCHIVE_ENDPOINT") or None)
print(shlex.join(argv) + " %p")')
listen=${PGOPS_PG_LISTEN:?PGOPS_PG_LISTEN is not set (localhost and the dbnet address)}
case "${PGOPS_PG_PORT:-5432}" in *[!0-9]*|'') echo "PGOPS_PG_PORT=${PGOPS_PG_PORT:-}: give a port number" >&2; exit 1;; esac
case "$listen" in
  *'*'*|*0.0.0.0*|*[!A-Za-z0-9.,:-]*) echo "PGOPS_PG_LISTEN=$listen: name addresses, not '*' or 0.0.0.0" >&2; exit 1;;
esac
cat > "$PGDATA/pgops-dbhost.conf" <<CONF
# written by docker/dbhost-entrypoint.sh at every start
listen_addresses = '${listen}'
port = ${PGOPS_PG_PORT:-5432}
wal_level = replica
archive_mode = on
archive_timeout = 60
archive_command = '${archive_command//\'/\'\'}'
CONF
chown postgres:postgres "$PGDATA/pgops-dbhost.conf"
grep -q "include 'pgops-dbhost.conf'" "$PGDATA/postgresql.conf" || echo "include 'pgops-dbhost.conf'" >> "$PGDATA/postgresql.conf"

# PostgreSQL starts with a minimal environment: the path, the locale, PGDATA and the DB host's own S3 identity for
# archive_command. Never the container's AIRFLOW__* secrets, connection URIs or passwords: any superuser can read
# the postmaster's environment (pg_read_file('/proc/self/environ')).
pg_env=(env -i "PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin" "LANG=${LANG:-C.UTF-8}"
        "HOME=/var/lib/postgresql" "PGDATA=$PGDATA" "AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}")
for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_CA_BUNDLE; do
  if [ -n "${!name:-}" ]; then pg_env+=("$name=${!name}"); fi
done
runuser -u postgres -- "${pg_env[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/../postgres.log" -w -t 120 start
trap 'runuser -u postgres -- "${pg_env[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop' EXIT
runuser -u postgres -- "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child" || true
wait "$child" 2>/dev/null || true
