"""DAG factory: pgops_restore_verify__<cluster>.

canary → setup → restore → wait_recovery → checks → report, and a teardown that runs whatever happened
upstream (a failed or killed setup included). Each step gets the values of the steps before it as templated
arguments (rendered as native objects); the report gets every step's value and error. Runs after each verified base backup (asset) and on its own
cron; a manual run takes a backup id, a target (latest, canary, timestamp, LSN), the checks and `keep`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, TriggerRule

from pgops.airflow.dags.common import backup_asset, dag_tags, default_args, outcomes, pgops_dag, xcom
from pgops.airflow.deadlines import deadline_alerts
from pgops.airflow.operators.restore import (
    DEFAULT_SCRATCH_ROOT,
    BarmanCloudRestoreOperator,
    RecoveryEndedOperator,
    RestoreCanaryOperator,
    RestoreChecksOperator,
    RestoreReportOperator,
    RestoreSetupOperator,
    RestoreTeardownOperator,
)
from pgops.core.params import (
    ABS_DIR_HELP,
    ABS_DIR_PATTERN,
    BACKUP_ID_HELP,
    BACKUP_ID_PATTERN,
    MAX_HORIZON_DAYS,
    MAX_RECOVERY_TIMEOUT_S,
    MAX_REQUIRED_BYTES,
    whole,
)
from pgops.core.restore import CHECKS
from pgops.inventory import Cluster

DAG_ID_PREFIX = "pgops_restore_verify__"
TARGET_PATTERN = whole(r"^(latest|canary|[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}|"
                       r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?))$")
SCRATCH_ROOT_ENV = "PGOPS_RESTORE_SCRATCH_ROOT"
TARGET_HELP = ("Where recovery stops: latest (all archived WAL), canary (the canary row written before the "
               "restore), an ISO timestamp with its zone (not in the future) or an LSN. Fix: give latest, canary, a "
               "time like 2025-01-05T02:00:00+00:00 or an LSN like 0/3000060")
CHECKS_HELP = ("Checks to run on the restored instance, any of: canary (the canary row written before the restore "
               "came back), system_identifier (the same as the primary's), amcheck (pg_amcheck --all), sql (every "
               "query in include/sql/checks returns no rows in any database)")


def build_restore_verify_dag(cluster: Cluster) -> DAG:
    q = cluster.runner.queue  # restore steps run on the restore host (the cluster's runner)
    with pgops_dag(
        dag_id=f"{DAG_ID_PREFIX}{cluster.name}",
        description=f"Restore {cluster.name}'s newest backup into a scratch instance, prove the data, measure RTO",
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(cluster.schedule.restore_verify, timezone=cluster.schedule.timezone),
            assets=backup_asset(cluster)),
        start_date=pendulum.datetime(2024, 1, 1, tz=cluster.schedule.timezone),
        catchup=False,
        max_active_runs=1,
        deadline=deadline_alerts(cluster, "restore_verify"),
        default_args=default_args(cluster, retries=0),
        render_template_as_native_obj=True,
        tags=dag_tags(cluster, "restore-verify"),
        params={
            "cluster": Param(cluster.name, type="string", const=cluster.name, description="Inventory cluster"),
            "backup_id": Param("latest", type="string", pattern=BACKUP_ID_PATTERN,
                               description=f"Backup to restore: {BACKUP_ID_HELP}"),
            # The schema checks the form; "not in the future" needs the clock: the setup task checks it
            # (pgops.core.params.check_target_time) before it touches the restore host.
            "target": Param("canary", type="string", pattern=TARGET_PATTERN, maxLength=64,
                            description=TARGET_HELP),
            "checks": Param(list(CHECKS), type="array", items={"type": "string", "enum": list(CHECKS)},
                            description=CHECKS_HELP),
            "heapallindexed": Param(True, type="boolean", description="pg_amcheck --heapallindexed (slower, deeper)"),
            "keep": Param(False, type="boolean", description="Leave the scratch instance running (debugging, "
                                                             "recovering lost rows); teardown logs how to remove it"),
            "scratch_root": Param(os.environ.get(SCRATCH_ROOT_ENV, DEFAULT_SCRATCH_ROOT), type="string",
                                  pattern=ABS_DIR_PATTERN, maxLength=1024,
                                  description=f"Directory on the restore host for scratch areas: {ABS_DIR_HELP}"),
            "required_bytes": Param(0, type="integer", minimum=0, maximum=MAX_REQUIRED_BYTES,
                                    description="Free bytes the restore needs (0: the backup's size plus a margin)"),
            "recovery_timeout_s": Param(min(max(3600, 3 * cluster.targets.rto_s), MAX_RECOVERY_TIMEOUT_S),
                                        type="integer", minimum=60, maximum=MAX_RECOVERY_TIMEOUT_S,
                                        description="Fail when recovery has not ended after this long (at most "
                                                    f"{MAX_RECOVERY_TIMEOUT_S // 86400} days)"),
            "horizon_days": Param(90, type="integer", minimum=1, maximum=MAX_HORIZON_DAYS,
                                  description="RTO trend warning horizon"),
        },
        doc_md=__doc__,
    ) as dag:
        canary = RestoreCanaryOperator(task_id="canary", cluster_name=cluster.name, target="{{ params.target }}",
                                       backup_id="{{ params.backup_id }}", execution_timeout=timedelta(minutes=15))
        setup = RestoreSetupOperator(
            task_id="setup", cluster_name=cluster.name, queue=q, backup_id="{{ params.backup_id }}",
            target="{{ params.target }}", canary=xcom(canary), scratch_root="{{ params.scratch_root }}",
            required_bytes="{{ params.required_bytes }}", trigger_rule=TriggerRule.NONE_FAILED,
            execution_timeout=timedelta(minutes=30))
        plan = xcom(setup)
        restore = BarmanCloudRestoreOperator(
            task_id="restore", cluster_name=cluster.name, queue=q, pool=cluster.pool, plan=plan,
            execution_timeout=timedelta(seconds=cluster.engine.timeout_s + 600))
        wait = RecoveryEndedOperator(task_id="wait_recovery", cluster_name=cluster.name, queue=q, plan=plan,
                                     started=xcom(restore), timeout_s="{{ params.recovery_timeout_s }}")
        checks = RestoreChecksOperator(task_id="checks", cluster_name=cluster.name, queue=q, plan=plan,
                                       checks="{{ params.checks }}", heapallindexed="{{ params.heapallindexed }}",
                                       execution_timeout=timedelta(seconds=cluster.engine.timeout_s))
        report = RestoreReportOperator(
            task_id="report", cluster_name=cluster.name, steps=outcomes(canary, setup, restore, wait, checks),
            optional_steps=(canary.task_id,), plan=plan, canary=xcom(canary), started=xcom(restore),
            recovery=xcom(wait), checks=xcom(checks, "checks"), keep="{{ params.keep }}",
            horizon_days="{{ params.horizon_days }}", trigger_rule=TriggerRule.ALL_DONE,
            execution_timeout=timedelta(minutes=10))
        teardown = RestoreTeardownOperator(task_id="teardown", cluster_name=cluster.name, queue=q, plan=plan,
                                           keep="{{ params.keep }}", scratch_root="{{ params.scratch_root }}",
                                           execution_timeout=timedelta(hours=1))
        canary >> setup >> restore >> wait >> checks >> [report, teardown.as_teardown(setups=setup)]
        # Airflow runs a teardown only when one of its setups succeeded (ALL_DONE_SETUP_SUCCESS). A setup that
        # fails or is killed after making the scratch area would leave it behind: run the teardown whenever its
        # upstream is done. With nothing to remove (canary failed, setup failed early) it does nothing.
        teardown.trigger_rule = TriggerRule.ALL_DONE
    return dag
