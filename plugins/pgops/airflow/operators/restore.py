"""Restore-verification operators: canary, setup, restore, wait for recovery, checks, report, teardown.

Commands on the restore host go through the cluster's runner (as the postgres OS user in the lab); AWS
credentials reach barman-cloud and the scratch PostgreSQL through the environment, never argv.
Each step pushes its error under XCom key "error" so the report can say what broke. A step gets what the steps
before it returned as templated arguments (the DAG factory passes them; pgops.airflow.dags.common.xcom), never by pulling
another task's XCom itself.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pgops.airflow import progress
from pgops.airflow.hooks import aws_child_env, pg_connect, pg_query, s3_endpoint_url
from pgops.airflow.operators.base import (
    ClusterOperator,
    as_mapping,
    param_checked,
    pg_bin,
    stop_proven_postmaster,
    truthy,
)
from pgops.core import restore as core
from pgops.core.archiver import ARCHIVER_SQL, archiver_health
from pgops.core.params import (
    MAX_RECOVERY_TIMEOUT_S,
    MAX_REQUIRED_BYTES,
    check_abs_dir,
    check_backup_id,
    check_duration,
    check_number,
    check_target_time,
)
from pgops.core.reports import envelope, utcnow
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.host import DbHost, DbHostError
from pgops.dbhost.runners import CommandFailed
from pgops.inventory import REPO_ROOT, Cluster

DEFAULT_SCRATCH_ROOT = "/var/tmp/pgops-restore"
SQL_CHECKS_DIR = REPO_ROOT / "include" / "sql" / "checks"
CANARY_DDL = """
CREATE SCHEMA IF NOT EXISTS pgops;
CREATE TABLE IF NOT EXISTS pgops.restore_canary (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def scratch_paths(root: str, dag_id: str, run_id: str) -> dict[str, str]:
    root = posixpath.normpath(root)
    scratch = posixpath.join(root, core.scratch_name(dag_id, run_id))
    return {"scratch_root": root, "scratch_dir": scratch, "data_dir": f"{scratch}/data", "socket_dir": f"{scratch}/run",
            "spool_dir": f"{scratch}/spool", "log_file": f"{scratch}/postgres.log"}


class RestoreStepOperator(ClusterOperator):
    """A step of the restore verification; its failure message is kept in XCom (key "error") for the report.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the plan the step acts on, as the planning step returned it (restore: setup; standby rebuild:
        preflight), templated; None for the steps before it
    """

    template_fields: Sequence[str] = ("cluster_name", "plan")

    def __init__(self, *, plan: Mapping[str, Any] | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan

    def execute(self, context) -> Any:
        return self._guard(context, self.run_step, context)

    def run_step(self, context) -> Any:
        raise NotImplementedError

    def _guard(self, context, fn, *args) -> Any:
        try:
            return fn(*args)
        except AirflowSkipException:
            raise
        except Exception as exc:
            try:
                context["ti"].xcom_push(key="error", value=str(exc)[:4000])
            except Exception:  # the report then says "did not finish": still true
                self.log.warning("could not record the error in XCom")
            raise

    def host(self, cluster: Cluster, argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 300,
             capture: bool = False, check: bool = True):
        """Run argv on the restore host (the cluster's runner) with only the environment it needs."""
        return self.dbhost(cluster).run(argv, env=env, timeout_s=timeout_s, capture=capture, check=check)

    def planned(self) -> dict[str, Any]:
        """The plan; fails the step when there is none (the planning step did not finish)."""
        plan = as_mapping(self.plan, "plan")
        if not plan:
            raise AirflowFailException(f"task {self.task_id}: no plan: the planning step before it did not finish")
        return plan


class RestoreCanaryOperator(RestoreStepOperator):
    """Write a canary row on the primary (own transaction), switch WAL (another), wait until it is archived.

    Skipped for a target that is a fixed point in the past. Returns the canary: id, xid, committed_at, lsn,
    segment, archived_at, archive_lag_s.

    :param cluster_name: the inventory cluster (templated)
    :param target: the restore target (templated): canary or latest write a canary, anything else skips
    :param backup_id: the backup the run restores (templated); checked before the canary is written, so that a bad
        one is refused before anything is written to the primary (the setup step checks it again)
    :param archive_timeout_s: how long to wait for the canary's segment to be archived (default: the RPO target,
        at least 60 s)
    :param poll_interval_s: seconds between two looks at pg_stat_archiver
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "target", "backup_id")

    def __init__(self, *, target: str = "canary", backup_id: str = "latest", archive_timeout_s: float | None = None,
                 poll_interval_s: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.target = target
        self.backup_id = backup_id
        self.archive_timeout_s = archive_timeout_s
        self.poll_interval_s = poll_interval_s

    def run_step(self, context) -> dict[str, Any]:
        # A run made through the API or the CLI is not checked by the form: refuse its backup id before writing.
        param_checked(check_backup_id, "backup_id", self.backup_id or "latest")
        kind, _ = core.parse_target(self.target)
        if kind not in ("canary", "latest"):
            raise AirflowSkipException(f"target {self.target!r} is a fixed point in the past: no canary needed")
        cluster = self.cluster
        conn = pg_connect(cluster.postgres_conn_id, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(CANARY_DDL)
                conn.autocommit = False
                cur.execute("INSERT INTO pgops.restore_canary (run_id) VALUES (%s) "
                            "RETURNING id, pg_current_xact_id()::text", (context["run_id"],))
                canary_id, xid = cur.fetchone()
                conn.commit()
                conn.autocommit = True
                # Separate statements: the commit must be in the segment that the switch closes.
                cur.execute("SELECT clock_timestamp(), pg_current_wal_lsn()::text, "
                            "pg_walfile_name(pg_current_wal_lsn())")
                committed_at, lsn, segment = cur.fetchone()
                cur.execute("SELECT pg_switch_wal()::text")
        finally:
            conn.close()
        self.log.info("canary row %s (xid %s) committed at %s, LSN %s in segment %s; waiting for it to be archived",
                      canary_id, xid, committed_at.isoformat(), lsn, segment)
        timeout_s = self.archive_timeout_s or max(60, cluster.targets.rpo_s)
        deadline = time.monotonic() + timeout_s
        while True:
            row = pg_query(cluster.postgres_conn_id, ARCHIVER_SQL)[0]
            last = row.get("last_archived_wal") or ""
            if core.SEGMENT_RE.match(last[:24]) and last[:24] >= segment:
                break
            health = archiver_health(row)
            if not health.healthy:
                raise AirflowFailException(f"cluster {cluster.name!r}: canary segment {segment} cannot be archived: "
                                           f"{health.message}")
            if time.monotonic() >= deadline:
                raise AirflowFailException(
                    f"cluster {cluster.name!r}: canary segment {segment} was not archived within {timeout_s:.0f} s "
                    f"(last archived: {last or 'none'}); RPO target {cluster.targets.rpo_s} s is not met. "
                    "Fix: check archive_command and pg_stat_archiver on the primary")
            time.sleep(self.poll_interval_s)
        archived_at = row.get("last_archived_time")
        lag_s = (archived_at - committed_at).total_seconds() if archived_at else None
        self.log.info("canary segment %s archived at %s (%.1f s after the commit)", segment,
                      archived_at.isoformat() if archived_at else "?", lag_s or 0.0)
        return {"id": canary_id, "xid": xid, "committed_at": committed_at.isoformat(), "lsn": lsn,
                "segment": segment, "archived_at": archived_at.isoformat() if archived_at else None,
                "archive_lag_s": round(lag_s, 3) if lag_s is not None else None}


class RestoreSetupOperator(RestoreStepOperator):
    """Pick the backup and target, make the scratch area, check free space against the backup size, pick a port.

    Returns the restore plan the later steps act on (paths, port, backup, target, canary, bytes needed and free).

    :param cluster_name: the inventory cluster (templated)
    :param backup_id: backup id or name from the catalog, or latest (templated)
    :param target: latest, canary, an ISO timestamp with zone or an LSN (templated)
    :param canary: the canary step's result (templated); used for the targets canary and latest
    :param scratch_root: directory on the restore host for scratch areas (templated)
    :param required_bytes: free bytes the restore needs, 0 for the backup's size plus a margin (templated)
    :param canary_mode: how a canary target is expressed to recovery: xid or time (templated)
    :param db_user: the scratch instance's database user
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "backup_id", "target", "canary",
                                      "scratch_root", "required_bytes", "canary_mode")

    def __init__(self, *, backup_id: str = "latest", target: str = "canary",
                 canary: Mapping[str, Any] | str | None = None, scratch_root: str = DEFAULT_SCRATCH_ROOT,
                 required_bytes: int | str = 0, canary_mode: str = "xid", db_user: str = "postgres", **kwargs: Any):
        super().__init__(**kwargs)
        self.backup_id = backup_id
        self.target = target
        self.canary = canary
        self.scratch_root = scratch_root
        self.required_bytes = required_bytes
        self.canary_mode = canary_mode
        self.db_user = db_user

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        # The trigger form checked these; a run made another way is checked again before anything is done.
        backup_id = param_checked(check_backup_id, "backup_id", self.backup_id or "latest")
        param_checked(check_target_time, str(self.target))
        param_checked(check_abs_dir, "scratch_root", str(self.scratch_root))
        param_checked(check_number, "required_bytes", self.required_bytes or 0, minimum=0,
                      maximum=MAX_REQUIRED_BYTES, integer=True)
        try:
            kind, value = core.parse_target(str(self.target))
            canary = as_mapping(self.canary, "canary") if kind in ("canary", "latest") else None
            target = core.resolve_target(kind, value, canary=canary, canary_mode=self.canary_mode)
            backup = core.choose_backup(self.catalog(cluster), backup_id,
                                        before=core.target_time(target, canary))
        except core.RestorePlanError as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: {exc}") from None
        paths = scratch_paths(str(self.scratch_root), self.dag_id, context["run_id"])
        root = paths["scratch_root"]
        problem = core.socket_path_problem(paths["socket_dir"])
        if problem:
            raise AirflowFailException(f"cluster {cluster.name!r}: {problem}")
        host = self.dbhost(cluster)
        host.run(["mkdir", "-p", root])
        # A retry or a cleared run starts from nothing: stop and remove what an earlier try left.
        stop_and_remove(host, paths)
        _, avail = host.free_bytes(root)
        needed = int(self.required_bytes or 0) or core.required_bytes(backup.cluster_size_bytes)
        short = core.disk_shortfall(avail_bytes=avail, needed_bytes=needed, path=root, backup_id=backup.backup_id)
        if short:
            raise AirflowFailException(f"cluster {cluster.name!r}: {short}")
        host.run(["mkdir", "-m", "0700", "-p", paths["scratch_dir"], paths["socket_dir"], paths["spool_dir"]])
        plan = {**paths, "port": host.free_port(), "db_user": self.db_user, "backup_id": backup.backup_id,
                "backup_name": backup.backup_name, "backup_end_time": backup.end_time, "backup_end_wal": backup.end_wal,
                "backup_begin_wal": backup.begin_wal,
                "backup_size_bytes": backup.cluster_size_bytes, "systemid": backup.systemid,
                "target": {"kind": target.kind, "value": target.value}, "target_param": str(self.target),
                "canary": canary, "needed_bytes": needed, "avail_bytes": avail}
        self.log.info("restore plan: backup %s (ended %s, %s) to %s in %s on port %s; %s free, %s needed",
                      backup.backup_id, backup.end_time, core.human_bytes(backup.cluster_size_bytes or 0),
                      target.describe(), paths["scratch_dir"], plan["port"], core.human_bytes(avail),
                      core.human_bytes(needed))
        return plan


class BarmanCloudRestoreOperator(RestoreStepOperator):
    """The base backup into the scratch area (restore_base_backup: parts in parallel), recovery settings, then
    start PostgreSQL (no wait).

    Returns the started instance: pid, download_s, restore_started_at, pg_started_at and the restorer's figures.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the setup step's restore plan (templated)
    :param wal_parallel: WAL prefetch downloads at a time in restore_command (templated; None: the cluster's
        engine.jobs)
    :param extra_settings: more settings appended to postgresql.auto.conf
    :param progress_interval_s: seconds between two progress lines and bucket records
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "wal_parallel")

    def __init__(self, *, wal_parallel: int | str | None = None, extra_settings: dict[str, str] | None = None,
                 progress_interval_s: float = progress.DEFAULT_INTERVAL_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.wal_parallel = wal_parallel  # WAL prefetch downloads at a time; None: the cluster's engine.jobs
        self.extra_settings = extra_settings or {}
        self.progress_interval_s = progress_interval_s

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.planned()
        endpoint = s3_endpoint_url(cluster.engine_aws_conn_id)
        aws_env = aws_child_env(cluster.engine_aws_conn_id)
        started_at = utcnow()
        t0 = time.monotonic()
        wal_parallel = int(self.wal_parallel or cluster.engine.jobs)
        self._warm_prefetcher(cluster, plan, endpoint=endpoint, parallel=wal_parallel, env=aws_env)
        try:
            with self._progress(cluster, plan, context["run_id"]):
                restored = restore_base_backup(self.dbhost(cluster), cluster, backup_id=plan["backup_id"],
                                               data_dir=plan["data_dir"], env=aws_env, log=self.log)
        except CommandFailed as exc:
            raise AirflowFailException(
                f"cluster {cluster.name!r}: {getattr(exc, 'restorer', 'restore')} of backup {plan['backup_id']} from "
                f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base/{plan['backup_id']}/ failed: {exc}. "
                "The base backup cannot be restored: check its objects in the bucket and take a new backup") from None
        download_s = time.monotonic() - t0
        self.log.info("backup %s downloaded in %.1f s (%s)", plan["backup_id"], download_s, restored["restorer"])

        target = core.RecoveryTarget(kind=plan["target"]["kind"], value=plan["target"]["value"])
        wal_argv = barman_cloud.wal_restore_argv(cluster, endpoint_url=endpoint, parallel=wal_parallel,
                                                 spool_dir=plan["spool_dir"])
        data = plan["data_dir"]
        settings = core.recovery_settings(restore_command=core.restore_command(wal_argv), target=target,
                                          port=plan["port"], socket_dir=plan["socket_dir"],
                                          hba_file=f"{data}/pg_hba.conf", extra=self.extra_settings)
        write = 'printf "%s" "$1" >> "$2"'
        self.host(cluster, ["sh", "-c", '[ -e "$1" ] || : > "$1"', "sh", f"{data}/postgresql.conf"])
        self.host(cluster, ["sh", "-c", write, "sh", core.render_conf(settings), f"{data}/postgresql.auto.conf"])
        self.host(cluster, ["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", core.SCRATCH_HBA, f"{data}/pg_hba.conf"])
        self.host(cluster, ["rm", "-f", f"{data}/standby.signal", f"{data}/postmaster.pid"])
        self.host(cluster, ["touch", f"{data}/recovery.signal"])
        self.log.info("recovery settings: target %s, restore_command %s", target.describe(), settings["restore_command"])

        pg_started_at = utcnow()
        # The postmaster inherits the AWS credentials its restore_command needs (environment, not the config file).
        self.host(cluster, [pg_bin("pg_ctl"), "-D", data, "-l", plan["log_file"], "-W", "start"], env=aws_env,
                  timeout_s=60)
        pid = wait_started(self.dbhost(cluster), plan, "scratch PostgreSQL")
        self.log.info("scratch PostgreSQL started (postmaster pid %s) on 127.0.0.1:%s, socket %s", pid, plan["port"],
                      plan["socket_dir"])
        return {"pid": pid, "download_s": round(download_s, 3), "restore_started_at": started_at.isoformat(),
                "pg_started_at": pg_started_at.isoformat(), **restored}


    def _warm_prefetcher(self, cluster: Cluster, plan: dict[str, Any], *, endpoint: str | None, parallel: int,
                         env: dict[str, str]) -> None:
        """Start the restore_command's WAL prefetcher at the backup's first segment while the base backup downloads,
        so recovery's first calls find their segments waiting instead of a prefetcher starting. Only time is at
        stake: a prefetcher that does not start is started by the first call, as before."""
        argv = barman_cloud.wal_prefetch_start_argv(cluster, endpoint_url=endpoint, parallel=parallel,
                                                    spool_dir=plan["spool_dir"],
                                                    start_segment=plan.get("backup_begin_wal") or "")
        if argv is None:
            return  # no prefetcher in this restore_command
        res = self.host(cluster, argv, env=env, check=False, timeout_s=60)  # DB-host tools before --start: exit 2
        if res.returncode != 0:
            self.log.warning("the WAL prefetcher did not start ahead of recovery (exit %s); recovery's first "
                             "restore_command call starts it", res.returncode)

    def _progress(self, cluster: Cluster, plan: dict[str, Any], run_id: str) -> progress.ProgressTicker:
        """Bytes in the data directory on the restore host (its own DbHost: the restore's runner is busy) against
        the backup's size."""

        watcher = self.dbhost(cluster)
        total = plan.get("backup_size_bytes")
        return progress.ProgressTicker(
            kind="restore", what=f"restore of {cluster.name} backup {plan['backup_id']}", run_id=run_id, log=self.log,
            interval_s=self.progress_interval_s,
            publish=self.s3_hook(cluster.aws_conn_id).progress_publisher(cluster, "restore"),
            measure=lambda: {"done_bytes": watcher.used_bytes(plan["data_dir"]), "total_bytes": total,
                             "verb": "restored"})


def restore_base_backup(host: DbHost, cluster: Cluster, *, backup_id: str, data_dir: str, env: dict[str, str],
                        log) -> dict[str, Any]:
    """Restore a base backup into data_dir on host (missing or empty): pgops-restore, the backup's parts
    downloaded and extracted engine.jobs at a time, from the DB-host tools venv; where that venv predates it,
    barman-cloud-restore (one stream) with a warning. Raises CommandFailed (its ``restorer`` names the tool); a
    failed pgops-restore leaves data_dir marked (pgops_restore.incomplete, no global/pg_control) for the caller's
    teardown.

    Returns what to record: {"restorer", and from pgops-restore "parts", "jobs", "downloaded_bytes", ...}.
    """
    endpoint = s3_endpoint_url(cluster.engine_aws_conn_id)
    tool = cluster.engine.bin(barman_cloud.PARALLEL_RESTORE_TOOL)
    if host.exists(tool):
        argv = barman_cloud.parallel_restore_argv(cluster, endpoint_url=endpoint, backup_id=backup_id,
                                                  destination_dir=data_dir)
        try:
            res = host.run(argv, env=env, timeout_s=cluster.engine.timeout_s)
        except CommandFailed as exc:
            exc.restorer = barman_cloud.PARALLEL_RESTORE_TOOL
            raise
        summary = barman_cloud.parse_restore_summary(res.output_tail)
        keep = ("parts", "jobs", "downloaded_bytes", "extracted_bytes")
        return {"restorer": barman_cloud.PARALLEL_RESTORE_TOOL, **{k: summary[k] for k in keep if k in summary}}
    log.warning("%s is not on %s (its DB-host tools predate it): restoring backup %s with barman-cloud-restore, one "
                "stream. Fix: install the DB-host tools there again (scripts/setup.sh or the dbhost image)", tool,
                host.where, backup_id)
    try:
        host.run(barman_cloud.restore_argv(cluster, endpoint_url=endpoint, backup_id=backup_id,
                                           destination_dir=data_dir), env=env, timeout_s=cluster.engine.timeout_s)
    except CommandFailed as exc:
        exc.restorer = "barman-cloud-restore"
        raise
    return {"restorer": "barman-cloud-restore"}


def wait_started(host: DbHost, plan: dict[str, Any], what: str, timeout_s: float = 60) -> int:
    """The pid of the postmaster that pg_ctl started in plan's data directory, proven on its host."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = host.probe(plan["data_dir"], socket_dir=plan["socket_dir"], port=plan["port"], user=plan["db_user"],
                           sql="SELECT 1", log_file=plan["log_file"])
        pm = probe.postmaster
        if pm.running and pm.pid:
            return pm.pid
        parsed = core.parse_server_log(probe.log_tail)
        if parsed.failed:
            raise AirflowFailException(f"{what} did not start: {parsed.failure_message()}")
        if time.monotonic() >= deadline:
            raise AirflowFailException(f"{what} in {plan['data_dir']} on {host.where} has no running postmaster "
                                       f"after {timeout_s:.0f} s (postmaster.pid: {pm.state}); server log: "
                                       f"{host.tail_lines(plan['log_file'])}")
        time.sleep(0.2)


async def _first_event(trigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    return {"status": "error", "message": "the trigger ended without an event", "timed_out": False}


class RecoveryEndedOperator(RestoreStepOperator):
    """Deferrable wait until the scratch instance leaves recovery (no worker slot held through a long replay).

    Returns replay_s, segments_replayed, last_restored_segment, recovery_stop, recovered_at and rto_s.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the setup step's restore plan (templated)
    :param started: the restore step's result, the started instance (templated)
    :param timeout_s: fail when recovery has not ended after this long (templated)
    :param poll_interval_s: seconds between two looks at the instance
    :param wait_before_defer_s: how long to wait in the worker before deferring (a short replay never defers)
    :param progress_interval_s: seconds between two progress records of the replay
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "started", "timeout_s")

    def __init__(self, *, started: Mapping[str, Any] | str | None = None, timeout_s: float | str = 6 * 3600,
                 poll_interval_s: float = 2.0, wait_before_defer_s: float = 30.0,
                 progress_interval_s: float = progress.DEFAULT_INTERVAL_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.started = started
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.wait_before_defer_s = wait_before_defer_s
        self.progress_interval_s = progress_interval_s

    def run_step(self, context) -> dict[str, Any] | None:
        from pgops.airflow.triggers.restore import RecoveryEndedTrigger

        plan = self.planned()
        started = self.started_instance()
        timeout_s = param_checked(check_duration, "recovery_timeout_s", self.timeout_s, MAX_RECOVERY_TIMEOUT_S,
                                  min_s=1)
        watch = {"cluster_name": self.cluster.name, "data_dir": plan["data_dir"], "socket_dir": plan["socket_dir"],
                 "port": plan["port"], "user": plan["db_user"], "pid": started["pid"], "log_file": plan["log_file"],
                 "poll_interval_s": self.poll_interval_s,
                 "progress": {"run_id": context["run_id"], "what": f"replay of {self.cluster.name} backup "
                              f"{plan['backup_id']}", "target": core.RecoveryTarget(
                                  kind=plan["target"]["kind"], value=plan["target"]["value"]).describe()},
                 "progress_interval_s": self.progress_interval_s}
        # A short replay ends here, the same trigger run in place: no deferral for it. (A trigger that fires
        # seconds after its task deferred can race the scheduler's handling of that deferral, and the task is
        # failed although it succeeded: seen with the LocalExecutor.) A long replay defers and frees the slot.
        grace = min(self.wait_before_defer_s, timeout_s)
        if grace > 0:
            event = asyncio.run(_first_event(RecoveryEndedTrigger(**watch, timeout_s=grace)))
            if not event.get("timed_out"):
                return self._complete(context, event)
        self.defer(trigger=RecoveryEndedTrigger(**watch, timeout_s=timeout_s),
                   method_name="execute_complete", timeout=timedelta(seconds=timeout_s + 120))

    def started_instance(self) -> dict[str, Any]:
        started = as_mapping(self.started, "started")
        if not started:
            raise AirflowFailException(f"task {self.task_id}: no scratch instance: the restore step did not finish")
        return started

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        return self._guard(context, self._complete, context, event)

    def _complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        # after a deferral this is a fresh operator: plan and started are rendered again from the same XComs
        plan = self.planned()
        if event.get("status") != "success":
            for line in event.get("log_tail") or []:
                self.log.error("server log: %s", line)
            raise AirflowFailException(f"restore of backup {plan['backup_id']} to "
                                       f"{core.RecoveryTarget(**plan['target']).describe()} failed: {event.get('message')}")
        started = self.started_instance()
        begin, ready = core.log_timestamp(event.get("started_at")), core.log_timestamp(event.get("ready_at"))
        ended_at = datetime.fromisoformat(event["ended_at"])
        replay_s = (ready - begin).total_seconds() if begin and ready else \
            (ended_at - datetime.fromisoformat(started["pg_started_at"])).total_seconds()
        recovered_at = ready or ended_at
        rto_s = (recovered_at - datetime.fromisoformat(started["restore_started_at"])).total_seconds()
        result = {"replay_s": round(replay_s, 3), "segments_replayed": event.get("restored_segments"),
                  "last_restored_segment": event.get("last_restored_segment"),
                  "recovery_stop": event.get("recovery_stop"), "recovered_at": recovered_at.isoformat(),
                  "rto_s": round(rto_s, 3)}
        self.log.info("recovery ended: %s", result)
        return result


class RestoreChecksOperator(RestoreStepOperator):
    """Prove the data: canary row, system identifier, pg_amcheck, SQL checks (each must return no rows).

    Returns (and pushes under XCom key "checks", there when a check fails) the results, the database size and
    the databases.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the setup step's restore plan (templated)
    :param checks: the checks to run, a subset of pgops.core.restore.CHECKS (templated: a list or its JSON)
    :param heapallindexed: pg_amcheck --heapallindexed (templated)
    :param sql_dir: directory of the SQL checks (default include/sql/checks)
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "checks", "heapallindexed")

    def __init__(self, *, checks: Sequence[str] | str = core.CHECKS, heapallindexed: bool | str = True,
                 sql_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.checks = checks
        self.heapallindexed = heapallindexed
        self.sql_dir = sql_dir

    def _rows(self, plan: dict[str, Any], sql: str, dbname: str = "postgres") -> list[list[str]]:
        """Rows as text, asked on the restore host (the scratch instance listens on its socket only)."""
        return self._host.query(sql, socket_dir=plan["socket_dir"], port=plan["port"], user=plan["db_user"],
                                dbname=dbname, timeout_s=self.cluster.engine.timeout_s)

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.planned()
        self._host = self.dbhost(cluster)
        wanted = _as_list(self.checks)
        unknown = sorted(set(wanted) - set(core.CHECKS))
        if unknown:
            raise AirflowFailException(f"unknown check(s) {unknown}; known: {', '.join(core.CHECKS)}")
        dbs = [r[0] for r in self._rows(plan, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]
        size = int(self._rows(plan, "SELECT sum(pg_database_size(datname))::bigint FROM pg_database")[0][0])
        results: dict[str, dict[str, Any]] = {}
        if "canary" in wanted:
            results["canary"] = self._canary(plan)
        if "system_identifier" in wanted:
            results["system_identifier"] = self._system_identifier(cluster, plan)
        if "amcheck" in wanted:
            results["amcheck"] = self._amcheck(cluster, plan)
        if "sql" in wanted:
            results.update(self._sql_checks(plan, dbs))
        failed = {k: v for k, v in results.items() if not v["ok"] and not v.get("skipped")}
        out = {"checks": results, "database_size_bytes": size, "databases": dbs}
        context["ti"].xcom_push(key="checks", value=out)
        for name, res in results.items():
            self.log.info("check %-28s %s %s", name, "skipped" if res.get("skipped") else ("ok" if res["ok"] else "FAILED"),
                          res.get("detail", ""))
        if failed:
            raise AirflowFailException("restored data failed check(s): " +
                                       "; ".join(f"{k}: {v.get('detail')}" for k, v in failed.items()))
        return out

    def _canary(self, plan: dict[str, Any]) -> dict[str, Any]:
        canary = plan.get("canary")
        if not canary:
            return {"ok": True, "skipped": True, "detail": "no canary for this target"}
        if self._rows(plan, "SELECT to_regclass('pgops.restore_canary') IS NOT NULL")[0][0] != "t":
            return {"ok": False, "detail": f"table pgops.restore_canary is missing, so canary row {canary['id']} "
                                           f"(committed {canary['committed_at']}) did not come back"}
        if self._rows(plan, f"SELECT 1 FROM pgops.restore_canary WHERE id = {int(canary['id'])}"):
            return {"ok": True, "detail": f"canary row {canary['id']} (committed {canary['committed_at']}) is there",
                    "rpo_proven_at": canary["committed_at"]}
        rows = self._rows(plan, "SELECT max(id) FROM pgops.restore_canary")
        newest = (rows[-1][0] or None) if rows else None
        return {"ok": False, "detail": f"canary row {canary['id']} (committed {canary['committed_at']}, segment "
                                       f"{canary['segment']}) is missing (newest canary restored: {newest}): backup plus "
                                       "WAL do not reach the canary"}

    def _system_identifier(self, cluster: Cluster, plan: dict[str, Any]) -> dict[str, Any]:
        sql = "SELECT system_identifier::text AS sysid FROM pg_control_system()"
        restored = self._rows(plan, sql)[0][0]
        primary = pg_query(cluster.postgres_conn_id, sql)[0]["sysid"]
        ok = restored == primary
        detail = f"restored {restored}, primary {primary}"
        if plan.get("systemid") and plan["systemid"] != restored:
            ok, detail = False, detail + f", catalog {plan['systemid']}"
        return {"ok": ok, "detail": detail if ok else f"system identifier differs: {detail}: this is not a copy of "
                                                      "the primary (wrong bucket prefix or server_name?)"}

    def _amcheck(self, cluster: Cluster, plan: dict[str, Any]) -> dict[str, Any]:
        argv = [pg_bin("pg_amcheck"), "-h", plan["socket_dir"], "-p", str(plan["port"]), "-U", plan["db_user"],
                "--all", "--install-missing", "--no-password"]
        if str(self.heapallindexed).lower() in ("true", "1", "yes"):
            argv.append("--heapallindexed")
        res = self.host(cluster, argv, timeout_s=cluster.engine.timeout_s, check=False)
        if res.returncode == 0:
            return {"ok": True, "detail": f"pg_amcheck --all{' --heapallindexed' if '--heapallindexed' in argv else ''}"
                                          f" clean in {res.duration_s:.1f} s"}
        lines = [line for line in res.output_tail if line.strip()][-10:]
        return {"ok": False, "detail": f"pg_amcheck exit {res.returncode}: " + " | ".join(lines)}

    def _sql_checks(self, plan: dict[str, Any], dbs: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(Path(self.sql_dir or SQL_CHECKS_DIR).glob("*.sql")):
            sql = path.read_text()
            bad: list[str] = []
            for db in dbs:
                try:
                    rows = self._rows(plan, sql, dbname=db)
                except DbHostError as exc:  # a broken check is a failed check, named with its database
                    bad.append(f"{db}: error {str(exc).strip()}")
                    continue
                for row in rows[:20]:
                    self.log.error("check %s in %s returned %s", path.name, db, tuple(row))
                    bad.append(f"{db}: {tuple(row)}")
            out[f"sql:{path.stem}"] = {"ok": not bad, "detail": "no rows" if not bad else "; ".join(bad[:10])}
        return out


def step_outcomes(steps: Any, optional: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """(errors by step, steps that did not finish) from the factory's mapping {task id: {"value", "error"}}: a step
    not finished returned nothing and recorded no error; an optional one may return nothing."""
    outcomes = {name: as_mapping(outcome, f"outcome of {name}") or {}
                for name, outcome in (as_mapping(steps, "steps") or {}).items()}
    errors = {name: str(o["error"]) for name, o in outcomes.items() if o.get("error")}
    missing = [name for name, o in outcomes.items()
               if name not in optional and o.get("value") is None and name not in errors]
    return errors, missing


class RestoreReportOperator(RestoreStepOperator):
    """Measurements, RTO against the target and its trend, a durable JSON report; fails the run if any step failed.

    :param cluster_name: the inventory cluster (templated)
    :param steps: every step's outcome by task id, ``{task_id: {"value": <return value>, "error": <XCom
        "error">}}`` (templated); a step that returned nothing and recorded no error did not finish
    :param optional_steps: steps that may return nothing (the canary, skipped for a fixed target)
    :param plan: the setup step's restore plan (templated)
    :param canary: the canary step's result (templated)
    :param started: the restore step's result (templated)
    :param recovery: the recovery wait's result (templated)
    :param checks: the checks step's results, its XCom "checks" (templated)
    :param horizon_days: the RTO trend's warning horizon (templated)
    :param keep: whether the scratch instance is kept, for the report (templated)
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "steps", "canary", "started", "recovery",
                                      "checks", "horizon_days", "keep")

    def __init__(self, *, steps: Mapping[str, Any] | str | None = None, optional_steps: Sequence[str] = ("canary",),
                 canary: Mapping[str, Any] | str | None = None, started: Mapping[str, Any] | str | None = None,
                 recovery: Mapping[str, Any] | str | None = None, checks: Mapping[str, Any] | str | None = None,
                 horizon_days: int | str = 90, keep: bool | str = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.steps = steps
        self.optional_steps = tuple(optional_steps)
        self.canary = canary
        self.started = started
        self.recovery = recovery
        self.checks = checks
        self.horizon_days = horizon_days
        self.keep = keep

    def run_step(self, context) -> dict[str, Any]:

        cluster = self.cluster
        errors, missing = step_outcomes(self.steps, self.optional_steps)
        failed = bool(errors or missing)
        checks = as_mapping(self.checks, "checks") or {}
        plan = as_mapping(self.plan, "plan") or {}
        restore = as_mapping(self.started, "started") or {}
        wait = as_mapping(self.recovery, "recovery") or {}
        measurements = {
            "database_size_bytes": checks.get("database_size_bytes"),
            "backup_size_bytes": plan.get("backup_size_bytes"),
            "download_s": restore.get("download_s"), "restorer": restore.get("restorer"),
            "restore_parts": restore.get("parts"), "replay_s": wait.get("replay_s"),
            "segments_replayed": wait.get("segments_replayed"), "rto_s": wait.get("rto_s") if not failed else None,
        }
        s3 = self.s3_hook(cluster.aws_conn_id)
        trend = core.RtoTrend(points=0, horizon_days=int(self.horizon_days))
        if measurements["rto_s"] is not None and measurements["database_size_bytes"]:
            history = core.history_points(s3.list_reports(cluster, "restore-verify"))
            history.append({"at": utcnow(), "size_bytes": measurements["database_size_bytes"],
                            "rto_s": measurements["rto_s"]})
            trend = core.rto_trend(history, target_s=cluster.targets.rto_s, horizon_days=int(self.horizon_days))
        status = core.report_status(failed=failed, rto_s=measurements["rto_s"], rto_target_s=cluster.targets.rto_s,
                                    trend_warning=trend.warning)
        started_at = restore.get("restore_started_at") or (context.get("dag_run") and
                                                           getattr(context["dag_run"], "start_date", None))
        body = {
            "backup_id": plan.get("backup_id"), "backup_end_time": plan.get("backup_end_time"),
            "target": plan.get("target"), "target_param": plan.get("target_param"), "canary": as_mapping(self.canary, "canary"),
            "recovery_stop": wait.get("recovery_stop"), "last_restored_segment": wait.get("last_restored_segment"),
            "checks": checks.get("checks"), "measurements": measurements, "rto_target_s": cluster.targets.rto_s,
            "rto_trend": trend.to_dict(), "errors": errors, "steps_not_finished": missing,
            "restore_host": {"runner": cluster.runner.kind, "queue": cluster.runner.queue,
                             "scratch_dir": plan.get("scratch_dir"), "kept": truthy(self.keep)},
        }
        report = envelope(kind="restore-verify", cluster=cluster.name, run_id=context["run_id"],
                          started_at=_as_dt(started_at) or utcnow(), status=status, body=body)
        key = s3.write_report(cluster, report)
        self.log.info("restore verification of %s: %s | backup %s | target %s | size %s | download %s s | replay %s s "
                      "(%s segments) | RTO %s s (target %s s) | report s3://%s/%s", cluster.name, status.upper(),
                      plan.get("backup_id"), plan.get("target"), core.human_bytes(measurements["database_size_bytes"] or 0),
                      measurements["download_s"], measurements["replay_s"], measurements["segments_replayed"],
                      measurements["rto_s"], cluster.targets.rto_s, cluster.storage.bucket, key)
        if trend.warning:
            self.log.warning("%s", trend.warning)
        if failed:
            what = "; ".join(f"{k}: {v}" for k, v in errors.items()) or f"step(s) {', '.join(missing)} did not finish"
            raise AirflowFailException(f"restore verification of {cluster.name} failed: {what}")
        if status == "critical":
            raise AirflowFailException(f"restore verification of {cluster.name}: RTO {measurements['rto_s']:.0f} s is over "
                                       f"the target {cluster.targets.rto_s} s (database {core.human_bytes(measurements['database_size_bytes'])})")
        return {"status": status, "key": key, "measurements": measurements}


class RestoreTeardownOperator(RestoreStepOperator):
    """Stop the scratch PostgreSQL (pg_ctl -m immediate, then its pid) and remove the scratch area, unless keep.

    Runs whatever happened upstream: without a plan (setup failed, was killed or never ran) it removes what a
    partial setup made at the path setup derives from the run.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the setup step's restore plan (templated; None when setup did not finish)
    :param keep: leave the scratch instance running and log how to remove it (templated)
    :param scratch_root: directory on the restore host for scratch areas (templated)
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "keep", "scratch_root")

    def __init__(self, *, keep: bool | str = False, scratch_root: str = DEFAULT_SCRATCH_ROOT, **kwargs: Any):
        super().__init__(**kwargs)
        self.keep = keep
        self.scratch_root = scratch_root

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = as_mapping(self.plan, "plan")
        if not plan:
            # Setup did not finish (failed, killed or never ran): there is no instance worth keeping, only
            # whatever a partial setup made. Same path as setup derives from the run.
            paths = scratch_paths(str(self.scratch_root), self.dag_id, context["run_id"])
            stopped = stop_and_remove(self.dbhost(cluster), paths)
            return {"kept": False, "scratch_dir": paths["scratch_dir"], "stopped_pid": stopped}
        if truthy(self.keep):
            port = plan.get("port", "<port>")
            self.log.warning(
                "keep is set: the scratch instance stays up. Connect (as root or the postgres OS user): "
                "psql -h %s -p %s -U %s -d postgres   Remove it: %s -D %s -m fast stop && rm -rf %s",
                plan["socket_dir"], port, plan.get("db_user", "postgres"), pg_bin("pg_ctl"), plan["data_dir"],
                plan["scratch_dir"])
            return {"kept": True, "scratch_dir": plan["scratch_dir"]}
        stopped = stop_and_remove(self.dbhost(cluster), {**plan, "scratch_root": plan.get("scratch_root") or
                                                         str(self.scratch_root)})
        return {"kept": False, "scratch_dir": plan["scratch_dir"], "stopped_pid": stopped}


def stop_and_remove(host: DbHost, paths: dict[str, Any]) -> int | None:
    """Stop a scratch PostgreSQL (its proven postmaster, immediate mode) and remove its scratch directory.

    The directory is removed only when it lies inside the scratch root and is no symlink, proven on the host.
    """
    stopped = stop_proven_postmaster(host, paths["data_dir"], mode="immediate",
                                     fix=f"remove {paths['scratch_dir']} by hand")
    host.remove_tree(paths["scratch_dir"], within=paths["scratch_root"], timeout_s=1800)
    return stopped


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            value = [v.strip() for v in value.strip("[]").replace("'", "").split(",")]
    return [str(v).strip() for v in value if str(v).strip()]


def _as_dt(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value)
    return None
