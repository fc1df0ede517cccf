"""Pure parts of the audit runner: primary checks from rows, freshness, summary and exit codes."""

import gzip
from datetime import UTC, datetime, timedelta

from pgops.airflow import audit
from pgops.core import layouts
from pgops.inventory import Cluster, Storage

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CLUSTER = Cluster(name="main", postgres_conn_id="pg", aws_conn_id="aws",
                  storage=Storage(bucket="b", prefix="p", server_name="main"))


def row(**changes):
    base = {"archived_count": 10, "last_archived_wal": "000000010000000000000009",
            "last_archived_time": NOW - timedelta(seconds=30), "failed_count": 0, "last_failed_wal": None,
            "last_failed_time": None, "archive_mode": "on", "archive_command": "barman-cloud-wal-archive ... %p",
            "current_wal": "00000001000000000000000A", "in_recovery": False, "current_lsn": "0/A000100",
            "wal_segment_size_bytes": 16 * 1024 * 1024, "archive_timeout_s": 60,
            "max_wal_size_bytes": 1 << 30, "wal_keep_size_bytes": 0, "db_now": NOW}
    base.update(changes)
    return base


def ids(found):
    return [f.id for f in found]


def test_healthy_primary():
    primary, found = audit.check_primary(audit.PrimaryRows(row=row(), waldir={"files": 3, "size_bytes": 48 << 20}),
                                         cluster=CLUSTER, now=NOW, newest_segment=None, previous=None)
    assert ids(found) == ["ARCHIVER_OK"]
    assert primary["lag_segments"] == 0 and primary["lag_bytes"] == 0x100 and primary["pg_wal_bytes"] == 48 << 20


def test_failing_archiver_is_critical_and_lag_named():
    r = row(failed_count=7, last_failed_wal="00000001000000000000000A", last_failed_time=NOW - timedelta(seconds=5),
            last_archived_time=NOW - timedelta(hours=1), current_wal="00000001000000000000000D",
            current_lsn="0/D000000")
    primary, found = audit.check_primary(audit.PrimaryRows(row=r, waldir_error="InsufficientPrivilege"),
                                         cluster=CLUSTER, now=NOW, newest_segment=None, previous=None)
    by_id = {f.id: f for f in found}
    assert by_id["ARCHIVER_FAILING"].severity == "critical"
    assert "00000001000000000000000A" in by_id["ARCHIVER_FAILING"].message
    assert by_id["ARCHIVE_LAG"].evidence["lag_segments"] == 3
    assert "PG_WAL_UNKNOWN" in by_id


def test_failures_growing_history_last_archived_and_unreachable():
    r = row(failed_count=2, last_failed_time=NOW - timedelta(hours=2), last_archived_wal="00000002.history",
            current_wal="00000002000000000000000A")
    primary, found = audit.check_primary(audit.PrimaryRows(row=r, waldir={"files": 1, "size_bytes": 1}),
                                         cluster=CLUSTER, now=NOW, newest_segment="000000020000000000000009",
                                         previous={"failed_count": 0})
    assert "ARCHIVER_FAILURES_GROWING" in ids(found)
    assert primary["last_archived_segment"] == "000000020000000000000009" and primary["lag_segments"] == 0
    primary, found = audit.check_primary(audit.PrimaryRows(error="connection refused"), cluster=CLUSTER, now=NOW,
                                         newest_segment=None, previous=None)
    assert primary == {"reachable": False} and ids(found) == ["PRIMARY_UNREACHABLE"]


def test_archive_timeout_above_rpo():
    _, found = audit.check_primary(audit.PrimaryRows(row=row(archive_timeout_s=0), waldir={"files": 1, "size_bytes": 1}),
                                   cluster=CLUSTER, now=NOW, newest_segment=None, previous=None)
    assert "ARCHIVE_TIMEOUT_ABOVE_RPO" in ids(found)


def test_freshness_idle_primary_is_not_stale():
    index = layouts.WalIndex()
    index.add_segment(1, 0, 9, 1, NOW - timedelta(hours=3))
    backup = layouts.BackupRef(backup_id="b", status=layouts.DONE, end_time=NOW - timedelta(days=3))
    idle = {"reachable": True, "lag_segments": 0, "archive_timeout_s": 60}
    _, found = audit.check_freshness(cluster=CLUSTER, backups=[backup], modified={}, index=index, primary=idle,
                                     now=NOW, backup_interval_s=86400)
    assert ids(found) == ["BACKUP_OVERDUE", "WAL_FRESH"]
    _, found = audit.check_freshness(cluster=CLUSTER, backups=[backup], modified={}, index=index,
                                     primary={"reachable": False}, now=NOW, backup_interval_s=86400)
    assert "WAL_STALE" in ids(found)


def test_interval_decompress_summary_exit_codes():
    assert audit.interval_s("0 2 * * *", now=NOW) == 86400
    assert audit.interval_s("@hourly", now=NOW) == 3600 and audit.interval_s("@once", now=NOW) is None
    assert audit.decompress("k.gz", gzip.compress(b"1\t0/3000000\treason")) == b"1\t0/3000000\treason"
    assert audit.decompress("k", b"plain") == b"plain"
    report = {"cluster": "main", "status": "critical", "body": {
        "bucket": "b", "prefix": "p/main", "layout": "barman-cloud", "listing": {"key_count": 3},
        "recoverable_window": None, "counts": {"critical": 1},
        "findings": [{"id": "WAL_GAP", "severity": "critical", "message": "gap 000000010000000000000004",
                      "fix": "take a backup"}, {"id": "ARCHIVER_OK", "severity": "ok", "message": "fine"}]}}
    text = audit.summary(report)
    assert "CRITICAL" in text and "WAL_GAP" in text and "take a backup" in text and "ARCHIVER_OK" not in text
    assert [audit.exit_code({"status": s}) for s in ("ok", "warning", "critical")] == [0, 1, 2]
    assert audit.xcom_summary(report, "k")["problems"] == ["WAL_GAP"]
