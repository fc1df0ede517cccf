"""Airflow DAGs pgops_base_backup__<cluster>: one nightly base-backup DAG per inventory cluster."""

from pgops.airflow.dags.base_backup import build_base_backup_dag
from pgops.inventory import load_inventory

for _cluster in load_inventory().clusters:
    globals()[f"pgops_base_backup__{_cluster.name}"] = build_base_backup_dag(_cluster)
