"""Deadline Alerts: an SNS message to the cluster's alert topic when a run has not finished in time.

Airflow's scheduler watches each run's deadline (``DAG(deadline=...)``); when one passes before the run has
succeeded, the triggerer awaits :func:`deadline_missed` (an AsyncCallback: it must be importable on the
triggerer, hence this module under plugins/). The base backup's deadline is ``targets.backup_deadline_s`` after
its run was queued (its scheduled time while the scheduler is up; manual runs count too), the restore
verification's ``targets.restore_deadline_s`` (default: ``targets.rto_s``). A cluster without ``alerts.sns_topic_arn`` gets no deadline.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pgops.inventory import Cluster

KINDS = {"backup": "base backup", "restore_verify": "restore verification"}


def deadline_alerts(cluster: Cluster, kind: str) -> list:
    """The DeadlineAlert list for a DAG of ``kind`` ("backup" or "restore_verify") of ``cluster``."""
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    arn = cluster.alerts.sns_topic_arn
    if not arn:
        return []
    limit_s = cluster.targets.backup_deadline_s if kind == "backup" else cluster.targets.restore_deadline_s
    setting = "targets.backup_deadline_s" if kind == "backup" else "targets.restore_deadline_s"
    callback = AsyncCallback(deadline_missed, kwargs={
        "cluster": cluster.name, "what": KINDS[kind], "limit_s": limit_s, "setting": setting,
        "aws_conn_id": cluster.alerts_conn_id, "target_arn": arn, "region_name": arn.split(":")[3]})
    return [DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(seconds=limit_s),
                          callback=callback, name=f"pgops {KINDS[kind]} deadline")]


def deadline_message(*, cluster: str, what: str, limit_s: int, setting: str, context: dict | None) -> tuple[str, str]:
    """Subject and body of the alert (plain values in, text out)."""
    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    subject = f"pgops deadline missed: {cluster} {what}"
    body = (f"pgops: the {what} of cluster {cluster} has not finished within {_span(limit_s)} ({setting}).\n"
            f"DAG {run.get('dag_id', '?')}, run {run.get('dag_run_id') or run.get('run_id', '?')}, "
            f"queued at {run.get('queued_at', '?')}, state {run.get('state', '?')}; "
            f"deadline {deadline.get('deadline_time', '?')}.\n"
            "Look at the run in the Airflow UI: a task may be stuck, queued without a worker, or slower than "
            f"the target; raise {setting} in the inventory only if the slower run is expected.")
    return subject, body


async def deadline_missed(*, cluster: str, what: str, limit_s: int, setting: str, aws_conn_id: str | None,
                          target_arn: str, region_name: str, context: dict | None = None) -> str:
    """Publish the alert through the Amazon provider's SnsHook (in a thread: its async client needs aiobotocore,
    which is not in the lock). Returns text: the triggerer stores it in a string column (a dict there stops the
    triggerer, taking every deferred task with it)."""
    from airflow.providers.amazon.aws.hooks.sns import SnsHook

    subject, body = deadline_message(cluster=cluster, what=what, limit_s=limit_s, setting=setting, context=context)

    def publish() -> str:
        hook = SnsHook(aws_conn_id=aws_conn_id, region_name=region_name)
        return hook.publish_to_target(target_arn=target_arn, message=body, subject=subject)["MessageId"]

    message_id = await asyncio.to_thread(publish)
    return f"SNS message {message_id} to {target_arn}: {subject}"


def _span(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
