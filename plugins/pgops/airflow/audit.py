"""The WAL archive and bucket lifecycle audit of one cluster: the I/O runner around the pure core.

It lists the cluster's prefix once as a stream (pages of 1,000 keys, never all keys in memory),
fetches only the metadata the layout parser names (backup.info, sentinels, .history), reads the
bucket's lifecycle and hardening settings and asks the live primary about archiving. The verdicts
come from the core (layouts, continuity, lifecycle); this module turns them into one report envelope
(kind "wal-audit"). Used by WalArchiveAuditOperator and by `pgops audit`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgops.core import findings as F
from pgops.core import layouts, lifecycle, reports, wal
from pgops.core.archiver import ARCHIVER_SQL, archiver_health
from pgops.core.continuity import check_continuity
from pgops.inventory import Cluster

KIND = "wal-audit"
PAGE_SIZE = 1000
MAX_BACKUPS_IN_REPORT = 200
ARCHIVE_LAG_MIN_SEGMENTS = 1
PG_WAL_SIZE_FACTOR = 2  # pg_wal above this many times (max_wal_size + wal_keep_size) is piling up
EXIT_CODES = {F.OK: 0, F.WARNING: 1, F.CRITICAL: 2}
_UNSUPPORTED_CODES = {"NotImplemented", "501", "XNotImplemented", "MethodNotAllowed", "UnsupportedOperation"}

# Everything the audit asks the primary in one round trip (pg_ls_waldir needs pg_monitor: asked apart).
PRIMARY_SQL = f"""
SELECT a.*,
       CASE WHEN a.in_recovery THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       pg_size_bytes(current_setting('wal_segment_size')) AS wal_segment_size_bytes,
       (SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout') AS archive_timeout_s,
       pg_size_bytes(current_setting('max_wal_size')) AS max_wal_size_bytes,
       pg_size_bytes(current_setting('wal_keep_size')) AS wal_keep_size_bytes,
       now() AS db_now
FROM ({ARCHIVER_SQL}) a
"""
PG_WAL_SQL = "SELECT count(*) AS files, coalesce(sum(size), 0)::bigint AS size_bytes FROM pg_ls_waldir()"

SqlRunner = Callable[[str], list[dict[str, Any]]]


class AuditError(RuntimeError):
    """The audit cannot run at all (no bucket, no access): only a human can fix it."""


# --- helpers --------------------------------------------------------------------------------------


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return "NotImplemented" if status == 501 and not code else code


def _unsupported(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return (_error_code(exc) in _UNSUPPORTED_CODES
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501)


def interval_s(cron: str, *, now: datetime) -> float | None:
    """Seconds between two runs of a cron expression or preset (None for @once)."""
    if cron == "@once":
        return None
    from croniter import croniter

    it = croniter(cron, now)
    first = it.get_next(datetime)
    return (it.get_next(datetime) - first).total_seconds()


def decompress(key: str, data: bytes) -> bytes:
    """Decompress a fetched object by its magic bytes (gzip, bzip2, xz, zstd, lz4 when installed)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard  # optional: without it the file stays unreadable and the audit says so

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if data[:4] == b"\x04\x22\x4d\x18":
        import lz4.frame  # optional, as above

        return lz4.frame.decompress(data)
    return data


def _age_s(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else max((now - when).total_seconds(), 0.0)


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


# --- the bucket -----------------------------------------------------------------------------------


def iter_listing(s3, bucket: str, prefix: str, *,
                 skip_prefixes: tuple[str, ...] = ()) -> Iterator[tuple[str, int, datetime | None]]:
    """(key, size_bytes, last_modified) of every object under prefix, page by page (1,000 keys per request)."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE_SIZE}):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if skip_prefixes and key.startswith(skip_prefixes):
                continue
            yield key, obj.get("Size", 0), obj.get("LastModified")


FETCH_THREADS = 8


def fetch(s3, bucket: str, keys: list[str]) -> tuple[dict[str, bytes], dict[str, datetime]]:
    """Fetch and decompress the named objects, up to FETCH_THREADS at once (each is one small GET: a catalog of a
    month of nightly backups is thirty); a missing or undecodable one is simply not returned."""
    from botocore.exceptions import ClientError

    def one(key: str) -> tuple[bytes, datetime | None] | None:
        try:
            obj = s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return decompress(key, obj["Body"].read()), obj.get("LastModified")
        except (OSError, ValueError, ImportError, EOFError, lzma.LZMAError):
            return None

    unique = list(dict.fromkeys(keys))
    if len(unique) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(unique)), thread_name_prefix="pgops-fetch") as pool:
            got = list(pool.map(one, unique))  # boto3 clients are thread-safe; an error is raised here
    else:
        got = [one(key) for key in unique]
    out: dict[str, bytes] = {}
    modified: dict[str, datetime] = {}
    for key, item in zip(unique, got, strict=True):
        if item is None:
            continue
        out[key] = item[0]
        if item[1] is not None:
            modified[key] = item[1]
    return out, modified


def read_lifecycle(s3, bucket: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(rules, None), ([], None) when absent, or (None, reason) when it cannot be read."""
    from botocore.exceptions import ClientError

    try:
        return s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", []), None
    except ClientError as exc:
        code = _error_code(exc)
        if code == "NoSuchLifecycleConfiguration":
            return [], None
        if _unsupported(exc):
            return None, f"not supported by this S3 endpoint ({code or 501})"
        return None, f"{code}: {exc}"


def check_hardening(s3, bucket: str) -> tuple[dict[str, str], list[F.Finding]]:
    """Versioning, default encryption, public access block, object lock: state per check and findings."""
    from botocore.exceptions import ClientError

    state: dict[str, str] = {}
    out: list[F.Finding] = []
    unknown: dict[str, str] = {}

    def call(name: str, fn: Callable[[], Any], absent_codes: tuple[str, ...]) -> Any:
        try:
            return fn()
        except ClientError as exc:
            code = _error_code(exc)
            if code in absent_codes:
                return None
            unknown[name] = f"not supported by this S3 endpoint ({code or 501})" if _unsupported(exc) else code
            return ...

    versioning = call("versioning", lambda: s3.get_bucket_versioning(Bucket=bucket), ())
    if versioning is not ...:
        state["versioning"] = (versioning or {}).get("Status", "Disabled").lower()
        if state["versioning"] != "enabled":
            out.append(F.Finding(
                id=F.BUCKET_VERSIONING_DISABLED, severity=F.WARNING,
                message=f"bucket {bucket} has versioning {state['versioning']}: a deleted or overwritten WAL segment "
                        "or backup cannot be recovered from the bucket",
                evidence={"bucket": bucket, "versioning": state["versioning"]},
                fix="enable versioning (put-bucket-versioning Status=Enabled) with a NoncurrentVersionExpiration "
                    "lifecycle rule longer than the retention",
            ))
    encryption = call("encryption", lambda: s3.get_bucket_encryption(Bucket=bucket),
                      ("ServerSideEncryptionConfigurationNotFoundError",))
    if encryption is not ...:
        rules = ((encryption or {}).get("ServerSideEncryptionConfiguration") or {}).get("Rules", [])
        algos = [r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules]
        state["encryption"] = ",".join(a for a in algos if a) or "none"
        if state["encryption"] == "none":
            out.append(F.Finding(
                id=F.BUCKET_ENCRYPTION_ABSENT, severity=F.WARNING,
                message=f"bucket {bucket} has no default encryption: WAL and base backups hold every row of the "
                        "database",
                evidence={"bucket": bucket, "encryption": "none"},
                fix="set default encryption (put-bucket-encryption with SSE-KMS or AES256)",
            ))
    pab = call("public_access_block", lambda: s3.get_public_access_block(Bucket=bucket),
               ("NoSuchPublicAccessBlockConfiguration",))
    if pab is not ...:
        flags = (pab or {}).get("PublicAccessBlockConfiguration", {})
        names = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
        off = [n for n in names if not flags.get(n)]
        state["public_access_block"] = "all" if not off else "partial" if len(off) < len(names) else "none"
        if off:
            out.append(F.Finding(
                id=F.BUCKET_PUBLIC_ACCESS_NOT_BLOCKED, severity=F.WARNING,
                message=f"bucket {bucket} does not block public access ({', '.join(off)} off): one wrong policy or "
                        "ACL exposes the database's backups",
                evidence={"bucket": bucket, "off": off},
                fix="turn on all four public access block settings (put-public-access-block)",
            ))
    lock = call("object_lock", lambda: s3.get_object_lock_configuration(Bucket=bucket),
                ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"))
    if lock is not ...:
        conf = (lock or {}).get("ObjectLockConfiguration", {})
        state["object_lock"] = "enabled" if conf.get("ObjectLockEnabled") == "Enabled" else "disabled"
        if state["object_lock"] != "enabled":
            out.append(F.Finding(
                id=F.BUCKET_OBJECT_LOCK_ABSENT, severity=F.OK,
                message=f"bucket {bucket} has no object lock: stolen credentials can delete every backup",
                evidence={"bucket": bucket, "object_lock": state["object_lock"]},
                fix="for ransomware protection, use a bucket created with object lock (governance mode, "
                    "retention shorter than the lifecycle expiry)",
            ))
    for name, reason in unknown.items():
        state[name] = "unknown"
        out.append(F.Finding(
            id=F.BUCKET_HARDENING_UNKNOWN, severity=F.OK,
            message=f"bucket {bucket}: {name.replace('_', ' ')} is unknown: {reason}",
            evidence={"bucket": bucket, "check": name, "state": "unknown", "reason": reason},
            fix="check this setting in the S3 provider's console",
        ))
    if not any(f.severity != F.OK for f in out) and not unknown:
        out.append(F.Finding(id=F.BUCKET_HARDENED, severity=F.OK,
                             message=f"bucket {bucket}: versioning, encryption and public access block are on",
                             evidence={"bucket": bucket, **state}))
    return state, out


# --- the primary ----------------------------------------------------------------------------------


@dataclass
class PrimaryRows:
    """What the primary answered (or why not): read before the listing, judged after it."""

    row: dict[str, Any] | None = None
    waldir: dict[str, Any] | None = None
    error: str | None = None
    waldir_error: str | None = None


def query_primary(sql: SqlRunner) -> PrimaryRows:
    try:
        row = sql(PRIMARY_SQL)[0]
    except Exception as exc:  # psycopg2 errors, unknown connection: the bucket checks still run
        text = str(exc).strip()
        return PrimaryRows(error=text.splitlines()[0] if text else type(exc).__name__)
    try:
        return PrimaryRows(row=row, waldir=sql(PG_WAL_SQL)[0])
    except Exception as exc:  # permission denied without pg_monitor
        return PrimaryRows(row=row, waldir_error=type(exc).__name__)


def check_primary(rows: PrimaryRows, *, cluster: Cluster, now: datetime, newest_segment: str | None,
                  previous: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[F.Finding]]:
    """pg_stat_archiver failures, archive lag (segments and bytes), pg_wal size, archive_timeout vs RPO."""
    out: list[F.Finding] = []
    row = rows.row
    if row is None:
        out.append(F.Finding(
            id=F.PRIMARY_UNREACHABLE, severity=F.WARNING,
            message=f"primary of {cluster.name} is not reachable through connection {cluster.postgres_conn_id!r}: "
                    f"{rows.error}; archiving health and lag are not checked",
            evidence={"postgres_conn_id": cluster.postgres_conn_id, "error": rows.error},
            fix="start the server or correct the Airflow connection; grant pg_monitor to its user",
        ))
        return {"reachable": False}, out
    size = int(row["wal_segment_size_bytes"])
    primary: dict[str, Any] = {"reachable": True, **{k: _iso(v) for k, v in row.items()
                                                     if k not in ("archive_command", "db_now")}}
    health = archiver_health(row)
    if not health.healthy:
        out.append(F.Finding(
            id=F.ARCHIVER_FAILING, severity=F.CRITICAL, message=health.message,
            evidence={"last_failed_wal": row.get("last_failed_wal"), "failed_count": row.get("failed_count"),
                      "last_failed_time": _iso(row.get("last_failed_time")),
                      "last_archived_wal": row.get("last_archived_wal"),
                      "last_archived_time": _iso(row.get("last_archived_time")),
                      "archive_mode": row.get("archive_mode")},
            fix="fix the archive_command (see the message); until then no new WAL reaches the bucket and pg_wal grows",
        ))
    before = (previous or {}).get("failed_count")
    if health.healthy and isinstance(before, int) and (row.get("failed_count") or 0) > before:
        out.append(F.Finding(
            id=F.ARCHIVER_FAILURES_GROWING, severity=F.WARNING,
            message=f"archive_command failed {row['failed_count'] - before} time(s) since the last audit "
                    f"(last failure {row.get('last_failed_wal')} at {_iso(row.get('last_failed_time'))}), "
                    "though archiving has recovered",
            evidence={"failed_count": row["failed_count"], "previous_failed_count": before,
                      "last_failed_wal": row.get("last_failed_wal")},
            fix="read the PostgreSQL log around the failure time: flaky credentials, throttling or network",
        ))
    # lag: completed segments not yet archived, and bytes written past the last archived segment
    last = wal.classify_wal_name(row.get("last_archived_wal") or "")
    last_segment = last.segment if last is not None and last.segment else newest_segment
    current = row.get("current_wal")
    if current and last_segment and row.get("current_lsn"):
        c_tli, c_segno = wal.segment_to_segno(current, size)
        l_tli, l_segno = wal.segment_to_segno(last_segment, size)
        lag_bytes = max(wal.parse_lsn(row["current_lsn"]) - wal.segment_end_lsn(last_segment, size), 0)
        lag_segments = max(c_segno - l_segno - 1, 0) if c_tli == l_tli else None
        primary.update(lag_segments=lag_segments, lag_bytes=lag_bytes, last_archived_segment=last_segment)
        since = _age_s(row.get("last_archived_time"), now)
        if lag_segments is not None and lag_segments >= ARCHIVE_LAG_MIN_SEGMENTS and (
                since is None or since > cluster.targets.rpo_s):
            out.append(F.Finding(
                id=F.ARCHIVE_LAG, severity=F.WARNING,
                message=f"archiving of {cluster.name} is {lag_segments} segment(s) ({lag_bytes} bytes) behind: "
                        f"current WAL {current}, last archived {last_segment}, "
                        f"{'never' if since is None else _days(since) + ' ago'} (RPO target {cluster.targets.rpo_s} s)",
                evidence={"current_wal": current, "last_archived_segment": last_segment,
                          "lag_segments": lag_segments, "lag_bytes": lag_bytes,
                          "seconds_since_last_archived": since, "rpo_s": cluster.targets.rpo_s},
                fix="check the archive_command's speed and errors; barman-cloud-wal-archive is one process per "
                    "segment, so a slow endpoint falls behind under write load",
            ))
    timeout = row.get("archive_timeout_s")
    if timeout is not None and (timeout == 0 or timeout > cluster.targets.rpo_s):
        out.append(F.Finding(
            id=F.ARCHIVE_TIMEOUT_ABOVE_RPO, severity=F.WARNING,
            message=f"archive_timeout is {timeout} s{' (off)' if timeout == 0 else ''}, above the RPO target of "
                    f"{cluster.targets.rpo_s} s: on a quiet server committed WAL can wait longer than the RPO",
            evidence={"archive_timeout_s": timeout, "rpo_s": cluster.targets.rpo_s},
            fix=f"set archive_timeout = {max(cluster.targets.rpo_s // 2, 1)} (at most the RPO) and reload",
        ))
    waldir = rows.waldir
    if waldir is None:
        out.append(F.Finding(
            id=F.PG_WAL_UNKNOWN, severity=F.OK,
            message=f"pg_wal size is unknown: pg_ls_waldir() failed ({rows.waldir_error})",
            evidence={"error": rows.waldir_error},
            fix="grant pg_monitor to the audit's database user",
        ))
    else:
        primary.update(pg_wal_files=int(waldir["files"]), pg_wal_bytes=int(waldir["size_bytes"]))
        limit = PG_WAL_SIZE_FACTOR * (int(row["max_wal_size_bytes"]) + int(row["wal_keep_size_bytes"]))
        if int(waldir["size_bytes"]) > limit:
            out.append(F.Finding(
                id=F.PG_WAL_SIZE, severity=F.WARNING,
                message=f"pg_wal of {cluster.name} holds {int(waldir['size_bytes'])} bytes in {waldir['files']} files, "
                        f"over {PG_WAL_SIZE_FACTOR}x (max_wal_size + wal_keep_size) = {limit}: WAL is piling up",
                evidence={"pg_wal_bytes": int(waldir["size_bytes"]), "pg_wal_files": int(waldir["files"]),
                          "limit_bytes": limit},
                fix="check archiving (pg_stat_archiver) and inactive replication slots (pg_replication_slots)",
            ))
    if health.healthy:
        out.append(F.Finding(id=F.ARCHIVER_OK, severity=F.OK, message=health.message,
                             evidence={k: primary.get(k) for k in ("last_archived_wal", "last_archived_time",
                                                                    "failed_count", "lag_segments", "lag_bytes",
                                                                    "pg_wal_bytes")}))
    return primary, out


# --- freshness ------------------------------------------------------------------------------------


def _backup_time(backup: layouts.BackupRef, modified: Mapping[str, datetime]) -> datetime | None:
    when = backup.end_time or backup.begin_time
    if when is None:
        times = [modified[k] for k in backup.metadata_keys if k in modified]
        when = max(times) if times else None
    return when


def check_freshness(*, cluster: Cluster, backups: list[layouts.BackupRef], modified: Mapping[str, datetime],
                    index: layouts.WalIndex, primary: Mapping[str, Any], now: datetime,
                    backup_interval_s: float | None) -> tuple[dict[str, Any], list[F.Finding]]:
    out: list[F.Finding] = []
    done_times = [t for t in (_backup_time(b, modified) for b in backups if b.done) if t is not None]
    newest = max(done_times) if done_times else None
    backup_age = _age_s(newest, now)
    wal_age = _age_s(index.newest_last_modified, now)
    fresh: dict[str, Any] = {"newest_backup_time": _iso(newest), "newest_backup_age_s": backup_age,
                             "backup_interval_s": backup_interval_s,
                             "newest_wal_time": _iso(index.newest_last_modified), "newest_wal_age_s": wal_age,
                             "rpo_s": cluster.targets.rpo_s}
    if backup_age is not None and backup_interval_s:
        grace_s = max(3600.0, 0.25 * backup_interval_s)
        if backup_age > backup_interval_s + grace_s:
            out.append(F.Finding(
                id=F.BACKUP_OVERDUE, severity=F.WARNING,
                message=f"newest base backup of {cluster.name} is {_days(backup_age)} old; the schedule "
                        f"'{cluster.schedule.backup}' takes one every {_days(backup_interval_s)}",
                evidence={"newest_backup_time": _iso(newest), "age_s": backup_age,
                          "interval_s": backup_interval_s, "schedule": cluster.schedule.backup},
                fix=f"check the recent runs of pgops_base_backup__{cluster.name} and run it now",
            ))
        else:
            out.append(F.Finding(
                id=F.BACKUP_FRESH, severity=F.OK,
                message=f"newest base backup is {_days(backup_age)} old (schedule every {_days(backup_interval_s)})",
                evidence={"newest_backup_time": _iso(newest), "age_s": backup_age, "interval_s": backup_interval_s},
            ))
    if wal_age is not None:
        # a quiet primary writes no new segment: not stale when it has nothing unarchived and will switch in time
        idle = (primary.get("reachable") and primary.get("lag_segments") == 0
                and 0 < (primary.get("archive_timeout_s") or 0) <= cluster.targets.rpo_s)
        if wal_age > cluster.targets.rpo_s and not idle:
            out.append(F.Finding(
                id=F.WAL_STALE, severity=F.WARNING,
                message=f"newest archived WAL of {cluster.name} is {_days(wal_age)} old, over the RPO target of "
                        f"{cluster.targets.rpo_s} s: a loss of the primary now loses that much data",
                evidence={"newest_wal_time": _iso(index.newest_last_modified), "age_s": wal_age,
                          "rpo_s": cluster.targets.rpo_s, "primary_lag_segments": primary.get("lag_segments")},
                fix="check pg_stat_archiver on the primary and set archive_timeout at most the RPO",
            ))
        else:
            out.append(F.Finding(
                id=F.WAL_FRESH, severity=F.OK,
                message=f"newest archived WAL is {_days(wal_age)} old (RPO target {cluster.targets.rpo_s} s"
                        f"{'; primary idle, nothing unarchived' if idle and wal_age > cluster.targets.rpo_s else ''})",
                evidence={"age_s": wal_age, "rpo_s": cluster.targets.rpo_s},
            ))
    return fresh, out


# --- the audit ------------------------------------------------------------------------------------


@dataclass
class ArchiveListing:
    """The list phase: the cluster's prefix read once, the primary asked, the last report's primary state."""

    listing: layouts.ListingResult
    rows: PrimaryRows | None
    wal_segment_size_bytes: int | None
    size_source: str | None
    previous_primary: Mapping[str, Any] | None
    findings: list[F.Finding]


@dataclass
class ResolvedArchive:
    """The resolve phase: the backups and timelines the listing names, read from their metadata, and the WAL
    continuity between them."""

    backups: list[layouts.BackupRef]
    modified: dict[str, datetime]
    continuity: Any  # pgops.core.continuity's result, None without a recognised layout
    continuity_dict: dict[str, Any] | None
    body: dict[str, Any]
    findings: list[F.Finding]


def list_archive(cluster: Cluster, s3, sql: SqlRunner | None, *,
                 wal_segment_size_bytes: int | None = None) -> ArchiveListing:
    """Ask the primary, then list the cluster's prefix (skipping pgops's own records) with its segment size."""
    from botocore.exceptions import ClientError

    storage = cluster.storage
    root = storage.server_prefix
    findings: list[F.Finding] = []
    try:
        previous = reports.read_latest(s3, cluster, KIND)
    except ClientError:
        previous = None
    previous_primary = ((previous or {}).get("body") or {}).get("primary")

    # asked first: the primary's wal_segment_size drives the segment arithmetic of the listing; without it the
    # listing is read at the smallest size (every name fits) and re-keyed to what the backups' metadata records
    rows = query_primary(sql) if sql is not None else None
    primary_size = ((rows and rows.row) or {}).get("wal_segment_size_bytes")
    size: int | None = wal_segment_size_bytes or (int(primary_size) if primary_size else None)
    size_source = ("argument" if wal_segment_size_bytes else "primary (SHOW wal_segment_size)") if size else None

    try:
        listing = layouts.parse_listing(
            iter_listing(s3, storage.bucket, root + "/", skip_prefixes=(f"{root}/pgops/",)),
            prefix=root, layout=None if storage.layout == "auto" else storage.layout,
            wal_segment_size_bytes=size or wal.MIN_WAL_SEGMENT_SIZE_BYTES)
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("NoSuchBucket", "404"):
            raise AuditError(f"cluster {cluster.name!r}: bucket {storage.bucket!r} does not exist. Fix: correct "
                             "storage.bucket in the inventory") from None
        if code in ("AccessDenied", "403"):
            raise AuditError(f"cluster {cluster.name!r}: listing s3://{storage.bucket}/{root}/ is denied. Fix: grant "
                             f"s3:ListBucket and s3:GetObject to connection {cluster.aws_conn_id!r}") from None
        raise
    if listing.key_count == 0:
        findings.append(F.Finding(
            id=F.ARCHIVE_EMPTY, severity=F.CRITICAL,
            message=f"s3://{storage.bucket}/{root}/ is empty: no base backup and no WAL, nothing can be restored",
            evidence={"bucket": storage.bucket, "prefix": root},
            fix="check storage.bucket/prefix/server_name in the inventory and that archiving and the backup DAG run",
        ))
    if len(listing.names) > 1 and listing.layout == layouts.PGBACKREST:
        findings.append(F.Finding(
            id=F.MULTIPLE_STANZAS, severity=F.WARNING,
            message=f"the pgBackRest repository s3://{storage.bucket}/{root}/ holds stanzas {sorted(listing.names)}; "
                    "the audit mixes their WAL and backups",
            evidence={"stanzas": sorted(listing.names)},
            fix="give each stanza its own inventory cluster with its own storage prefix",
        ))
    return ArchiveListing(listing=listing, rows=rows, wal_segment_size_bytes=size, size_source=size_source,
                          previous_primary=previous_primary, findings=findings)


def resolve_archive(cluster: Cluster, s3, listed: ArchiveListing) -> ResolvedArchive:
    """Fetch the metadata the listing names (backup.info, sentinels, .history), resolve the backups, the segment
    size when the primary did not give it, the timelines and the WAL continuity; the report body so far."""
    storage = cluster.storage
    root = storage.server_prefix
    listing = listed.listing
    findings: list[F.Finding] = []
    size, size_source = listed.wal_segment_size_bytes, listed.size_source
    backups: list[layouts.BackupRef] = []
    modified: dict[str, datetime] = {}
    fetched: dict[str, bytes] = {}
    if listing.layout is not None:
        fetched, modified = fetch(s3, storage.bucket, listing.keys_to_fetch)
        backups, problems = layouts.resolve_backups(listing, fetched)
        findings.extend(problems)
    if size is None:
        size, size_source, size_findings = _segment_size_from_backups(cluster, backups, listing, listed.rows)
        findings.extend(size_findings)
        listing.resize_segments(size)
    if listing.key_count:
        findings.extend(listing.findings())
    body: dict[str, Any] = {
        "bucket": storage.bucket, "prefix": root, "layout": listing.layout,
        "layout_configured": storage.layout, "wal_segment_size_bytes": size, "wal_segment_size_source": size_source,
        "listing": {"key_count": listing.key_count, "unrecognised_count": listing.unrecognised_count},
    }
    index = listing.wal
    continuity_dict: dict[str, Any] | None = None
    continuity = None
    if listing.layout is not None:
        stream = listing.current_stream
        backups = [b for b in backups if not b.stream or not stream or b.stream == stream]
        histories = layouts.resolve_histories(listing, fetched)
        unreadable = sorted(set(listing.history_keys) - set(histories))
        if unreadable:
            findings.append(F.Finding(
                id=F.HISTORY_UNREADABLE, severity=F.WARNING,
                message=f"timeline history file(s) of timeline(s) {unreadable} are in the archive but cannot be read "
                        "or decompressed; the audit infers the switch points from the WAL listing",
                evidence={"keys": [listing.history_keys[t] for t in unreadable]},
                fix="install the decompressor (lz4, zstandard) in the audit's environment or check the objects",
            ))
        not_done = [b for b in backups if not b.done]
        if not_done:
            findings.append(F.Finding(
                id=F.BACKUP_NOT_DONE, severity=F.WARNING,
                message=f"{len(not_done)} backup(s) under {root} did not finish ({', '.join(b.backup_id for b in not_done[:5])}"
                        f"{', ...' if len(not_done) > 5 else ''}); they cannot be restored",
                evidence={"backups": [{"backup_id": b.backup_id, "status": b.status} for b in not_done[:20]]},
                fix="read the failed backup runs' logs; delete the leftovers (barman-cloud-backup-delete)",
            ))
        continuity = check_continuity(backups, index, histories)
        findings.extend(continuity.findings)
        continuity_dict = continuity.to_dict()
        continuity_dict.pop("findings", None)
        body["listing"].update(segment_count=index.segment_count, wal_bytes=index.total_size_bytes,
                               timelines={str(t): len(r.runs()) for t, r in sorted(index.timelines.items())},
                               history_timelines=sorted(index.history), partial_count=len(index.partial),
                               stream=stream, names=sorted(listing.names))
        body["backups"] = [b.to_dict() for b in backups[-MAX_BACKUPS_IN_REPORT:]]
    body["continuity"] = continuity_dict
    body["recoverable_window"] = (continuity_dict or {}).get("window")
    return ResolvedArchive(backups=backups, modified=modified, continuity=continuity, continuity_dict=continuity_dict,
                           body=body, findings=findings)


def check_archive(cluster: Cluster, s3, listed: ArchiveListing, resolved: ResolvedArchive, *, now: datetime,
                  apply_lifecycle: bool, check_live_primary: bool) -> list[F.Finding]:
    """Judge the primary, the standbys, freshness, the bucket lifecycle (applied when asked) and hardening; each
    check's state goes into ``resolved.body``, its findings are returned."""
    storage = cluster.storage
    root = storage.server_prefix
    listing, body = listed.listing, resolved.body
    backups, modified, index = resolved.backups, resolved.modified, listing.wal
    findings: list[F.Finding] = []

    primary: dict[str, Any] = {"reachable": None}
    if listed.rows is not None:
        primary, primary_findings = check_primary(
            listed.rows, cluster=cluster, now=now,
            newest_segment=(resolved.continuity_dict or {}).get("newest_segment"), previous=listed.previous_primary)
        findings.extend(primary_findings)
    body["primary"] = primary

    if check_live_primary and cluster.replication is not None and cluster.replication.standbys:
        from pgops.airflow import replication  # only clusters with standbys ask them

        body["replication"], replication_findings = replication.check_cluster(cluster)
        findings.extend(replication_findings)

    interval = interval_s(cluster.schedule.backup, now=now)
    fresh, fresh_findings = check_freshness(cluster=cluster, backups=backups, modified=modified, index=index,
                                            primary=primary, now=now, backup_interval_s=interval)
    findings.extend(fresh_findings)
    body["freshness"] = fresh

    # which keys a rule reaches depends on the layout; an empty prefix will be written by our engine
    layout = listing.layout or (storage.layout if storage.layout != "auto" else
                                layouts.BARMAN_CLOUD if listing.key_count == 0 else None)
    newest_id, needs = (newest_backup_needs(backups, resolved.continuity, index, modified, root=root, layout=layout,
                                            now=now)
                        if resolved.continuity_dict is not None else (None, None))
    body["lifecycle"], lifecycle_findings = _lifecycle(s3, cluster, backups=backups, modified=modified,
                                                       interval_s=interval, now=now, apply=apply_lifecycle,
                                                       layout=layout, newest_backup_id=newest_id, needs=needs)
    findings.extend(lifecycle_findings)
    body["hardening"], hardening_findings = check_hardening(s3, storage.bucket)
    findings.extend(hardening_findings)
    return findings


def audit_cluster(
    cluster: Cluster,
    *,
    s3=None,
    sql: SqlRunner | None = None,
    run_id: str = "adhoc",
    now: datetime | None = None,
    apply_lifecycle: bool = False,
    check_live_primary: bool = True,
    wal_segment_size_bytes: int | None = None,
) -> dict[str, Any]:
    """Audit one cluster and return the report envelope (kind wal-audit); write nothing but, when asked,
    the recommended lifecycle configuration.

    Three phases: :func:`list_archive` (the primary, then one listing of the prefix), :func:`resolve_archive`
    (backups, timelines, WAL continuity) and :func:`check_archive` (primary, standbys, freshness, lifecycle,
    hardening). ``s3`` is a boto3 S3 client (default: PgopsS3Hook's for the cluster's connection).
    """
    from pgops.airflow import hooks

    started_at = reports.utcnow()
    now = now or started_at
    if s3 is None:
        s3 = hooks.PgopsS3Hook(aws_conn_id=cluster.aws_conn_id).conn
    if sql is None and check_live_primary:
        def sql(statement: str) -> list[dict[str, Any]]:
            return hooks.pg_query(cluster.postgres_conn_id, statement)

    listed = list_archive(cluster, s3, sql, wal_segment_size_bytes=wal_segment_size_bytes)
    resolved = resolve_archive(cluster, s3, listed)
    checked = check_archive(cluster, s3, listed, resolved, now=now, apply_lifecycle=apply_lifecycle,
                            check_live_primary=check_live_primary)
    body = resolved.body
    ordered = F.worst_first([*listed.findings, *resolved.findings, *checked])
    body["findings"] = [f.to_dict() for f in ordered]
    body["counts"] = {sev: sum(1 for f in ordered if f.severity == sev) for sev in F.SEVERITIES}
    return reports.envelope(kind=KIND, cluster=cluster.name, run_id=run_id, started_at=started_at,
                            status=F.overall_status(ordered), body=body)


def _segment_size_from_backups(cluster: Cluster, backups: list[layouts.BackupRef], listing: layouts.ListingResult,
                               rows: PrimaryRows | None) -> tuple[int, str, list[F.Finding]]:
    """The WAL segment size when the primary did not say it: the backups' own metadata, else the default."""
    evidence = layouts.wal_segment_size_from_backups(backups)
    if evidence is not None:
        return evidence.wal_segment_size_bytes, f"backup metadata ({evidence.detail})", []
    size = wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES
    if not any(index.segment_count for index in listing.wal_streams.values()):
        return size, "default (no WAL to read)", []
    why = "the primary is not asked" if rows is None else f"the primary is unreachable ({rows.error})"
    return size, "default (assumed)", [F.Finding(
        id=F.WAL_SEGMENT_SIZE_ASSUMED, severity=F.WARNING,
        message=f"the WAL segment size of {cluster.name} is unknown: {why} and no finished backup records it; the "
                f"audit assumes {size} bytes, so gaps and the recoverable window are only right if that is the size",
        evidence={"assumed_bytes": size, "backups": len(backups), "postgres_conn_id": cluster.postgres_conn_id},
        fix=f"make the primary reachable through the Airflow connection {cluster.postgres_conn_id!r} "
            "(postgres_conn_id in the inventory), or take a base backup so its metadata records the size",
    )]


def newest_backup_needs(backups: list[layouts.BackupRef], continuity, index: layouts.WalIndex,
                        modified: Mapping[str, datetime], *, root: str, layout: str | None,
                        now: datetime) -> tuple[str | None, list[lifecycle.Need]]:
    """The newest recoverable backup and what restoring it needs from the bucket: its base files, its metadata,
    its begin..end WAL and the .history files of the later timelines its recovery follows, each with the age of
    its oldest object (a lifecycle rule expires by age). ([], None) when no backup is recoverable.

    The WAL after its end only extends how far it rolls forward; restoring it needs none of it.
    """
    window = continuity.window
    backup = next((b for b in backups if window is not None and b.backup_id == window.newest_backup_id), None)
    if backup is None:
        return None, []

    def age(when: datetime) -> float:
        return max((now - when).total_seconds(), 0.0) / 86400

    keys = layouts.backup_keys(backup, layout=layout, root=root)
    begin = backup.begin_time or _backup_time(backup, modified) or now
    end = backup.end_time or begin
    meta_times = [modified[k] for k in backup.metadata_keys if k in modified]
    needs = [
        # data files are written from the backup's begin on; the begin WAL is archived after the begin at the
        # earliest: the begin time is the oldest either can be (a rule expires the oldest first)
        lifecycle.Need(cls=lifecycle.BASE, what=f"base files ({keys.base or backup.backup_id})", age_days=age(begin),
                       key=keys.base),
        lifecycle.Need(cls=lifecycle.WAL, what=f"begin..end WAL ({backup.begin_segment}..{backup.end_segment})",
                       age_days=age(begin), key=keys.begin_wal),
        lifecycle.Need(cls=lifecycle.BACKUP_METADATA, what=f"metadata ({keys.metadata or 'backup metadata'})",
                       age_days=age(min(meta_times) if meta_times else end), key=keys.metadata),
    ]
    for tli in continuity.history_needed.get(backup.backup_id, ()):
        obj = index.history.get(tli)
        if obj is not None:
            rel = obj.key[len(root) + 1:] if obj.key.startswith(root + "/") else None
            needs.append(lifecycle.Need(cls=lifecycle.HISTORY, what=wal.history_file_name(tli),
                                        age_days=age(obj.last_modified or end), key=rel))
    return backup.backup_id, needs


def _lifecycle(s3, cluster: Cluster, *, backups: list[layouts.BackupRef], modified: Mapping[str, datetime],
               interval_s: float | None, now: datetime, apply: bool,
               layout: str | None = layouts.BARMAN_CLOUD, newest_backup_id: str | None = None,
               needs: list[lifecycle.Need] | None = None) -> tuple[dict[str, Any], list[F.Finding]]:
    bucket = cluster.storage.bucket
    rules, problem = read_lifecycle(s3, bucket)
    if rules is None:
        return {"status": "unknown", "reason": problem}, [F.Finding(
            id=F.LIFECYCLE_UNKNOWN, severity=F.WARNING,
            message=f"the lifecycle configuration of bucket {bucket} cannot be read ({problem}): whether S3 "
                    "expires WAL still needed is unknown",
            evidence={"bucket": bucket, "reason": problem},
            fix="grant s3:GetLifecycleConfiguration to the audit's connection, or check the rules by hand",
        )]
    times = sorted(t for t in (_backup_time(b, modified) for b in backups if b.done) if t is not None)
    ages = [(now - t).total_seconds() / 86400 for t in times]
    kwargs = dict(cluster_prefix=cluster.storage.server_prefix, retention_policy=cluster.retention.policy,
                  backup_interval_days=(interval_s or 86400) / 86400,
                  oldest_needed_backup_age_days=ages[0] if ages else None,
                  newest_backup_age_days=ages[-1] if ages else None, now=now, layout=layout,
                  newest_backup_id=newest_backup_id, newest_backup_needs=needs)
    assessment = lifecycle.evaluate_lifecycle(rules, **kwargs)
    out = assessment.to_dict()
    out.pop("findings", None)
    out["current"] = {"Rules": rules}
    found = list(assessment.findings)
    if apply and _normalised(assessment.recommended) != _normalised({"Rules": rules}):
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=assessment.recommended)
        after, _ = read_lifecycle(s3, bucket)
        before_ids = sorted({f.id for f in found if f.severity != F.OK})
        assessment = lifecycle.evaluate_lifecycle(after or [], **kwargs)
        out = assessment.to_dict()
        out.pop("findings", None)
        out.update(current={"Rules": after or []}, applied=True, previous={"Rules": rules})
        found = [*assessment.findings, F.Finding(
            id=F.LIFECYCLE_APPLIED, severity=F.OK,
            message=f"applied the recommended lifecycle configuration to bucket {bucket} "
                    f"(it had: {', '.join(before_ids) or 'no problem'})",
            evidence={"bucket": bucket, "previous_rules": rules, "rules": after or []},
        )]
    else:
        out["applied"] = False
    return out, found


def _normalised(config: Mapping[str, Any]) -> list[str]:
    import json

    return sorted(json.dumps(rule, sort_keys=True, default=str) for rule in config.get("Rules", []))


# --- presentation ---------------------------------------------------------------------------------


def exit_code(report: Mapping[str, Any]) -> int:
    return EXIT_CODES.get(report["status"], 2)


def summary(report: Mapping[str, Any]) -> str:
    """A readable summary: the verdict, the window, then every non-ok finding with its fix."""
    body = report["body"]
    lines = [f"pgops WAL audit of {report['cluster']}: {report['status'].upper()} "
             f"(s3://{body['bucket']}/{body['prefix']}/, layout {body.get('layout') or 'unknown'})"]
    listing = body.get("listing", {})
    lines.append(f"  listing: {listing.get('key_count', 0)} keys, {listing.get('segment_count', 0)} WAL segments, "
                 f"{len(body.get('backups', []))} backups")
    window = body.get("recoverable_window")
    if window:
        lines.append(f"  recoverable: from backup {window['earliest_backup_id']} ({window.get('earliest_time')}) "
                     f"to {window['latest_lsn']} ({window['latest_segment']}, {window.get('latest_time')})")
    else:
        lines.append("  recoverable: no recoverable window")
    loss = (body.get("lifecycle") or {}).get("days_until_loss") or {}
    if loss.get("days") is not None:
        first = (loss.get("rules") or [{}])[0]
        lines.append(f"  days until loss: {loss['days']:.1f} (newest recoverable backup {loss.get('backup_id')}: "
                     f"rule {first.get('rule_id')} expires {', '.join(first.get('expires') or [])})")
    elif loss.get("backup_id"):
        lines.append(f"  days until loss: no lifecycle rule expires what backup {loss['backup_id']} needs")
    counts = body.get("counts", {})
    lines.append(f"  findings: {counts.get(F.CRITICAL, 0)} critical, {counts.get(F.WARNING, 0)} warning, "
                 f"{counts.get(F.OK, 0)} ok")
    for f in body.get("findings", []):
        if f["severity"] == F.OK:
            continue
        lines.append(f"  [{f['severity'].upper()}] {f['id']}: {f['message']}")
        if f.get("fix"):
            lines.append(f"      fix: {f['fix']}")
    return "\n".join(lines)


def xcom_summary(report: Mapping[str, Any], report_key: str | None = None) -> dict[str, Any]:
    body = report["body"]
    window = body.get("recoverable_window") or {}
    return {"status": report["status"], "report_key": report_key, "counts": body.get("counts"),
            "problems": [f["id"] for f in body.get("findings", []) if f["severity"] != F.OK],
            "layout": body.get("layout"), "latest_segment": window.get("latest_segment"),
            "earliest_backup_id": window.get("earliest_backup_id")}
