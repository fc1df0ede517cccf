"""DAG factory: pgops_standby_rebuild__<cluster> (manual): rebuild a standby from the newest backup.

preflight (reads only) → approve_rebuild → restore → wait_streaming → register (repmgr) → report. The target is
an inventory replication node that is not the current primary (the preflight refuses it loudly otherwise); the
restore comes from the S3 backup plus archived WAL, so the primary only serves the last stretch of WAL through the
slot. approve_rebuild asks a person (Required Actions) with the node, host, data directory and system identifier
before anything is stopped, removed or created; Reject or no answer within approval_timeout_minutes leaves
everything as it was, and skip_approval=true rebuilds without asking. The audit's failover findings link this DAG
with the params filled in (they never set skip_approval). Each step gets the preflight's plan and the values of
the steps before it as templated arguments (rendered as native objects); the report gets every step's value and
error.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, TriggerRule

from pgops.airflow.dags.common import dag_tags, default_args, outcomes, pgops_dag, xcom
from pgops.airflow.operators.approval import MAX_TIMEOUT_MINUTES, REBUILD_GATE, StandbyRebuildApprovalOperator
from pgops.airflow.operators.standby import (
    StandbyPreflightOperator,
    StandbyRegisterOperator,
    StandbyReportOperator,
    StandbyRestoreOperator,
    StandbyStreamingOperator,
)
from pgops.core.params import (
    ABS_DIR_HELP,
    ABS_DIR_PATTERN,
    BACKUP_ID_HELP,
    BACKUP_ID_PATTERN,
    MAX_LAG_BYTES,
    MAX_REQUIRED_BYTES,
    MAX_STANDBY_TIMEOUT_S,
    SETTINGS_HELP,
    SETTINGS_SCHEMA,
)
from pgops.inventory import Cluster

DAG_ID_PREFIX = "pgops_standby_rebuild__"


def _one_of(values) -> str:
    return ", ".join(values) or "none (the inventory lists no replication nodes)"


def build_standby_rebuild_dag(cluster: Cluster) -> DAG:
    q = cluster.runner.queue  # restore, start and repmgr run on the target's host
    repl = cluster.replication
    names = [n.name for n in repl.nodes] if repl else []
    first = repl.standbys[0] if repl and repl.standbys else None
    # Only the inventory's own values: a free-form directory or slot is how a typo reaches the primary.
    dirs = sorted({n.data_directory.rstrip("/") for n in repl.nodes if n.data_directory}) if repl else []
    slots = sorted({n.slot or n.name for n in repl.nodes}) if repl else []
    with pgops_dag(
        dag_id=f"{DAG_ID_PREFIX}{cluster.name}",
        description=f"Rebuild a standby of {cluster.name} from the newest backup and make it stream",
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz=cluster.schedule.timezone),
        catchup=False,
        max_active_runs=1,
        default_args=default_args(cluster, retries=0),
        render_template_as_native_obj=True,
        tags=dag_tags(cluster, "standby-rebuild"),
        params={
            "cluster": Param(cluster.name, type="string", const=cluster.name, description="Inventory cluster"),
            "target": Param(first.name if first else "", type="string",
                            **({"enum": names} if names else {}),
                            description=f"Replication node to rebuild, one of {_one_of(names)} (never the current "
                                        "primary). Fix: pick a standby, or the old primary after a failover"),
            "data_directory": Param("", type="string", enum=["", *dirs],
                                    description="Data directory to replace: empty for the target's data_directory "
                                                f"in the inventory, or exactly it ({_one_of(dirs)}); the only "
                                                "directory a rebuild replaces. Fix: leave it empty; to move a node, "
                                                "change the inventory"),
            "slot": Param("", type="string", enum=["", *slots],
                          description="Replication slot on the primary: empty for the target's slot in the inventory, "
                                      f"or exactly it ({_one_of(slots)}); created when missing and dropped again "
                                      "when the rebuild fails. Fix: leave it empty; to rename a slot, change the "
                                      "inventory"),
            "force": Param(False, type="boolean",
                           description="Replace the contents of a stopped node or a running standby. Never stops a "
                                       "primary or touches another node's or another cluster's directory"),
            "backup": Param("latest", type="string", pattern=BACKUP_ID_PATTERN,
                            description=f"Backup to rebuild from: {BACKUP_ID_HELP}"),
            "socket_dir": Param("/var/run/postgresql", type="string", pattern=ABS_DIR_PATTERN, maxLength=90,
                                description="unix_socket_directories of the rebuilt standby (at most 90 "
                                            f"characters): {ABS_DIR_HELP}"),
            "settings": Param({}, **SETTINGS_SCHEMA,
                              description=f"Extra settings for the standby: {SETTINGS_HELP}"),
            "wal_parallel": Param(4, type="integer", minimum=0, maximum=32,
                                  description="Download threads of the WAL prefetcher in restore_command (0: none)"),
            "max_lag_bytes": Param(0, type="integer", minimum=0, maximum=MAX_LAG_BYTES,
                                   description="Ready when replay lag is at most this (0: the inventory's max_lag_bytes)"),
            "timeout_s": Param(min(MAX_STANDBY_TIMEOUT_S, max(3600, 3 * cluster.targets.rto_s)), type="integer",
                               minimum=60, maximum=MAX_STANDBY_TIMEOUT_S,
                               description="Fail when the standby does not stream after this long"),
            "required_bytes": Param(0, type="integer", minimum=0, maximum=MAX_REQUIRED_BYTES,
                                    description="Free bytes needed (0: the backup's size plus a margin)"),
            "skip_approval": Param(False, type="boolean",
                                   description="Rebuild without asking a person (automation); the report says so"),
            "approval_timeout_minutes": Param(60, type="number", exclusiveMinimum=0, maximum=MAX_TIMEOUT_MINUTES,
                                              description="No answer within this long counts as Reject: nothing is "
                                                          "stopped or removed"),
        },
        doc_md=__doc__,
    ) as dag:
        preflight = StandbyPreflightOperator(
            task_id="preflight", cluster_name=cluster.name, queue=q, target="{{ params.target }}",
            data_directory="{{ params.data_directory }}", slot="{{ params.slot }}", force="{{ params.force }}",
            backup="{{ params.backup }}", socket_dir="{{ params.socket_dir }}",
            required_bytes="{{ params.required_bytes }}", settings="{{ params.settings }}",
            execution_timeout=timedelta(minutes=15))
        plan = xcom(preflight)
        approve = StandbyRebuildApprovalOperator(task_id=REBUILD_GATE, cluster_name=cluster.name, plan=plan,
                                                 skip_approval="{{ params.skip_approval }}",
                                                 timeout_minutes="{{ params.approval_timeout_minutes }}")
        restore = StandbyRestoreOperator(
            task_id="restore", cluster_name=cluster.name, queue=q, pool=cluster.pool, plan=plan,
            wal_parallel="{{ params.wal_parallel }}", extra_settings="{{ params.settings }}",
            execution_timeout=timedelta(seconds=cluster.engine.timeout_s + 600))
        slot_created = xcom(restore, "slot_created")
        wait = StandbyStreamingOperator(task_id="wait_streaming", cluster_name=cluster.name, queue=q, plan=plan,
                                        slot_created=slot_created, started=xcom(restore),
                                        timeout_s="{{ params.timeout_s }}", max_lag_bytes="{{ params.max_lag_bytes }}")
        register = StandbyRegisterOperator(task_id="register", cluster_name=cluster.name, queue=q, plan=plan,
                                           slot_created=slot_created, execution_timeout=timedelta(minutes=10))
        report = StandbyReportOperator(
            task_id="report", cluster_name=cluster.name, steps=outcomes(preflight, restore, wait, register),
            optional_steps=(register.task_id,), gated_steps=(restore.task_id, wait.task_id, register.task_id),
            approval=xcom(approve), plan=plan, slot_created=slot_created, started=xcom(restore),
            streaming=xcom(wait), registered=xcom(register), trigger_rule=TriggerRule.ALL_DONE,
            execution_timeout=timedelta(minutes=10))
        preflight >> approve >> restore >> wait >> register >> report
    return dag
