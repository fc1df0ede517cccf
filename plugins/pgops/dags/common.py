"""What every pgops DAG shares: default args, failure notifications, assets."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset

from pgops.inventory import Cluster

FAILURE_MESSAGE = (
    "pgops: {{ ti.dag_id }} / {{ ti.task_id }} failed (run {{ run_id }}, try {{ ti.try_number }}).\n"
    "{{ exception }}\n"
    "Cluster: {{ params.get('cluster', '') }}"
)


def failure_notifier(cluster: Cluster):
    """SNS notification to the cluster's alert topic (the Amazon provider's notifier), or None."""
    if not cluster.alerts.sns_topic_arn:
        return None
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

    region = cluster.alerts.sns_topic_arn.split(":")[3]
    return SnsNotifier(aws_conn_id=cluster.alerts_conn_id, target_arn=cluster.alerts.sns_topic_arn,
                       message=FAILURE_MESSAGE, subject=f"pgops failure: {cluster.name}", region_name=region)


def default_args(cluster: Cluster, **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "owner": "pgops",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    }
    notifier = failure_notifier(cluster)
    if notifier is not None:
        args["on_failure_callback"] = [notifier]
    args.update(overrides)
    return args


def backup_asset(cluster: Cluster) -> Asset:
    """Asset of a cluster's base backups; its events carry the backup's id, size, WAL range and times."""
    return Asset(name=f"pgops_backup__{cluster.name}",
                 uri=f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base",
                 group="pgops-backups")


def dag_tags(cluster: Cluster, kind: str) -> list[str]:
    return ["pgops", kind, f"cluster:{cluster.name}", *cluster.tags]
