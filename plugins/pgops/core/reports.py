"""Durable JSON reports in the bucket: one envelope for every kind, plus <kind>/latest.json.

Key: <prefix>/<server>/pgops/reports/<kind>/<UTC timestamp>.json. They outlive the Airflow metadata DB
and feed trends (RTO against size) and the dashboard. Tasks read and write them through PgopsS3Hook
(write_report, read_latest_report, list_reports); the functions here take its boto3 client.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pgops.inventory import Cluster

SCHEMA_VERSION = 1
STATUSES = ("ok", "warning", "critical", "failed")
KINDS = ("wal-audit", "restore-verify", "ebs-migration", "backup", "replication")


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_ts(value: Any) -> datetime | None:
    """A report timestamp (ISO string, maybe with Z, or a datetime) as an aware UTC datetime; None if absent."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def envelope(*, kind: str, cluster: str, run_id: str, started_at: datetime, finished_at: datetime | None = None,
             status: str, body: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"report kind {kind!r} is not one of {', '.join(KINDS)}")
    if status not in STATUSES:
        raise ValueError(f"report status {status!r} is not one of {', '.join(STATUSES)}")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "cluster": cluster,
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": (finished_at or utcnow()).isoformat(),
        "status": status,
        "body": body,
    }


def report_name(finished_at: str | datetime) -> str:
    ts = datetime.fromisoformat(finished_at) if isinstance(finished_at, str) else finished_at
    return ts.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + ".json"


def write_report(s3, cluster: Cluster, report: dict[str, Any]) -> str:
    """Write the report under its timestamp, then overwrite latest.json; return the timestamped key."""
    body = json.dumps(report, indent=2, sort_keys=True, default=str).encode()
    key = cluster.storage.report_key(report["kind"], report_name(report["finished_at"]))
    s3.put_object(Bucket=cluster.storage.bucket, Key=key, Body=body, ContentType="application/json")
    s3.put_object(Bucket=cluster.storage.bucket, Key=cluster.storage.report_key(report["kind"], "latest.json"),
                  Body=body, ContentType="application/json")
    return key


def read_latest(s3, cluster: Cluster, kind: str) -> dict[str, Any] | None:
    try:
        obj = s3.get_object(Bucket=cluster.storage.bucket, Key=cluster.storage.report_key(kind, "latest.json"))
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(obj["Body"].read())


def list_reports(s3, cluster: Cluster, kind: str, *, limit: int = 200) -> list[dict[str, Any]]:
    """The newest `limit` reports of a kind, oldest first (keys sort by time)."""
    prefix = cluster.storage.report_key(kind, "")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cluster.storage.bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/latest.json"))
        keys = sorted(keys)[-limit:]
    return [json.loads(s3.get_object(Bucket=cluster.storage.bucket, Key=k)["Body"].read()) for k in keys]
