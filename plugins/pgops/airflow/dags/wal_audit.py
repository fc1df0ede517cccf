"""DAG factory: pgops_wal_audit__<cluster> (WAL continuity, lifecycle vs retention, freshness, hardening)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgops.airflow.dags.common import dag_tags, default_args, pgops_dag
from pgops.airflow.operators.audit import WalArchiveAuditOperator
from pgops.inventory import Cluster

DAG_ID_PREFIX = "pgops_wal_audit__"
PRESET_CRONS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
                "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}


def _schedule(cluster: Cluster):
    cron = cluster.schedule.audit
    if cron == "@once":
        return "@once"
    return CronTriggerTimetable(PRESET_CRONS.get(cron, cron), timezone=cluster.schedule.timezone)


def build_wal_audit_dag(cluster: Cluster) -> DAG:
    with pgops_dag(
        dag_id=f"{DAG_ID_PREFIX}{cluster.name}",
        description=f"Audit the WAL archive and bucket lifecycle of {cluster.name} in "
                    f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/",
        schedule=_schedule(cluster),
        start_date=pendulum.datetime(2024, 1, 1, tz=cluster.schedule.timezone),
        catchup=False,
        max_active_runs=1,
        # a critical finding fails at once (AirflowFailException); retries cover transient S3/PG errors
        default_args=default_args(cluster, retries=1),
        tags=dag_tags(cluster, "audit"),
        params={
            "cluster": Param(cluster.name, type="string", const=cluster.name, description="Inventory cluster"),
            "apply_lifecycle": Param(False, type="boolean",
                                     description="Put the recommended bucket lifecycle configuration"),
        },
        doc_md=__doc__,
    ) as dag:
        WalArchiveAuditOperator(task_id="audit", cluster_name=cluster.name,
                                apply_lifecycle="{{ params.apply_lifecycle }}",
                                execution_timeout=timedelta(minutes=50))
    return dag
