"""Continuous-archiving health from pg_stat_archiver (pure: a row in, a verdict out)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

ARCHIVER_SQL = """
SELECT a.archived_count, a.last_archived_wal, a.last_archived_time,
       a.failed_count, a.last_failed_wal, a.last_failed_time,
       current_setting('archive_mode') AS archive_mode,
       current_setting('archive_command') AS archive_command,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END AS current_wal,
       pg_is_in_recovery() AS in_recovery
FROM pg_stat_archiver a
"""


@dataclass(frozen=True)
class ArchiverHealth:
    healthy: bool
    message: str
    failing_wal: str | None = None


def archiver_health(row: dict[str, Any]) -> ArchiverHealth:
    """Failing when the newest failure is newer than the newest success (pgBackRest/CNPG's rule)."""
    mode = row.get("archive_mode")
    if mode not in ("on", "always"):
        return ArchiverHealth(False, f"archive_mode is {mode!r}: WAL is not archived, so no backup can be recovered "
                                     "to a point in time. Fix: set archive_mode = on and restart PostgreSQL")
    command = (row.get("archive_command") or "").strip()
    if not command or command in ("(disabled)",):
        return ArchiverHealth(False, "archive_command is empty: WAL segments pile up in pg_wal and none reach the bucket. "
                                     "Fix: set archive_command to barman-cloud-wal-archive ... %p")
    failed: datetime | None = row.get("last_failed_time")
    archived: datetime | None = row.get("last_archived_time")
    if failed is not None and (archived is None or failed > archived):
        wal = row.get("last_failed_wal")
        return ArchiverHealth(
            False,
            f"archive_command failed for WAL segment {wal} at {failed.isoformat()} "
            f"({row.get('failed_count')} failures in all; last success: "
            f"{archived.isoformat() if archived else 'never'} for {row.get('last_archived_wal') or 'no segment'}). "
            "Fix: check the PostgreSQL log for the archive_command error (credentials, endpoint, bucket) and run "
            "the archive_command by hand as the postgres user",
            failing_wal=wal,
        )
    if archived is None:
        return ArchiverHealth(True, "no WAL segment has been archived yet (a fresh cluster; pg_switch_wal() forces one)")
    return ArchiverHealth(True, f"archiving healthy: last archived {row.get('last_archived_wal')} at {archived.isoformat()}")
