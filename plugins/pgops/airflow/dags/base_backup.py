"""DAG factory: pgops_base_backup__<cluster> (preflight → backup → verify + asset → retention)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgops.airflow.dags.common import backup_asset, dag_tags, default_args, pgops_dag, xcom
from pgops.airflow.deadlines import deadline_alerts
from pgops.airflow.operators.backup import (
    BackupPreflightOperator,
    BarmanCloudBackupOperator,
    BarmanCloudRetentionOperator,
    BarmanCloudVerifyBackupOperator,
)
from pgops.inventory import Cluster

DAG_ID_PREFIX = "pgops_base_backup__"


def build_base_backup_dag(cluster: Cluster) -> DAG:
    with pgops_dag(
        dag_id=f"{DAG_ID_PREFIX}{cluster.name}",
        description=f"Nightly barman-cloud base backup of {cluster.name} to "
                    f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/",
        schedule=CronTriggerTimetable(cluster.schedule.backup, timezone=cluster.schedule.timezone),
        start_date=pendulum.datetime(2024, 1, 1, tz=cluster.schedule.timezone),
        catchup=False,
        max_active_runs=1,
        render_template_as_native_obj=True,
        deadline=deadline_alerts(cluster, "backup"),
        default_args=default_args(cluster),
        tags=dag_tags(cluster, "backup"),
        params={
            "cluster": Param(cluster.name, type="string", const=cluster.name, description="Inventory cluster"),
            "retention_dry_run": Param(False, type="boolean",
                                       description="Only log what the retention policy would delete"),
        },
        doc_md=__doc__,
    ) as dag:
        preflight = BackupPreflightOperator(task_id="preflight", cluster_name=cluster.name,
                                            execution_timeout=timedelta(minutes=5))
        backup = BarmanCloudBackupOperator(
            task_id="backup", cluster_name=cluster.name, queue=cluster.runner.queue, pool=cluster.pool,
            preflight=xcom(preflight),
            execution_timeout=timedelta(seconds=cluster.engine.timeout_s + 600))
        verify = BarmanCloudVerifyBackupOperator(
            task_id="verify", cluster_name=cluster.name, queue=cluster.runner.queue,
            backup_id=xcom(backup), outlets=[backup_asset(cluster)],
            execution_timeout=timedelta(minutes=30))
        retention = BarmanCloudRetentionOperator(
            task_id="retention", cluster_name=cluster.name, queue=cluster.runner.queue, pool=cluster.pool,
            dry_run="{{ params.retention_dry_run }}", execution_timeout=timedelta(hours=1))
        preflight >> backup >> verify >> retention
    return dag
