"""DAG factory: pgops_ebs_migration__<cluster>, a timed incremental EBS snapshot migration (manual trigger).

validate (no AWS call) → preflight → dry-run gate → chain (one task, one deferral per round, the planner
decides) → approve_cutover (a person: predicted downtime, rounds so far, floor, target) → fresh_round (the planner
again: a late answer takes one more round) → cutover (quiesce, final snapshot, release) → wait_final → copy_final
→ share → create_volume → report (always runs: JSON in the bucket and XCom, with the approval).

Round copies run beside the next snapshot, one in flight at a time (the newest round once the last copy is done),
and the planner decides with their state: it holds the chain at its floor while they lag and may start a round
later (a DateTimeTrigger) so that it ends as the copy in flight does. The cutover follows a round: if the last one
is stale when it starts, it takes one more first. wait_final and copy_final poll every 5 s (writes are paused).

Reject, or no answer within approval_timeout_minutes: no cutover; the chain's snapshots and copies are kept
(clear approve_cutover to ask again) or deleted (if_not_approved). skip_approval=true cuts over without asking.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param

from pgops.airflow.dags.common import dag_tags, default_args, pgops_dag, xcom
from pgops.airflow.operators.approval import (
    CUTOVER_GATE,
    IF_NOT_APPROVED,
    MAX_TIMEOUT_MINUTES,
    EbsCutoverApprovalOperator,
)
from pgops.airflow.operators.ebs import (
    EbsCopySnapshotOperator,
    EbsCreateVolumeOperator,
    EbsCutoverOperator,
    EbsMigrationPreflightOperator,
    EbsMigrationReportOperator,
    EbsMigrationValidateOperator,
    EbsShareSnapshotOperator,
    EbsSnapshotChainOperator,
)
from pgops.airflow.sensors.ebs import EbsSnapshotCompletedSensor
from pgops.core.ebs.spec import (
    ACCOUNT_PATTERN,
    AZ_PATTERN,
    CUTOVER_MODES,
    INITIALIZATIONS,
    INSTANCE_ID_PATTERN,
    KMS_KEY_PATTERN,
    MAX_INIT_RATE_MIB_S,
    MIN_INIT_RATE_MIB_S,
    REGION_PATTERN,
    VOLUME_ID_PATTERN,
    VOLUME_TYPES,
)
from pgops.core.params import (
    MAX_COPY_TIME_MINUTES,
    MAX_CUTOVER_AHEAD_DAYS,
    MAX_DOWNTIME_TARGET_MINUTES,
    MAX_THROUGHPUT_MIB_S,
    MAX_VOLUME_SIZE_GIB,
)
from pgops.inventory import Cluster

DAG_ID_PREFIX = "pgops_ebs_migration__"


def first_of(*tasks) -> str:
    """A template of the first of these tasks' return values that is not empty (see xcom)."""
    pulls = " or ".join(f"ti.xcom_pull(task_ids={t.task_id!r})" for t in tasks)
    return f"{{{{ {pulls} }}}}"


def _one_of(values) -> str:
    return ", ".join(values)


def migration_params(cluster: Cluster) -> dict[str, Param]:
    """The trigger form. A regex-checked param's description says what it accepts and the fix (Airflow's refusal
    shows only the regex); an enum's lists its values. The validate task checks them all again (pgops.core.ebs.spec)."""
    return {
        "cluster": Param(cluster.name, type="string", const=cluster.name, description="Inventory cluster"),
        "volume_ids": Param([], type="array", items={"type": "string", "pattern": VOLUME_ID_PATTERN},
                            uniqueItems=True,
                            description="Source EBS volumes, each 'vol-' and 8 to 17 lowercase hex digits, listed "
                                        "once (or leave empty and give instance_id). Fix: copy the ids from the "
                                        "EC2 console or `aws ec2 describe-volumes`, e.g. vol-0123456789abcdef0"),
        "instance_id": Param(None, type=["null", "string"], pattern=INSTANCE_ID_PATTERN,
                             description="Source instance: all its data volumes, crash-consistent (CreateSnapshots); "
                                         "'i-' and 8 to 17 lowercase hex digits, or empty with volume_ids. Fix: copy "
                                         "the id from the EC2 console, e.g. i-0123456789abcdef0"),
        "target_region": Param("us-west-2", type="string", pattern=REGION_PATTERN,
                               description="Region of the copies and the new volume: an AWS region code. Fix: use "
                                           "the lowercase code, e.g. us-west-2 or eu-central-1, not the region's "
                                           "display name"),
        "target_az": Param("us-west-2a", type="string", pattern=AZ_PATTERN,
                           description="Availability zone of the new volume (in target_region): the region code "
                                       "and a letter. Fix: pick a zone of target_region, e.g. us-west-2a"),
        "target_account": Param(None, type=["null", "string"], pattern=ACCOUNT_PATTERN,
                                description="Share the destination snapshot with this account: 12 digits (empty: "
                                            "not shared). Fix: give the account id without dashes or spaces, "
                                            "e.g. 123456789012"),
        "kms_key_id": Param(None, type=["null", "string"], pattern=KMS_KEY_PATTERN,
                            description="Destination KMS key in target_region (one key for every round keeps copies "
                                        "incremental): a key ARN, key id, mrk- id or alias/<name> (empty: the "
                                        "AWS-managed key). Fix: copy the key ARN from the KMS console, e.g. "
                                        "arn:aws:kms:us-west-2:123456789012:key/<key-id>"),
        "downtime_target_minutes": Param(10, type="number", exclusiveMinimum=0, maximum=MAX_DOWNTIME_TARGET_MINUTES,
                                         description="Longest acceptable write pause at cutover, in minutes (above "
                                                     f"0, at most {MAX_DOWNTIME_TARGET_MINUTES}): the chain takes "
                                                     "rounds until the final snapshot and copy fit it"),
        "copy_time_minutes": Param(5, type="number", minimum=0, maximum=MAX_COPY_TIME_MINUTES,
                                   description="Expected final copy time, in minutes (0 to "
                                               f"{MAX_COPY_TIME_MINUTES}; less than downtime_target_minutes)"),
        "max_rounds": Param(10, type="integer", minimum=2, maximum=100,
                            description="Most snapshot rounds before the cutover (2 to 100)"),
        # "at most N days ahead" needs the clock: the validate task checks it (pgops.core.ebs.spec)
        "cutover_at": Param(None, type=["null", "string"], format="date-time", maxLength=64,
                            description="Keep chaining until this time (with zone, at most "
                                        f"{MAX_CUTOVER_AHEAD_DAYS} days ahead), then cut over. Fix: write it like "
                                        "2025-01-05T02:00:00+00:00, or leave it empty to cut over when the plan "
                                        "says so"),
        "cutover_mode": Param("backup", type="string", enum=list(CUTOVER_MODES),
                              description=f"How the final snapshot is taken, one of {_one_of(CUTOVER_MODES)}: "
                                          "backup (inside pg_backup_start/pg_backup_stop, the server stays up), "
                                          "stop-writes (a clean stop, the snapshot, a restart), crash-consistent "
                                          "(no quiesce)"),
        "volume_initialization": Param("none", type="string", enum=list(INITIALIZATIONS),
                                       description="How the new volume's blocks are loaded from the snapshot, one "
                                                   f"of {_one_of(INITIALIZATIONS)}: none (lazily, on first read), "
                                                   "rate (volume_initialization_rate_mib_s), fast-snapshot-restore"),
        "volume_initialization_rate_mib_s": Param(None, type=["null", "integer"], minimum=MIN_INIT_RATE_MIB_S,
                                                  maximum=MAX_INIT_RATE_MIB_S,
                                                  description="With volume_initialization=rate: MiB/s, "
                                                              f"{MIN_INIT_RATE_MIB_S} to {MAX_INIT_RATE_MIB_S}"),
        "volume_type": Param("gp3", type="string", enum=list(VOLUME_TYPES),
                             description=f"EBS type of the new volume, one of {_one_of(VOLUME_TYPES)}"),
        "delete_intermediate_snapshots": Param(False, type="boolean",
                                               description="After a completed migration, delete the rounds' "
                                                           "snapshots and copies (the newest copy is kept)"),
        "dry_run": Param(False, type="boolean", description="Validate, preflight and plan only"),
        "expected_volume_size_gib": Param(None, type=["null", "number"], minimum=1, maximum=MAX_VOLUME_SIZE_GIB,
                                          description="For the plan before round 1: the source volume size in "
                                                      f"GiB (1 to {MAX_VOLUME_SIZE_GIB}; empty: no early plan)"),
        "expected_throughput_mib_s": Param(None, type=["null", "number"], exclusiveMinimum=0,
                                           maximum=MAX_THROUGHPUT_MIB_S,
                                           description="For the plan before round 1: snapshot throughput in MiB/s "
                                                       f"(above 0, at most {MAX_THROUGHPUT_MIB_S}; empty: no early "
                                                       "plan)"),
        "expected_write_rate_mib_s": Param(None, type=["null", "number"], minimum=0, maximum=MAX_THROUGHPUT_MIB_S,
                                           description="The source's write rate in MiB/s (0 to "
                                                       f"{MAX_THROUGHPUT_MIB_S}); with size and throughput: plan "
                                                       "(and refuse r >= 1) before round 1"),
        "skip_approval": Param(False, type="boolean",
                               description="Cut over without asking a person (automation); the report says so"),
        "approval_timeout_minutes": Param(120, type="number", exclusiveMinimum=0, maximum=MAX_TIMEOUT_MINUTES,
                                          description="No answer within this long counts as Reject: no cutover"),
        "if_not_approved": Param("keep", type="string", enum=list(IF_NOT_APPROVED),
                                 description=f"One of {_one_of(IF_NOT_APPROVED)}: after a reject or a timeout, keep "
                                             "the chain's snapshots and copies (clear approve_cutover to ask again) "
                                             "or delete them"),
    }


def build_ebs_migration_dag(cluster: Cluster) -> DAG:
    aws = {"aws_conn_id": cluster.aws_conn_id}
    with pgops_dag(
        dag_id=f"{DAG_ID_PREFIX}{cluster.name}",
        description=f"Incremental EBS snapshot migration of {cluster.name}'s volumes to another region/account",
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=default_args(cluster, retries=1),
        tags=dag_tags(cluster, "ebs-migration"),
        params=migration_params(cluster),
        render_template_as_native_obj=True,
        doc_md=__doc__,
    ) as dag:
        validate = EbsMigrationValidateOperator(task_id="validate", retries=0)
        preflight = EbsMigrationPreflightOperator(task_id="preflight", execution_timeout=timedelta(minutes=10), **aws)
        not_dry_run = ShortCircuitOperator(task_id="not_dry_run", python_callable=lambda params: not params["dry_run"],
                                           ignore_downstream_trigger_rules=False)
        chain = EbsSnapshotChainOperator(task_id="chain", preflight=xcom(preflight), **aws)
        approve = EbsCutoverApprovalOperator(task_id=CUTOVER_GATE, cluster_name=cluster.name, chain=xcom(chain),
                                             preflight=xcom(preflight), skip_approval="{{ params.skip_approval }}",
                                             timeout_minutes="{{ params.approval_timeout_minutes }}")
        # the chain's rounds decided again after the gate: a late answer takes a fresh round
        fresh_round = EbsSnapshotChainOperator(task_id="fresh_round", preflight=xcom(preflight),
                                               resume_chain=xcom(chain), **aws)
        # the chain's rounds as last decided: the re-decision after the gate, else the chain's own
        newest_chain = first_of(fresh_round, chain)
        # On the DB host's queue: stop-writes stops and restarts PostgreSQL through the cluster's runner.
        cutover = EbsCutoverOperator(task_id="cutover", preflight=xcom(preflight), chain=newest_chain,
                                     postgres_conn_id=cluster.postgres_conn_id, cluster_name=cluster.name,
                                     queue=cluster.runner.queue, execution_timeout=timedelta(minutes=30), **aws)
        wait_final = EbsSnapshotCompletedSensor(task_id="wait_final",
                                                snapshot_ids="{{ ti.xcom_pull(task_ids='cutover')['snapshots'] }}",
                                                aws_conn_id=cluster.aws_conn_id, timeout=48 * 3600,
                                                waiter_delay=5)  # writes are paused: each poll's lag is downtime
        copy_final = EbsCopySnapshotOperator(task_id="copy_final",
                                             snapshot_ids="{{ ti.xcom_pull(task_ids='cutover')['snapshots'] }}",
                                             target_region="{{ params.target_region }}",
                                             kms_key_id="{{ params.kms_key_id }}", waiter_delay=5, **aws)
        share = EbsShareSnapshotOperator(task_id="share",
                                         snapshot_ids="{{ ti.xcom_pull(task_ids='copy_final')['copies'] }}",
                                         region="{{ params.target_region }}",
                                         account_id="{{ params.target_account }}", **aws)
        create_volume = EbsCreateVolumeOperator(task_id="create_volume",
                                                snapshot_ids="{{ ti.xcom_pull(task_ids='copy_final')['copies'] }}",
                                                region="{{ params.target_region }}",
                                                availability_zone="{{ params.target_az }}",
                                                execution_timeout=timedelta(hours=2), **aws)
        report = EbsMigrationReportOperator(task_id="report", cluster_name=cluster.name, spec=xcom(validate),
                                            preflight=xcom(preflight), chain=newest_chain, approval=xcom(approve),
                                            cutover=xcom(cutover), final_copy=xcom(copy_final), shared=xcom(share),
                                            volumes=xcom(create_volume), trigger_rule="all_done", retries=0, **aws)
        validate >> preflight >> not_dry_run >> chain >> approve >> fresh_round >> cutover >> wait_final
        wait_final >> copy_final >> share
        share >> create_volume >> report
    return dag
