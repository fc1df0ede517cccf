"""Airflow DAGs pgops_wal_audit__<cluster>: one WAL archive and bucket lifecycle audit DAG per inventory cluster."""

from pgops.airflow.dags.wal_audit import build_wal_audit_dag
from pgops.inventory import load_inventory

for _cluster in load_inventory().clusters:
    globals()[f"pgops_wal_audit__{_cluster.name}"] = build_wal_audit_dag(_cluster)
