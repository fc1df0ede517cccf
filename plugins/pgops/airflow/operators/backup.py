"""Base-backup operators: preflight, barman-cloud backup, verification (+ asset event) and retention."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow import progress
from pgops.airflow.hooks import pg_query, pg_target, s3_endpoint_url
from pgops.airflow.operators.base import ClusterOperator, as_mapping
from pgops.core.archiver import ARCHIVER_SQL, archiver_health
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.runners import CommandFailed
from pgops.inventory import Cluster

CLUSTER_SIZE_SQL = "SELECT sum(pg_database_size(datname))::bigint AS size FROM pg_database"
# The preflight's one query: the archiver's state and the databases' size.
PREFLIGHT_SQL = f"SELECT a.*, ({CLUSTER_SIZE_SQL}) AS cluster_size_bytes FROM ({ARCHIVER_SQL}) a"


def backup_name_for_run(run_id: str) -> str:
    """The barman backup name of one Airflow run, so a retry finds the backup it made, and no other run's.

    Readable (the run id made safe, cut to 80 characters) and exact: a hash of the whole run id ends it, so run ids
    that share a beginning (``nightly``, ``nightly-2``), differ after 80 characters or only in characters made safe
    never share a name. A retry's further attempts add ``-a<N>`` (see ``is_own_backup_name``).
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")[:80].rstrip("-.")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return f"pgops-{safe}-{digest}" if safe else f"pgops-{digest}"


def is_own_backup_name(candidate: str | None, name: str) -> bool:
    """The backup named ``name`` or one of its retry attempts (``<name>-a<N>``): exact, never a prefix match."""
    return bool(candidate) and (candidate == name or re.fullmatch(re.escape(name) + r"-a[0-9]+", candidate) is not None)


def next_attempt_name(name: str, existing: list[str]) -> str:
    """The name of a new attempt of the run's backup: ``name`` first, then ``<name>-a<N>`` past every attempt made."""
    if not existing:
        return name
    attempts = [int(m.group(1)) for n in existing if (m := re.fullmatch(re.escape(name) + r"-a([0-9]+)", n))]
    return f"{name}-a{max([len(existing), *attempts]) + 1}"


class BackupPreflightOperator(ClusterOperator):
    """PostgreSQL reachable, WAL archiving healthy, bucket reachable and writable; then what the backup task needs.

    Returns the archiver's state, the databases' size (the backup's part size) and this run's backups already in
    the catalog (``run_backups``: id, name, status of the run's backup name and its retry attempts), so that the
    backup task's first attempt starts barman-cloud-backup without look-ups of its own (made here with the
    connection and the S3 client the checks already opened).
    """

    def execute(self, context) -> dict[str, Any]:

        cluster = self.cluster
        try:
            rows = pg_query(cluster.postgres_conn_id, PREFLIGHT_SQL)
        except Exception as exc:  # psycopg2.OperationalError and friends: the server may come back, so retry
            t = pg_target(cluster.postgres_conn_id)
            raise RuntimeError(f"cluster {cluster.name!r}: PostgreSQL at {t.host}:{t.port} is not reachable "
                               f"({str(exc).strip()}). Fix: start the server or correct connection "
                               f"{cluster.postgres_conn_id!r}") from None
        row = dict(rows[0])
        size = row.pop("cluster_size_bytes", None)
        health = archiver_health(row)
        self.log.info("%s", health.message)
        if not health.healthy:
            raise AirflowFailException(f"cluster {cluster.name!r}: {health.message}")
        s3 = self.s3
        self._check_bucket(cluster, s3, context)
        name = backup_name_for_run(context["run_id"])
        run_backups = self._run_backups(cluster, name, s3)
        return {"archiver": {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
                             if k != "archive_command"},
                "cluster_size_bytes": int(size) if size else None,
                "run_id": context["run_id"], "backup_name": name, "run_backups": run_backups}

    def _run_backups(self, cluster: Cluster, name: str, s3) -> list[dict[str, Any]]:
        """This run's backups in barman's catalog; a failed read names where and the fix, and is retried (a 403
        can be a policy being rolled out, a 500 the store's own hiccup)."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base/"
        try:
            return run_backups_in_catalog(cluster, name, s3=s3)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise RuntimeError(
                f"cluster {cluster.name!r}: cannot read barman-cloud's catalog in {base} ({err.get('Code', '?')} on "
                f"{exc.operation_name}: {err.get('Message', '')}). Fix: grant connection {cluster.aws_conn_id!r} "
                f"s3:ListBucket on {cluster.storage.server_prefix}/base/ and s3:GetObject on its backup.info files "
                "(include/iam/), or wait for the object store to answer; the task is retried") from None
        except BotoCoreError as exc:
            raise RuntimeError(f"cluster {cluster.name!r}: cannot read barman-cloud's catalog in {base} ({exc}). Fix: "
                               "check the S3 endpoint and the network; the task is retried") from None

    def _check_bucket(self, cluster: Cluster, s3, context) -> None:
        from airflow.providers.common.compat.sdk import AirflowException
        from botocore.exceptions import ClientError, EndpointConnectionError

        bucket = cluster.storage.bucket
        try:
            s3.get_conn().head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise AirflowFailException(f"cluster {cluster.name!r}: bucket {bucket!r} does not exist. Fix: create it "
                                           "(with versioning and a lifecycle rule longer than the retention policy) "
                                           "or correct storage.bucket in the inventory") from None
            if code in ("403", "AccessDenied"):
                raise AirflowFailException(f"cluster {cluster.name!r}: access to bucket {bucket!r} is denied. Fix: grant "
                                           f"s3:ListBucket/GetObject/PutObject to connection {cluster.aws_conn_id!r} "
                                           "(see include/iam/)") from None
            raise
        except EndpointConnectionError as exc:
            raise RuntimeError(f"cluster {cluster.name!r}: S3 endpoint not reachable: {exc}") from None
        probe = cluster.storage.report_key("preflight", "write-probe")
        try:
            s3.load_bytes(context["run_id"].encode(), key=probe, bucket_name=bucket, replace=True)
            s3.delete_objects(bucket, [probe])
        except (ClientError, AirflowException) as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: bucket {bucket!r} is not writable under "
                                       f"{cluster.storage.server_prefix}/ ({exc}). Fix: grant s3:PutObject") from None
        self.log.info("bucket s3://%s/%s/ reachable and writable", bucket, cluster.storage.server_prefix)


class BarmanCloudBackupOperator(ClusterOperator):
    """Run barman-cloud-backup on the DB host. A retry reuses a DONE backup of the same run, never duplicates it.

    :param cluster_name: inventory cluster
    :param preflight: the preflight task's return value (templated): the databases' size and this run's backups
        in the catalog, read just before. The first attempt takes them as they are; a later attempt (a retry or a
        cleared task), or one without them, reads the catalog again, since an earlier attempt may have made one.
    :param progress_interval_s: how often the bytes uploaded so far go to the task log and the dashboard
    """

    template_fields: Sequence[str] = ("cluster_name", "preflight")

    def __init__(self, *, preflight: dict[str, Any] | str | None = None,
                 progress_interval_s: float = progress.DEFAULT_INTERVAL_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.preflight = preflight
        self.progress_interval_s = progress_interval_s

    def execute(self, context) -> str:
        cluster = self.cluster
        base_name = backup_name_for_run(context["run_id"])
        s3 = self.s3
        pre = preflight_findings(as_mapping(self.preflight, "preflight"), run_id=context["run_id"],
                                 try_number=getattr(context.get("ti"), "try_number", None))
        if pre is None:
            existing, size = self._look_up(cluster, base_name, s3)
        else:
            existing, size = pre["run_backups"], pre["cluster_size_bytes"]
            self.log.info("first attempt: this run's backups and the databases' size as the preflight read them")
        for entry in existing:
            if entry.get("status") == "DONE":
                self.log.info("backup %s (%s) of this run is already DONE: reusing it", entry["backup_id"],
                              entry.get("backup_name"))
                return entry["backup_id"]
        # A failed earlier attempt leaves its own (FAILED) entry; a new attempt gets its own name.
        name = next_attempt_name(base_name, [entry.get("backup_name") or "" for entry in existing])
        t = pg_target(cluster.postgres_conn_id)
        # In parts sized from the database, so that a restore takes engine.jobs of them at a time.
        argv = barman_cloud.backup_argv(cluster, endpoint_url=s3_endpoint_url(cluster.engine_aws_conn_id),
                                        backup_name=name, pg_host=t.host, pg_port=t.port, pg_user=t.user,
                                        pg_dbname=t.dbname, cluster_size_bytes=size)
        # barman's own log names the backup it made: no S3 client and no catalog read for a backup that needs
        # no progress record (the first is due after progress_interval_s); the verify task reads its catalog entry.
        out = barman_cloud.BackupLog(self.log.info)
        try:
            with self._progress(cluster, s3, context["run_id"], size):
                self.run_engine(cluster, argv, on_line=out)
        except CommandFailed as exc:
            raise RuntimeError(f"cluster {cluster.name!r}: barman-cloud-backup failed: {exc}") from None
        if out.chunk_lines:
            self.log.info("(%d per-chunk upload lines of barman-cloud-backup not logged)", out.chunk_lines)
        if out.made():
            self.log.info("barman-cloud-backup finished: backup %s (%s)", out.made(), name)
            return out.made()
        made = [(i, info) for i, info in catalog_by_name(cluster, name, s3=s3) if info.get("backup_name") == name]
        if not made:
            raise RuntimeError(f"cluster {cluster.name!r}: barman-cloud-backup exited 0 but no backup named {name!r} is "
                               f"in s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base/. Fix: check the "
                               "task log and the bucket's permissions (s3:GetObject)")
        backup_id, info = made[-1]
        self.log.info("barman-cloud-backup finished: backup %s (%s) status %s", backup_id, name, info.get("status"))
        return backup_id

    def _look_up(self, cluster: Cluster, base_name: str, s3) -> tuple[list[dict[str, Any]], int | None]:
        """This run's backups in the catalog and the databases' size, read at once (independent round trips)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="pgops-backup-prep") as pool:
            existing_f = pool.submit(run_backups_in_catalog, cluster, base_name, s3=s3)
            size_f = pool.submit(cluster_size_bytes, cluster)
            return existing_f.result(), size_f.result()

    def _progress(self, cluster: Cluster, s3, run_id: str, total: int | None) -> progress.ProgressTicker:
        """Bytes uploaded under base/ since the start (finished objects and the parts of open multipart uploads)
        against the cluster's size before compression (``total``, None when unknown). ``s3``: a PgopsS3Hook."""
        since = datetime.now(UTC) - timedelta(seconds=2)  # S3 times have whole seconds
        prefix = f"{cluster.storage.server_prefix}/base/"
        return progress.ProgressTicker(
            kind="backup", what=f"base backup of {cluster.name}", run_id=run_id, log=self.log,
            interval_s=self.progress_interval_s, publish=_lazy_publisher(s3, cluster, "backup"), skip_end_if_short=True,
            measure=lambda: {"done_bytes": s3.uploaded_since(cluster.storage.bucket, prefix, since),
                             "total_bytes": total, "total_note": " before compression", "verb": "uploaded"})


def _lazy_publisher(s3, cluster: Cluster, kind: str):
    """The hook's progress publisher, made at the first record (making it makes the S3 client: not before barman)."""
    made = []

    def publish(record: dict[str, Any]) -> None:
        if not made:
            made.append(s3.progress_publisher(cluster, kind))
        made[0](record)

    return publish


def preflight_findings(pre: dict[str, Any] | None, *, run_id: str, try_number: int | None) -> dict[str, Any] | None:
    """The preflight's catalog read and size when the backup task may take them as they are, else None.

    Only for the task's first attempt in the run the preflight ran for: until then no attempt of this run can have
    made a backup, so the catalog the preflight read moments before is still the truth. A retry or a cleared
    task (try_number > 1, or unknown) may follow an attempt that made one, so it reads the catalog itself.
    """
    if not pre or try_number != 1 or pre.get("run_id") != run_id:
        return None
    backups = pre.get("run_backups")
    if not isinstance(backups, list) or not all(isinstance(b, Mapping) and b.get("backup_id") for b in backups):
        return None
    size = pre.get("cluster_size_bytes")
    return {"run_backups": [dict(b) for b in backups],
            "cluster_size_bytes": int(size) if isinstance(size, int) and size > 0 else None}


def cluster_size_bytes(cluster: Cluster) -> int | None:
    """The databases' size on the primary, or None when it cannot be read (barman's default part size then)."""
    try:
        return int(pg_query(cluster.postgres_conn_id, CLUSTER_SIZE_SQL)[0]["size"] or 0) or None
    except Exception:  # noqa: BLE001 - only the part size depends on it
        return None


def catalog_by_name(cluster: Cluster, name: str, *, s3=None) -> list[tuple[str, dict[str, str]]]:
    """(backup id, backup.info) of the backups named ``name`` or one of its retry attempts, oldest first.

    Read from barman-cloud's own catalog files in the bucket (one listing, the backup.info files fetched at once)
    instead of a barman-cloud-backup-list start (about a second). A backup still uploading has no backup.info yet.
    ``s3``: a PgopsS3Hook (one is made for the cluster's connection when None).
    """
    if s3 is None:
        from pgops.airflow.hooks import PgopsS3Hook

        s3 = PgopsS3Hook(aws_conn_id=cluster.aws_conn_id)
    infos = s3.backup_infos(cluster, s3.backup_ids(cluster))
    return [(backup_id, info) for backup_id, info in sorted(infos.items())
            if is_own_backup_name(info.get("backup_name"), name)]


def run_backups_in_catalog(cluster: Cluster, name: str, *, s3=None) -> list[dict[str, Any]]:
    """The run's backups (``name`` and its retry attempts) as the preflight passes them on: id, name, status."""
    return [{"backup_id": backup_id, "backup_name": info.get("backup_name"), "status": info.get("status")}
            for backup_id, info in catalog_by_name(cluster, name, s3=s3)]


class BarmanCloudVerifyBackupOperator(ClusterOperator):
    """The new backup must be DONE in the catalog, its end WAL archived; then emit the backup asset event.

    :param cluster_name: inventory cluster
    :param backup_id: the backup task's return value (templated); a reserved name (latest, oldest) is refused
    :param wal_wait_timeout_s: how long the deferred wait for the backup's end WAL segment in the bucket may take
    :param poll_interval_s: how often that wait lists the segment's key
    """

    template_fields: Sequence[str] = ("cluster_name", "backup_id")

    def __init__(self, *, backup_id: str, wal_wait_timeout_s: int = 900, poll_interval_s: float = 5.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.backup_id = backup_id
        self.wal_wait_timeout_s = wal_wait_timeout_s
        self.poll_interval_s = poll_interval_s

    def execute(self, context) -> dict[str, Any] | None:
        from pgops.airflow.triggers.s3 import WalSegmentArchivedTrigger

        cluster = self.cluster
        if not self.backup_id or self.backup_id.lower() in barman_cloud.RESERVED_BACKUP_NAMES:
            raise AirflowFailException(f"cluster {cluster.name!r}: backup_id {self.backup_id!r} is not a backup id. "
                                       "Fix: pass the id returned by the backup task")
        show = self.run_engine(cluster, barman_cloud.backup_show_argv(
            cluster, endpoint_url=s3_endpoint_url(cluster.engine_aws_conn_id), backup_id=self.backup_id),
            capture=True, timeout_s=600)
        info = barman_cloud.parse_backup_show(show.stdout)
        if not info.done:
            raise AirflowFailException(f"cluster {cluster.name!r}: backup {info.backup_id} has status {info.status}"
                                       f"{': ' + info.error if info.error else ''}; it is not usable for a restore. "
                                       "Fix: read the backup task's log; the next run takes a new backup")
        if not info.end_wal:
            raise AirflowFailException(f"cluster {cluster.name!r}: backup {info.backup_id} has no end WAL in its catalog")
        wal_prefix = f"{cluster.storage.server_prefix}/wals/{info.end_wal[:16]}/{info.end_wal}"
        context["ti"].xcom_push(key="backup_info", value=info.to_dict())
        self.defer(
            trigger=WalSegmentArchivedTrigger(aws_conn_id=cluster.aws_conn_id, bucket=cluster.storage.bucket,
                                              key_prefix=wal_prefix, poll_interval_s=self.poll_interval_s,
                                              timeout_s=self.wal_wait_timeout_s),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.wal_wait_timeout_s + 60),
        )
        return None

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        cluster = self.cluster
        if event.get("status") != "success":
            raise AirflowFailException(f"cluster {cluster.name!r}: backup {self.backup_id}: {event.get('message')}")
        info = context["ti"].xcom_pull(task_ids=self.task_id, key="backup_info")
        stored = _stored_bytes(cluster, info["backup_id"])
        begin, end = info.get("begin_time"), info.get("end_time")
        duration_s = _duration_s(begin, end)
        summary = {
            "cluster": cluster.name, "backup_id": info["backup_id"], "backup_name": info.get("backup_name"),
            "status": info["status"], "begin_wal": info["begin_wal"], "end_wal": info["end_wal"],
            "begin_lsn": info.get("begin_lsn"), "end_lsn": info.get("end_lsn"), "begin_time": begin, "end_time": end,
            "duration_s": duration_s, "cluster_size_bytes": info.get("cluster_size_bytes"),
            "stored_bytes": stored, "timeline": info.get("timeline"), "systemid": info.get("systemid"),
            "location": f"s3://{cluster.storage.bucket}/{cluster.storage.server_prefix}/base/{info['backup_id']}/",
            "end_wal_key": event.get("key"),
        }
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = summary
        self.log.info("backup verified: %s", summary)
        return summary


class BarmanCloudRetentionOperator(ClusterOperator):
    """barman-cloud-backup-delete by the cluster's retention policy (only downstream of a verified backup).

    :param cluster_name: inventory cluster
    :param dry_run: only log what the policy would delete (templated: a bool or its text)
    """

    template_fields: Sequence[str] = ("cluster_name", "dry_run")

    def __init__(self, *, dry_run: bool | str = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.dry_run = dry_run

    def execute(self, context) -> dict[str, Any]:
        cluster = self.cluster
        dry_run = str(self.dry_run).lower() in ("true", "1", "yes")
        before = {b.backup_id for b in self.catalog(cluster)}
        argv = barman_cloud.backup_delete_argv(cluster, endpoint_url=s3_endpoint_url(cluster.engine_aws_conn_id), dry_run=dry_run)
        self.run_engine(cluster, argv, timeout_s=3600)
        after = {b.backup_id for b in self.catalog(cluster)}
        deleted = sorted(before - after)
        self.log.info("retention %s (minimum redundancy %d)%s: deleted %s; kept %s", cluster.retention.policy,
                      cluster.retention.minimum_redundancy, " [dry run]" if dry_run else "", deleted or "nothing",
                      sorted(after))
        return {"dry_run": dry_run, "deleted": deleted, "kept": sorted(after)}


def _stored_bytes(cluster: Cluster, backup_id: str) -> int:
    from pgops.airflow.hooks import PgopsS3Hook

    return PgopsS3Hook(aws_conn_id=cluster.aws_conn_id).stored_bytes(
        cluster.storage.bucket, f"{cluster.storage.server_prefix}/base/{backup_id}/")


def _duration_s(begin: str | None, end: str | None) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(begin)).total_seconds(), 3)
    except (TypeError, ValueError):
        return None
