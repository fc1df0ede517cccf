"""Deadline Alerts: an SNS message to the cluster's alert topic when a run has not finished in time.

Airflow's scheduler watches each run's deadline (``DAG(deadline=...)``); when one passes before the run has
succeeded, the triggerer awaits :func:`deadline_missed` (an AsyncCallback: it must be importable on the
triggerer, hence this module under plugins/). A deadline counts from the run's scheduled time (its logical date):
the base backup's is ``targets.backup_deadline_s`` after it, the restore verification's
``targets.restore_deadline_s`` (default: ``targets.rto_s``). Runs without a logical date (manual and
asset-triggered runs) get none; what bounds those is the restore verification's own ``recovery_timeout_s``
(default max(1 h, 3 x rto_s)): past it the task fails and the cluster's failure notifier sends its SNS alert. Not from the time the run was queued: Airflow 3.3.2 cannot clear a task of a run
whose deadline counts from its queue time (it recomputes that deadline and fails with a 500), and clearing is
how a failed backup is retried from the UI. A cluster without ``alerts.sns_topic_arn`` gets no deadline.
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
    return [DeadlineAlert(reference=DeadlineReference.DAGRUN_LOGICAL_DATE, interval=timedelta(seconds=limit_s),
                          callback=callback, name=f"pgops {KINDS[kind]} deadline")]


def deadline_message(*, cluster: str, what: str, limit_s: int, setting: str, context: dict | None) -> tuple[str, str]:
    """Subject and body of the alert (plain values in, text out)."""
    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    subject = f"pgops deadline missed: {cluster} {what}"
    body = (f"pgops: the {what} of cluster {cluster} has not finished within {_span(limit_s)} of its scheduled "
            f"time ({setting}).\n"
            f"DAG {run.get('dag_id', '?')}, run {run.get('dag_run_id') or run.get('run_id', '?')}, "
            f"scheduled for {run.get('logical_date', '?')}, state {run.get('state', '?')}; "
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
