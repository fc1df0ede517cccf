"""Airflow DAGs pgops_restore_verify__<cluster>: one restore-verification DAG per inventory cluster."""

from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.inventory import load_inventory

for _cluster in load_inventory().clusters:
    globals()[f"pgops_restore_verify__{_cluster.name}"] = build_restore_verify_dag(_cluster)
