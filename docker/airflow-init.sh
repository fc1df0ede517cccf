#!/usr/bin/env bash
# One-shot set-up for docker compose (runs as root in the Airflow image, then exits 0):
# shared directories, the metadata DB, the admin password, pools from the inventory, connection check.
set -euo pipefail
uid=${AIRFLOW_UID:-50000}
mkdir -p /opt/airflow/logs /opt/airflow/auth
chown -R "$uid:0" /opt/airflow/logs /opt/airflow/auth
chmod -R g+rwX /opt/airflow/logs
chmod 0750 /opt/airflow/auth

# SimpleAuthManager reads admin's password from this file; the value comes from .env.
python - <<'PY'
import json, os
path = "/opt/airflow/auth/passwords.json"
with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "w") as fh:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, fh)
PY
chown "$uid:0" /opt/airflow/auth/passwords.json

airflow db migrate
python -m pgops.deploy init --pools-file /tmp/pgops-pools.json
airflow pools import /tmp/pgops-pools.json
airflow version
