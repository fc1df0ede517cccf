#!/usr/bin/env bash
# One-shot set-up for docker compose (runs as root in the Airflow image, then exits 0):
# shared directories, the metadata DB, the login (FAB roles and the admin), pools from the inventory, connection check.
set -euo pipefail
uid=${AIRFLOW_UID:-50000}
mkdir -p /opt/airflow/logs
chown -R "$uid:0" /opt/airflow/logs
chmod -R g+rwX /opt/airflow/logs

airflow db migrate   # Airflow's tables and the FAB auth manager's (users, roles)
# The pgops roles from the inventory, then the admin (FAB role Admin); the password is read from the environment.
python -m pgops.airflow.fab_roles sync
python -m pgops.airflow.fab_roles user --username admin --role Admin --password-env AIRFLOW_ADMIN_PASSWORD
python -m pgops.airflow.deploy init --pools-file /tmp/pgops-pools.json
airflow pools import /tmp/pgops-pools.json
airflow version
