"""Airflow DAGs pgops_ebs_migration__<cluster>: one manually triggered EBS migration dag per inventory cluster."""

from pgops.airflow.dags.ebs_migration import build_ebs_migration_dag
from pgops.inventory import load_inventory

for _cluster in load_inventory().clusters:
    globals()[f"pgops_ebs_migration__{_cluster.name}"] = build_ebs_migration_dag(_cluster)
