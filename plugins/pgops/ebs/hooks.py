"""EC2 (client mode) and EBS direct API hooks, built from the Airflow AWS connection.

The connection's extra endpoint_url reaches the lab's moto server; our waiters (snapshot_completed
with a 24 h budget, volume_available) are data in plugins/pgops/waiters/ec2.json.
"""

from __future__ import annotations

import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from botocore.exceptions import ClientError

WAITERS_DIR = Path(__file__).resolve().parents[1] / "waiters"
# EC2 errors that mean "later", not "never": back off and try again.
BACKOFF_ERRORS = frozenset({"ConcurrentSnapshotLimitExceeded", "SnapshotCreationPerVolumeRateExceeded",
                            "RequestLimitExceeded", "SnapshotCopyLimitExceeded"})


def error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def tag_filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]


def tag_spec(resource_type: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def client_token(*parts: str) -> str:
    """An EC2 idempotency token (at most 64 ASCII characters) that is the same on every try of the same run."""
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


class EbsEc2Hook(AwsBaseHook):
    """boto3 EC2 client (client mode) for snapshots, copies and volumes."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["client_type"] = "ec2"
        super().__init__(*args, **kwargs)

    @cached_property
    def waiter_path(self) -> os.PathLike[str] | None:
        return WAITERS_DIR / "ec2.json"

    def call_with_backoff(self, fn, *, what: str, max_wait_s: float = 900.0, first_delay_s: float = 15.0, log=None,
                          **kwargs: Any):
        """Call an EC2 API, sleeping and retrying while EC2 answers a limit error (bounded)."""
        delay_s, waited_s = first_delay_s, 0.0
        while True:
            try:
                return fn(**kwargs)
            except ClientError as exc:
                code = error_code(exc)
                if code not in BACKOFF_ERRORS or waited_s + delay_s > max_wait_s:
                    raise
                if log is not None:
                    log.warning("%s: EC2 answered %s; backing off %.0f s (waited %.0f s of %.0f s)", what, code,
                                delay_s, waited_s, max_wait_s)
                time.sleep(delay_s)
                waited_s += delay_s
                delay_s = min(delay_s * 2, 120.0)

    def find_snapshots(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Our own snapshots carrying all these tags (not in state error)."""
        pages = self.conn.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=tag_filters(tags))
        return [s for page in pages for s in page["Snapshots"] if s.get("State") != "error"]

    def find_volumes(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        pages = self.conn.get_paginator("describe_volumes").paginate(Filters=tag_filters(tags))
        return [v for page in pages for v in page["Volumes"] if v.get("State") not in ("deleting", "deleted", "error")]


class EbsDirectHook(AwsBaseHook):
    """EBS direct API (ListChangedBlocks) to measure a round's delta in bytes."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["client_type"] = "ebs"
        super().__init__(*args, **kwargs)

    def changed_bytes(self, first_snapshot_id: str | None, second_snapshot_id: str) -> int | None:
        """Blocks changed between two snapshots x BlockSize; None when the API cannot tell (then the planner
        works from durations)."""
        kwargs: dict[str, Any] = {"SecondSnapshotId": second_snapshot_id}
        if first_snapshot_id:
            kwargs["FirstSnapshotId"] = first_snapshot_id
        total = 0
        try:
            while True:
                resp = self.conn.list_changed_blocks(**kwargs)
                total += len(resp.get("ChangedBlocks", [])) * int(resp.get("BlockSize", 512 * 1024))
                token = resp.get("NextToken")
                if not token:
                    return total
                kwargs["NextToken"] = token
        except Exception as exc:  # noqa: BLE001 - any failure here only loses a measurement
            self.log.info("ListChangedBlocks %s..%s not available (%s): the planner uses durations",
                          first_snapshot_id, second_snapshot_id, str(exc).splitlines()[0][:200])
            return None


def kms_client(conn_id: str, region: str):
    return AwsBaseHook(aws_conn_id=conn_id, client_type="kms", region_name=region).conn
