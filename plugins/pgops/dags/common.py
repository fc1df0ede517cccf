"""What every pgops DAG shares: default args, failure notifications, assets."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, BaseNotifier

from pgops.inventory import Cluster

FAILURE_MESSAGE = (
    "pgops: {{ ti.dag_id }} / {{ ti.task_id }} failed (run {{ run_id }}, try {{ ti.try_number }}).\n"
    "{{ exception }}\n"
    "Cluster: {{ params.get('cluster', '') }}"
)


class LazySnsNotifier(BaseNotifier):
    """The Amazon provider's SnsNotifier, imported only when a notification is sent.

    Importing it at parse time pulls in boto3 (~0.6 s per DAG file); the dag-processor must stay fast.
    """

    template_fields = ("message", "subject", "target_arn")

    def __init__(self, *, aws_conn_id: str, target_arn: str, message: str, subject: str, region_name: str):
        super().__init__()
        self.aws_conn_id, self.target_arn, self.message = aws_conn_id, target_arn, message
        self.subject, self.region_name = subject, region_name

    def notify(self, context) -> None:
        from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

        SnsNotifier(aws_conn_id=self.aws_conn_id, target_arn=self.target_arn, message=self.message,
                    subject=self.subject, region_name=self.region_name).notify(context)


def failure_notifier(cluster: Cluster) -> LazySnsNotifier | None:
    """SNS notification to the cluster's alert topic, or None when it has none."""
    if not cluster.alerts.sns_topic_arn:
        return None
    region = cluster.alerts.sns_topic_arn.split(":")[3]
    return LazySnsNotifier(aws_conn_id=cluster.alerts_conn_id, target_arn=cluster.alerts.sns_topic_arn,
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
    # An "x-" scheme skips Airflow's URI normalizers: any other scheme loads every provider's asset handler
    # (the Amazon one imports boto3), ~1 s at parse time. The event's extra carries the s3:// location.
    return Asset(name=f"pgops_backup__{cluster.name}",
                 uri=f"x-pgops-backup://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base",
                 group="pgops-backups")


def dag_tags(cluster: Cluster, kind: str) -> list[str]:
    return ["pgops", kind, f"cluster:{cluster.name}", *cluster.tags]
