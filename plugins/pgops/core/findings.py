"""Audit findings: a stable id, a severity, a message that says what to do, evidence and a fix.

A finding is what a human reads in the report and what a machine acts on (alerting, the UI), so
its id never changes once published and its evidence holds plain JSON values only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
WARNING = "warning"
CRITICAL = "critical"
SEVERITIES = (OK, WARNING, CRITICAL)
_RANK = {OK: 0, WARNING: 1, CRITICAL: 2}

# WAL continuity
WAL_GAP = "WAL_GAP"
HISTORY_MISSING = "HISTORY_MISSING"
WAL_CONTINUOUS = "WAL_CONTINUOUS"
NO_BACKUPS = "NO_BACKUPS"
NO_WAL = "NO_WAL"
BACKUP_NOT_DONE = "BACKUP_NOT_DONE"
BACKUP_METADATA_UNREADABLE = "BACKUP_METADATA_UNREADABLE"
UNKNOWN_LAYOUT = "UNKNOWN_LAYOUT"
UNRECOGNISED_KEYS = "UNRECOGNISED_KEYS"
WAL_SEGMENT_SIZE_MISMATCH = "WAL_SEGMENT_SIZE_MISMATCH"
WAL_SEGMENT_SIZE_ASSUMED = "WAL_SEGMENT_SIZE_ASSUMED"
BACKUP_OFF_TIMELINE = "BACKUP_OFF_TIMELINE"

# backup cadence and freshness
BACKUPS_STOPPED = "BACKUPS_STOPPED"
BACKUP_OVERDUE = "BACKUP_OVERDUE"
BACKUP_FRESH = "BACKUP_FRESH"
WAL_STALE = "WAL_STALE"
WAL_FRESH = "WAL_FRESH"
ARCHIVE_EMPTY = "ARCHIVE_EMPTY"
HISTORY_UNREADABLE = "HISTORY_UNREADABLE"
MULTIPLE_STANZAS = "MULTIPLE_STANZAS"

# the live primary
PRIMARY_UNREACHABLE = "PRIMARY_UNREACHABLE"
ARCHIVER_FAILING = "ARCHIVER_FAILING"
ARCHIVER_FAILURES_GROWING = "ARCHIVER_FAILURES_GROWING"
ARCHIVER_OK = "ARCHIVER_OK"
ARCHIVE_LAG = "ARCHIVE_LAG"
ARCHIVE_TIMEOUT_ABOVE_RPO = "ARCHIVE_TIMEOUT_ABOVE_RPO"
PG_WAL_SIZE = "PG_WAL_SIZE"
PG_WAL_UNKNOWN = "PG_WAL_UNKNOWN"

# bucket hardening
BUCKET_VERSIONING_DISABLED = "BUCKET_VERSIONING_DISABLED"
BUCKET_ENCRYPTION_ABSENT = "BUCKET_ENCRYPTION_ABSENT"
BUCKET_PUBLIC_ACCESS_NOT_BLOCKED = "BUCKET_PUBLIC_ACCESS_NOT_BLOCKED"
BUCKET_OBJECT_LOCK_ABSENT = "BUCKET_OBJECT_LOCK_ABSENT"
BUCKET_HARDENING_UNKNOWN = "BUCKET_HARDENING_UNKNOWN"
BUCKET_HARDENED = "BUCKET_HARDENED"

# bucket lifecycle
LIFECYCLE_ABSENT = "LIFECYCLE_ABSENT"
LIFECYCLE_OK = "LIFECYCLE_OK"
LIFECYCLE_EXPIRES_NEEDED_WAL = "LIFECYCLE_EXPIRES_NEEDED_WAL"
LIFECYCLE_EXPIRES_NEEDED_BASE = "LIFECYCLE_EXPIRES_NEEDED_BASE"
LIFECYCLE_EXPIRES_HISTORY = "LIFECYCLE_EXPIRES_HISTORY"
LIFECYCLE_EXPIRES_BACKUP_METADATA = "LIFECYCLE_EXPIRES_BACKUP_METADATA"
LIFECYCLE_EXPIRATION_DATE = "LIFECYCLE_EXPIRATION_DATE"
LIFECYCLE_TAGGED_OBJECTS = "LIFECYCLE_TAGGED_OBJECTS"
LIFECYCLE_TRANSITION_ONLY = "LIFECYCLE_TRANSITION_ONLY"
LIFECYCLE_UNKNOWN = "LIFECYCLE_UNKNOWN"
LIFECYCLE_APPLIED = "LIFECYCLE_APPLIED"
LIFECYCLE_DAYS_UNTIL_LOSS = "LIFECYCLE_DAYS_UNTIL_LOSS"


@dataclass(frozen=True, kw_only=True)
class Finding:
    id: str
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"finding {self.id}: severity {self.severity!r} is not one of {SEVERITIES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "message": self.message,
            "evidence": dict(self.evidence),
            "fix": self.fix,
        }


def overall_status(findings: Iterable[Finding]) -> str:
    """The worst severity among the findings; "ok" when there are none."""
    worst = OK
    for finding in findings:
        if _RANK[finding.severity] > _RANK[worst]:
            worst = finding.severity
    return worst


def worst_first(findings: Iterable[Finding]) -> list[Finding]:
    """Findings ordered critical, warning, ok; stable within a severity."""
    return sorted(findings, key=lambda f: -_RANK[f.severity])
