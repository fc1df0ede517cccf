"""Airflow DAGs pgops_standby_rebuild__<cluster>: one manual standby-rebuild DAG per cluster with standbys."""

from pgops.inventory import load_inventory

_clusters = [c for c in load_inventory().clusters if c.replication is not None and c.replication.standbys]
if _clusters:  # the factory (and the standby operators) load only where some cluster has standbys
    from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag

    for _cluster in _clusters:
        globals()[f"pgops_standby_rebuild__{_cluster.name}"] = build_standby_rebuild_dag(_cluster)
