"""What every pgops DAG shares: default args, failure notifications, assets."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Asset, BaseNotifier, Param

from pgops.airflow.dags import sdk_adapter
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


def xcom(task: Any, key: str | None = None) -> str:
    """A template of ``task``'s XCom (its return value, or ``key``), for an operator argument in a DAG with
    render_template_as_native_obj: the operator gets the object itself, None when the task pushed nothing."""
    key_arg = f", key={key!r}" if key else ""
    return f"{{{{ ti.xcom_pull(task_ids={task.task_id!r}{key_arg}) }}}}"


def outcomes(*tasks: Any) -> dict[str, dict[str, str]]:
    """For a report: every task's return value and its XCom "error", by task id (templates, see xcom)."""
    return {t.task_id: {"value": xcom(t), "error": xcom(t, "error")} for t in tasks}


def dag_tags(cluster: Cluster, kind: str) -> list[str]:
    return ["pgops", kind, f"cluster:{cluster.name}", *cluster.tags]


@contextmanager
def pgops_dag(*, params: dict[str, Param], **dag_kwargs: Any) -> Iterator[DAG]:
    """``with pgops_dag(..., params=...) as dag:`` is ``with DAG(..., params=...) as dag:``, made fast to parse.

    Two costs of Airflow's own path dominated the DagBag fill (50 clusters: 1.5 s, 85% of it):
    - inside ``with dag:``, every operator deep-copies ``dag.params`` once per level of its class hierarchy
      (``_get_parent_defaults`` in the task SDK). The copies are not needed: at run time Airflow validates
      ``dag.params`` merged with the task's own params and the run's conf (``process_params``), so tasks built
      while the DAG has no params yet render ``{{ params.x }}`` exactly the same;
    - a scheduled DAG validates every param default with ``jsonschema.validate``, which checks the schema itself
      against the JSON Schema metaschema each time. ``check_defaults`` does the same validation with each
      distinct schema checked once per process.
    """
    dag = DAG(**dag_kwargs)
    with dag:
        yield dag
    if dag.timetable.can_be_scheduled:  # as Airflow: a manual-only DAG may have params without valid defaults
        check_defaults(dag.dag_id, params)
    sdk_adapter.set_params(dag, params)  # validated just above


def check_defaults(dag_id: str, params: dict[str, Param]) -> None:
    """Raise what ``DAG(schedule=..., params=...)`` raises when a param's default does not fit its schema."""
    from jsonschema.exceptions import best_match

    for name, param in params.items():
        value = param.value
        error = ("No value passed and Param has no default value" if not sdk_adapter.is_arg_set(value)
                 else best_match(_validator(json.dumps(param.schema, sort_keys=True)).iter_errors(value)))
        if error is not None:
            raise ValueError(f"Dag {dag_id!r} is not allowed to define a Schedule, as there are required params "
                             f"without default values, or the default values are not valid: "
                             f"Invalid input for param {name}: {error}")


@functools.lru_cache(maxsize=512)
def _validator(schema_json: str):
    from jsonschema import FormatChecker
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=FormatChecker())
