"""barman-cloud: the one place that knows its command lines and its JSON.

Every function returns an argv list (never a shell string); credentials never go into argv.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgops.inventory import Cluster

# Console scripts of the DB-host tools package (include/dbhost/pyproject.toml), installed into the DB-host
# tools venv next to barman-cloud: PostgreSQL runs them from there, never from a path inside this checkout.
WAL_ARCHIVE_WRAPPER = "pgops-wal-archive"
WAL_RESTORE_WRAPPER = "pgops-wal-restore"
# pgops' parallel restorer (include/dbhost/pgops_restore.py, main(argv)), a console script of the same package.
PARALLEL_RESTORE_TOOL = "pgops-restore"
# barman-cloud-backup run by barman's own main, but for the wait for the backup's last WAL segment, which pgops
# makes at a finer grain than PostgreSQL's 1-s one (include/dbhost/pgops_backup.py); the same arguments.
BACKUP_TOOL = "pgops-backup"
# Base backups in parts (barman-cloud-backup --max-archive-size: compressed bytes per tar part) so that a restore
# can take engine.jobs parts at a time. barman counts compressed bytes and closes a part only between two files,
# so the database size is scaled by the strongest compression expected (the lab's pgbench database: lz4 stores
# 0.105 of it, a 1 GiB relation segment 66.5 MB) and aimed at PARTS_PER_JOB x jobs parts: >= 2 x jobs even at
# four times that compression, and small enough that the biggest part is no long tail of a restore; weaker
# compression only makes more parts, each one more GET and one more multipart upload.
PARTS_PER_JOB = 8
COMPRESSED_RATIO_FLOOR = 0.1
# The floor: 16 MiB, under one compressed relation segment, so on a small database every segment gets a part of
# its own (with 79 MB parts the lab's 3 GiB database came out as 104 + 240 + 3 MB: two segments in one part, the
# restore's critical path); still three 5 MiB multipart chunks per part, and a handful of parts where it applies.
MIN_PART_BYTES = 16 * 1024 * 1024
MAX_PART_BYTES = 100 * 1024 ** 3  # barman's own default
# Reserved by barman-cloud as backup selectors, never real backup ids.
RESERVED_BACKUP_NAMES = ("first", "last", "latest", "oldest", "last-failed")
_COMPRESSION_FLAGS = {"gzip": "--gzip", "bzip2": "--bzip2", "xz": "--xz", "lz4": "--lz4", "zstd": "--zstd",
                      "snappy": "--snappy", "none": None}


def _common(cluster: Cluster, endpoint_url: str | None) -> list[str]:
    argv = ["--cloud-provider", "aws-s3"]
    if endpoint_url:
        argv += ["--endpoint-url", endpoint_url]
    return argv


# compressions with levels (barman's "low" is lz4's fast mode, level 1 of the others; snappy has none)
_LEVELLED = ("gzip", "bzip2", "xz", "zstd", "lz4")


def _compression(name: str) -> list[str]:
    flag = _COMPRESSION_FLAGS[name]
    return [flag] if flag else []


def max_archive_size_bytes(cluster_size_bytes: int | None, *, jobs: int, compression: str) -> int | None:
    """barman-cloud-backup --max-archive-size for a database of ``cluster_size_bytes``: about PARTS_PER_JOB x
    ``jobs`` parts at 10x compression (at least 2 x jobs up to 40x), within [MIN_PART_BYTES, MAX_PART_BYTES]. None
    when the size is unknown (barman's default then: one part up to 100 GiB)."""
    if not cluster_size_bytes or cluster_size_bytes <= 0:
        return None
    ratio = 1.0 if compression == "none" else COMPRESSED_RATIO_FLOOR
    size = int(cluster_size_bytes * ratio / (PARTS_PER_JOB * max(1, jobs)))
    return max(MIN_PART_BYTES, min(MAX_PART_BYTES, size))


def backup_argv(cluster: Cluster, *, endpoint_url: str | None, backup_name: str, pg_host: str | None = None,
                pg_port: int | None = None, pg_user: str | None = None, pg_dbname: str | None = None,
                cluster_size_bytes: int | None = None) -> list[str]:
    """barman-cloud-backup (through pgops-backup: BACKUP_TOOL) of the local primary into the cluster's prefix,
    named after the Airflow run.

    With ``cluster_size_bytes`` (the databases' size), the backup is written in parts for a parallel restore
    (max_archive_size_bytes); engine.extra_args come last, so a --max-archive-size there wins.
    """
    e = cluster.engine
    # -v: barman's INFO lines, among them "Starting backup '<id>'" (BackupLog reads the new backup's id from it)
    argv = [e.bin(BACKUP_TOOL), "-v", *_common(cluster, endpoint_url), *_compression(e.compression),
            "--jobs", str(e.jobs), "--name", backup_name]
    part_bytes = max_archive_size_bytes(cluster_size_bytes, jobs=e.jobs, compression=e.compression)
    if part_bytes:
        argv += ["--max-archive-size", str(part_bytes)]
    if e.immediate_checkpoint:
        argv.append("--immediate-checkpoint")
    if pg_host:
        argv += ["--host", pg_host]
    if pg_port:
        argv += ["--port", str(pg_port)]
    if pg_user:
        argv += ["--user", pg_user]
    if pg_dbname:
        argv += ["--dbname", pg_dbname]
    argv += [*e.extra_args, cluster.storage.destination_url, cluster.storage.server_name]
    return argv


# barman-cloud-backup -v: "<date> <time> [<pid>] INFO: Starting backup '20261129T101010'" (cloud.py _start_backup),
# and one line per uploaded chunk and per completed object, which the task log does without.
# Whole lines in barman's log format (cloud.py LOGGING_FORMAT), so no text inside another message can pass for one.
_LOG_PREFIX = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] INFO: "
_STARTING_BACKUP_RE = re.compile(_LOG_PREFIX + r"Starting backup '(\d{8}T\d{6})'")
_PER_CHUNK_RE = re.compile(_LOG_PREFIX + r"(Uploading '[^']*', part '\d+'|Completing '[^']*'|Skipping '[^']*', "
                           r"part '\d+') \(worker \d+\)")


class BackupLog:
    """The on_line sink of a barman-cloud-backup -v run: passes its lines on to ``emit`` but the per-chunk upload
    lines (counted instead: a 1 TiB backup has thousands), and keeps the id barman gave the backup it started.

    The id is barman's own word, printed when it called pg_backup_start for this backup: nothing else prints
    that line into this process's output. A run that exits 0 made that backup (DONE); one without the line (an
    older or newer barman that words it otherwise) leaves ``backup_id`` None and the caller reads the catalog."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self.backup_id: str | None = None
        self.started = 0
        self.chunk_lines = 0

    def __call__(self, line: str) -> None:
        text = line.rstrip()
        if _PER_CHUNK_RE.fullmatch(text):
            self.chunk_lines += 1
            return
        found = _STARTING_BACKUP_RE.fullmatch(text)
        if found:
            self.started += 1
            self.backup_id = found.group(1)
        self.emit(line)

    def made(self) -> str | None:
        """The backup id when exactly one backup was started, else None (the catalog then decides)."""
        return self.backup_id if self.started == 1 else None


def wal_archive_argv(cluster: Cluster, *, endpoint_url: str | None) -> list[str]:
    """archive_command argv (PostgreSQL appends %p): one segment per call."""
    e = cluster.engine
    level = ["--compression-level", e.wal_compression_level] if e.wal_compression in _LEVELLED else []
    return [e.bin("barman-cloud-wal-archive"), *_common(cluster, endpoint_url), *_compression(e.wal_compression),
            *level, cluster.storage.destination_url, cluster.storage.server_name]


def archive_command_argv(cluster: Cluster, *, endpoint_url: str | None) -> list[str]:
    """The archive_command argv (PostgreSQL appends %p): always the pgops wrapper (the DB-host venv's
    pgops-wal-archive, include/dbhost/pgops_wal_archive.py) in front of wal_archive_argv, because bare
    barman-cloud-wal-archive overwrites whatever its key holds; the wrapper uploads with barman's own uploader
    (--in-process) and never overwrites: the same content already there is success, other content a failure.

    engine.wal_archive_parallel > 1: a background pusher archives every ready segment, N at a time, barman
    imported once; the call for a segment returns when it is in the bucket.
    engine.wal_archive_parallel == 1: each call archives its own segment in its own process (--batch 1, no
    --background), like the bare CLI. No pusher with one thread: that would add a long-lived process, its lock,
    call records and waits to get one upload at a time, which the calling process gives with none of them; its
    exit status is that very upload's (or the overwrite check's)."""
    argv = wal_archive_argv(cluster, endpoint_url=endpoint_url)
    n = max(1, cluster.engine.wal_archive_parallel)
    mode = ["--background"] if n > 1 else ["--batch", "1"]
    return [cluster.engine.bin(WAL_ARCHIVE_WRAPPER), "--parallel", str(n), "--in-process", *mode, "--", *argv]


def wal_archive_spool_dir(data_dir: str) -> str:
    """Where the archive_command wrapper keeps its markers and its pusher (.pusher.pid, .pusher.log) for a data
    directory: next to it, never in it, so no base backup carries them (the wrapper's default_spool)."""
    data_dir = data_dir.rstrip("/") or "/"
    return posixpath.join(posixpath.dirname(data_dir), "pgops_wal_spool." + posixpath.basename(data_dir))


def backup_list_argv(cluster: Cluster, *, endpoint_url: str | None) -> list[str]:
    return [cluster.engine.bin("barman-cloud-backup-list"), *_common(cluster, endpoint_url), "--format", "json",
            cluster.storage.destination_url, cluster.storage.server_name]


def backup_show_argv(cluster: Cluster, *, endpoint_url: str | None, backup_id: str) -> list[str]:
    return [cluster.engine.bin("barman-cloud-backup-show"), *_common(cluster, endpoint_url), "--format", "json",
            cluster.storage.destination_url, cluster.storage.server_name, backup_id]


def backup_delete_argv(cluster: Cluster, *, endpoint_url: str | None, dry_run: bool) -> list[str]:
    argv = [cluster.engine.bin("barman-cloud-backup-delete"), *_common(cluster, endpoint_url),
            "--retention-policy", cluster.retention.policy,
            "--minimum-redundancy", str(cluster.retention.minimum_redundancy)]
    if dry_run:
        argv.append("--dry-run")
    return argv + [cluster.storage.destination_url, cluster.storage.server_name]


def restore_argv(cluster: Cluster, *, endpoint_url: str | None, backup_id: str, destination_dir: str) -> list[str]:
    return [cluster.engine.bin("barman-cloud-restore"), *_common(cluster, endpoint_url),
            cluster.storage.destination_url, cluster.storage.server_name, backup_id, destination_dir]


def parallel_restore_argv(cluster: Cluster, *, endpoint_url: str | None, backup_id: str, destination_dir: str,
                          jobs: int | None = None) -> list[str]:
    """pgops-restore: barman-cloud-restore's arguments plus --jobs; the base backup's tar parts are downloaded and
    extracted ``jobs`` (default engine.jobs) at a time, barman's catalog read by barman's own code."""
    return [cluster.engine.bin(PARALLEL_RESTORE_TOOL), "--jobs", str(jobs or cluster.engine.jobs),
            *_common(cluster, endpoint_url), cluster.storage.destination_url, cluster.storage.server_name, backup_id,
            destination_dir]


RESTORE_SUMMARY_PREFIX = "pgops-restore summary: "


def parse_restore_summary(lines: list[str]) -> dict[str, Any]:
    """The summary pgops-restore prints last (parts, jobs, bytes, seconds); {} when there is none."""
    for line in reversed(lines):
        at = line.find(RESTORE_SUMMARY_PREFIX)
        if at >= 0:
            try:
                data = json.loads(line[at + len(RESTORE_SUMMARY_PREFIX):])
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def wal_restore_argv(cluster: Cluster, *, endpoint_url: str | None, parallel: int = 0,
                     spool_dir: str | None = None, bare: bool = False) -> list[str]:
    """restore_command argv without the trailing '%f %p' (PostgreSQL fills those in).

    With parallel > 0 and a spool: the pgops prefetcher (the DB-host venv's pgops-wal-restore: barman's code
    imported once, ``parallel`` download threads) in front of barman-cloud-wal-restore, which still answers
    everything the prefetcher does not have. bare=True: barman-cloud-wal-restore's own --parallel prefetch.
    """
    argv = [cluster.engine.bin("barman-cloud-wal-restore"), *_common(cluster, endpoint_url)]
    tail = [cluster.storage.destination_url, cluster.storage.server_name]
    if parallel > 0 and spool_dir and not bare:
        return [cluster.engine.bin(WAL_RESTORE_WRAPPER), "--parallel", str(parallel),
                "--spool-dir", spool_dir, "--", *argv, *tail]
    if parallel > 0:
        argv += ["--parallel", str(parallel)]
        if spool_dir:
            argv += ["--spool-dir", spool_dir]
    return argv + tail


def wal_prefetch_start_argv(cluster: Cluster, *, endpoint_url: str | None, parallel: int, spool_dir: str,
                            start_segment: str) -> list[str] | None:
    """Start the prefetcher of a restore_command (wal_restore_argv with the same parallel and spool) at the
    recovery's first segment, before PostgreSQL starts, so its first calls find their segments in the spool.
    None when that restore_command has no prefetcher."""
    argv = wal_restore_argv(cluster, endpoint_url=endpoint_url, parallel=parallel, spool_dir=spool_dir)
    if argv[0] != cluster.engine.bin(WAL_RESTORE_WRAPPER) or not start_segment:
        return None
    cut = argv.index("--")
    return [*argv[:cut], "--start", start_segment, *argv[cut:]]


@dataclass(frozen=True, kw_only=True)
class BackupInfo:
    """What pgops needs of one barman-cloud catalog entry."""

    backup_id: str
    backup_name: str | None
    status: str
    begin_wal: str | None
    end_wal: str | None
    begin_lsn: str | None
    end_lsn: str | None
    begin_time: str | None
    end_time: str | None
    cluster_size_bytes: int | None
    timeline: int | None
    systemid: str | None
    error: str | None

    @property
    def done(self) -> bool:
        return self.status == "DONE"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _to_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def parse_backup_info(entry: dict[str, Any]) -> BackupInfo:
    return BackupInfo(
        backup_id=str(entry.get("backup_id")),
        backup_name=entry.get("backup_name"),
        status=str(entry.get("status", "UNKNOWN")),
        begin_wal=entry.get("begin_wal"),
        end_wal=entry.get("end_wal"),
        begin_lsn=entry.get("begin_xlog"),
        end_lsn=entry.get("end_xlog"),
        begin_time=entry.get("begin_time_iso") or entry.get("begin_time"),
        end_time=entry.get("end_time_iso") or entry.get("end_time"),
        cluster_size_bytes=_to_int(entry.get("cluster_size") or entry.get("size")),
        timeline=_to_int(entry.get("timeline")),
        systemid=entry.get("systemid"),
        error=entry.get("error"),
    )


def parse_backup_show(stdout: str) -> BackupInfo:
    """`barman-cloud-backup-show --format json` nests the backup under the key "cloud"."""
    data = json.loads(stdout)
    entry = data.get("cloud", data) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or "backup_id" not in entry:
        raise ValueError(f"unexpected barman-cloud-backup-show output: {stdout[:300]!r}")
    return parse_backup_info(entry)


def parse_backup_list(stdout: str) -> list[BackupInfo]:
    data = json.loads(stdout)
    return [parse_backup_info(b) for b in data.get("backups_list", [])]
