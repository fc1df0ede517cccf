"""Airflow DAGs pgops_standby_rebuild__<cluster>: one manual standby-rebuild DAG per cluster with standbys."""

from pgops.dags.standby_rebuild import build_standby_rebuild_dag
from pgops.inventory import load_inventory

for _cluster in load_inventory().clusters:
    if _cluster.replication is not None and _cluster.replication.standbys:
        globals()[f"pgops_standby_rebuild__{_cluster.name}"] = build_standby_rebuild_dag(_cluster)
