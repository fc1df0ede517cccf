"""The backup_label of a backup-mode cutover, stored in the cluster's bucket beside the ebs-migration reports.

A final snapshot taken between pg_backup_start and pg_backup_stop is restorable only with the label
pg_backup_stop returned: it is written here before the backup session ends, and a retried cutover reuses
final snapshots only when their label is here.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

LABEL_KIND = "ebs-migration-labels"  # beside the ebs-migration reports, not inside their listing


def backup_label_key(cluster, migration: str) -> str:
    """<prefix>/<server>/pgops/reports/ebs-migration-labels/<run, readable>-<hash>.json"""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", migration.rsplit("/", 1)[-1])[:80]
    return cluster.storage.report_key(LABEL_KIND, f"{readable}-{hashlib.sha256(migration.encode()).hexdigest()[:16]}.json")


def write_backup_label(s3, cluster, migration: str, *, snapshots: dict[str, str], backup: dict[str, Any]) -> str:
    key = backup_label_key(cluster, migration)
    body = {"migration_id": migration, "snapshots": snapshots, "backup": backup, "stored_at": datetime.now(UTC).isoformat()}
    s3.put_object(Bucket=cluster.storage.bucket, Key=key, Body=json.dumps(body, indent=2, sort_keys=True).encode(),
                  ContentType="application/json")
    return key


def read_backup_label(s3, cluster, migration: str) -> dict[str, Any] | None:
    """The stored label of a migration's final round, or None when there is none (or it is not ours)."""
    try:
        obj = s3.get_object(Bucket=cluster.storage.bucket, Key=backup_label_key(cluster, migration))
    except s3.exceptions.NoSuchKey:
        return None
    data = json.loads(obj["Body"].read())
    label = (data.get("backup") or {}).get("backup_label") if isinstance(data, dict) else None
    if data.get("migration_id") != migration or not isinstance(label, str) or "START WAL LOCATION" not in label:
        return None
    return data
