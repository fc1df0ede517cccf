"""The EBS migration's AWS hooks: EC2 (snapshots, copies, shares, volumes), KMS (the destination key) and the
EBS direct API (a round's changed blocks), each one service and one client per hook, from the Airflow connection.

The connection's extra endpoint_url reaches the lab's moto server; our waiters (snapshot_completed with a 24 h
budget, volume_available) are data in plugins/pgops/airflow/waiters/ec2.json.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError

from pgops.core.ebs.spec import TAG_MIGRATION, TAG_ROUND, TAG_SOURCE_SNAPSHOT, TAG_SOURCE_VOLUME

WAITERS_DIR = Path(__file__).resolve().parent / "waiters"
# EC2 errors that mean "later", not "never": back off and try again.
BACKOFF_ERRORS = frozenset({"ConcurrentSnapshotLimitExceeded", "SnapshotCreationPerVolumeRateExceeded",
                            "RequestLimitExceeded", "SnapshotCopyLimitExceeded"})
DESCRIBE_IDS_MAX = 200  # values of one DescribeSnapshots filter


def error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def tag_filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]


def tag_spec(resource_type: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def client_token(*parts: str) -> str:
    """An EC2 idempotency token (at most 64 ASCII characters) that is the same on every try of the same run."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


class EbsEc2Hook(EC2Hook):
    """
    EC2 in client mode for the EBS migration: snapshots, copies, shares and volumes, found again by their tags.

    Every resource a migration makes carries its migration id, round and source, so a retried task finds what an
    earlier try made and reuses it instead of making a second one.

    Additional arguments (such as ``aws_conn_id`` and ``region_name``) are passed down to the underlying
    :class:`~airflow.providers.amazon.aws.hooks.ec2.EC2Hook`.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["api_type"] = "client_type"
        super().__init__(**kwargs)

    @cached_property
    def waiter_path(self) -> os.PathLike[str] | None:
        return WAITERS_DIR / "ec2.json"

    def call_with_backoff(self, fn: Callable[..., Any], *, what: str, max_wait_s: float = 900.0,
                          first_delay_s: float = 15.0, **kwargs: Any) -> Any:
        """Call an EC2 API, sleeping and retrying while EC2 answers a limit error (bounded)."""
        delay_s, waited_s = first_delay_s, 0.0
        while True:
            try:
                return fn(**kwargs)
            except ClientError as exc:
                code = error_code(exc)
                if code not in BACKOFF_ERRORS or waited_s + delay_s > max_wait_s:
                    raise
                self.log.warning("%s: EC2 answered %s; backing off %.0f s (waited %.0f s of %.0f s)", what, code,
                                 delay_s, waited_s, max_wait_s)
                time.sleep(delay_s)
                waited_s += delay_s
                delay_s = min(delay_s * 2, 120.0)

    # -- snapshots ---------------------------------------------------------------------------------------------
    def find_snapshots(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Our own snapshots carrying all these tags (not in state error)."""
        pages = self.conn.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=tag_filters(tags))
        return [s for page in pages for s in page["Snapshots"] if s.get("State") != "error"]

    def describe_snapshots(self, snapshot_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The snapshots by id (EC2 refuses the call when one does not exist)."""
        return self.conn.describe_snapshots(SnapshotIds=list(snapshot_ids))["Snapshots"]

    def describe_existing_snapshots(self, snapshot_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Our own snapshots among these ids; one deleted by hand is missing from the answer instead of failing it."""
        wanted = sorted(snapshot_ids)
        described: list[dict[str, Any]] = []
        for at in range(0, len(wanted), DESCRIBE_IDS_MAX):
            described += self.conn.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": "snapshot-id", "Values": wanted[at:at + DESCRIBE_IDS_MAX]}],
            )["Snapshots"]
        return described

    def create_round_snapshots(self, *, migration: str, round_name: str, volume_ids: Sequence[str],
                               instance_id: str | None = None, extra_tags: dict[str, str] | None = None,
                               ) -> dict[str, str]:
        """Snapshots of a round, {source volume: snapshot}; reuses the round's tagged snapshots on a retry.

        With an instance id, CreateSnapshots takes all its data volumes at one instant (crash-consistent).
        """
        tags = {TAG_MIGRATION: migration, TAG_ROUND: round_name}
        found = {s["VolumeId"]: s["SnapshotId"] for s in self.find_snapshots(tags)}
        missing = [v for v in volume_ids if v not in found]
        if found:
            self.log.info("round %s: reusing snapshot(s) already taken by an earlier try: %s", round_name, found)
        if not missing:
            return {v: found[v] for v in volume_ids}
        all_tags = {**tags, **(extra_tags or {})}
        description = f"pgops migration {migration} round {round_name}"
        if instance_id:
            if found:
                raise AirflowFailException(f"round {round_name}: instance {instance_id} has snapshots of only some "
                                           f"volumes ({found}); delete them or retry the run from scratch")
            resp = self.call_with_backoff(self.conn.create_snapshots, what=f"CreateSnapshots {instance_id}",
                                          InstanceSpecification={"InstanceId": instance_id,
                                                                 "ExcludeBootVolume": True},
                                          Description=description,
                                          TagSpecifications=tag_spec("snapshot", all_tags))
            for snap in resp["Snapshots"]:
                found[snap["VolumeId"]] = snap["SnapshotId"]
                self.tag_resources([snap["SnapshotId"]], {TAG_SOURCE_VOLUME: snap["VolumeId"]})
        else:
            for volume_id in missing:
                snap = self.call_with_backoff(self.conn.create_snapshot, what=f"CreateSnapshot {volume_id}",
                                              VolumeId=volume_id, Description=description,
                                              TagSpecifications=tag_spec("snapshot", {**all_tags,
                                                                                      TAG_SOURCE_VOLUME: volume_id}))
                found[volume_id] = snap["SnapshotId"]
        self.log.info("round %s: snapshot(s) %s", round_name, found)
        absent = [v for v in volume_ids if v not in found]
        if absent:
            raise AirflowFailException(f"round {round_name}: no snapshot was made of {absent}")
        return {v: found[v] for v in volume_ids}

    def copy_snapshots(self, *, migration: str, round_name: str, snapshots: dict[str, str], source_region: str,
                       kms_key_id: str | None, completion_minutes: int | None = None) -> dict[str, str]:
        """Copy {volume: snapshot} into this hook's region (re-encrypted with one KMS key); reuse tagged copies."""
        copies: dict[str, str] = {}
        for volume_id, snapshot_id in snapshots.items():
            existing = self.find_snapshots({TAG_MIGRATION: migration, TAG_SOURCE_SNAPSHOT: snapshot_id})
            if existing:
                copies[volume_id] = existing[0]["SnapshotId"]
                continue
            kwargs: dict[str, Any] = {
                "SourceRegion": source_region, "SourceSnapshotId": snapshot_id,
                "Description": f"pgops migration {migration} round {round_name} copy of {snapshot_id}",
                "TagSpecifications": tag_spec("snapshot", {TAG_MIGRATION: migration, TAG_ROUND: round_name,
                                                           TAG_SOURCE_SNAPSHOT: snapshot_id,
                                                           TAG_SOURCE_VOLUME: volume_id}),
            }
            if kms_key_id:
                kwargs.update(Encrypted=True, KmsKeyId=kms_key_id)
            if completion_minutes:
                kwargs["CompletionDurationMinutes"] = completion_minutes
            resp = self.call_with_backoff(self.conn.copy_snapshot, what=f"CopySnapshot {snapshot_id}", **kwargs)
            copies[volume_id] = resp["SnapshotId"]
        self.log.info("round %s: copies in %s: %s", round_name, self.region_name, copies)
        return copies

    def share_snapshot(self, snapshot_id: str, account_id: str) -> None:
        """Let another account create volumes from the snapshot (createVolumePermission)."""
        self.conn.modify_snapshot_attribute(SnapshotId=snapshot_id, Attribute="createVolumePermission",
                                            OperationType="add", UserIds=[account_id])

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete one snapshot (an intermediate round's, or a declined migration's)."""
        self.conn.delete_snapshot(SnapshotId=snapshot_id)

    def tag_resources(self, resource_ids: Sequence[str], tags: dict[str, str]) -> None:
        """Add or overwrite these tags on snapshots or volumes."""
        self.conn.create_tags(Resources=list(resource_ids), Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    # -- volumes and the source --------------------------------------------------------------------------------
    def find_volumes(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Volumes carrying all these tags (not deleting, deleted or in state error)."""
        pages = self.conn.get_paginator("describe_volumes").paginate(Filters=tag_filters(tags))
        return [v for page in pages for v in page["Volumes"] if v.get("State") not in ("deleting", "deleted", "error")]

    def describe_volumes(self, volume_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The volumes by id (EC2 refuses the call when one does not exist: InvalidVolume.NotFound)."""
        return self.conn.describe_volumes(VolumeIds=list(volume_ids))["Volumes"]

    def data_volume_ids(self, instance_id: str) -> tuple[list[str], str | None]:
        """(the instance's EBS volumes besides its root device, the root device's name)."""
        inst = self.conn.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        root = inst.get("RootDeviceName")
        return [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", [])
                if "Ebs" in m and m["DeviceName"] != root], root

    def availability_zones(self) -> list[str]:
        """The names of the zones this hook's region offers."""
        return [z["ZoneName"] for z in self.conn.describe_availability_zones()["AvailabilityZones"]]

    def enable_fast_snapshot_restore(self, snapshot_id: str, availability_zone: str) -> None:
        """Fast snapshot restore for the snapshot in one zone: its volumes are fully initialized at creation."""
        self.conn.enable_fast_snapshot_restores(AvailabilityZones=[availability_zone], SourceSnapshotIds=[snapshot_id])

    def create_volume(self, *, snapshot_id: str, availability_zone: str, volume_type: str, tags: dict[str, str],
                      token: str, initialization_rate_mib_s: int | None = None) -> str:
        """CreateVolume from a snapshot; the same ``token`` on a retry gives the same volume back, not a second one."""
        kwargs: dict[str, Any] = {"ClientToken": token, "SnapshotId": snapshot_id,
                                  "AvailabilityZone": availability_zone, "VolumeType": volume_type,
                                  "TagSpecifications": tag_spec("volume", tags)}
        if initialization_rate_mib_s:
            kwargs["VolumeInitializationRate"] = int(initialization_rate_mib_s)
        return self.conn.create_volume(**kwargs)["VolumeId"]

    def wait_volumes_available(self, volume_ids: Sequence[str], *, delay_s: int = 5, max_attempts: int = 720) -> None:
        """Wait (our volume_available waiter, 1 h by default) until every volume is available; fail on error."""
        self.get_waiter("volume_available").wait(VolumeIds=list(volume_ids),
                                                 WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts})

    def volume_initialization(self, volume_id: str) -> Any:
        """The volume's InitializationStatusDetails, or "unknown" (a lab without DescribeVolumeStatus)."""
        try:
            status = self.conn.describe_volume_status(VolumeIds=[volume_id])["VolumeStatuses"]
        except Exception as exc:  # noqa: BLE001 - a lab without DescribeVolumeStatus gives "unknown"
            self.log.info("DescribeVolumeStatus %s not available (%s): initialization unknown", volume_id,
                          str(exc).splitlines()[0][:120])
            return "unknown"
        details = status[0].get("InitializationStatusDetails") if status else None
        return details or "unknown"


class EbsKmsHook(AwsBaseHook):
    """
    KMS, to read the destination key a migration's copies are encrypted with: its state, policy and grants.

    Additional arguments (such as ``aws_conn_id`` and ``region_name``) are passed down to the underlying
    :class:`~airflow.providers.amazon.aws.hooks.base_aws.AwsBaseHook`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "kms"
        super().__init__(*args, **kwargs)

    def describe_key(self, key_id: str) -> dict[str, Any]:
        return self.conn.describe_key(KeyId=key_id)["KeyMetadata"]

    def key_policy(self, key_id: str) -> str:
        return self.conn.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]

    def grants(self, key_id: str) -> list[dict[str, Any]]:
        return [g for page in self._pages(self.conn.list_grants, KeyId=key_id) for g in page.get("Grants", [])]

    @staticmethod
    def _pages(call: Callable[..., dict[str, Any]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Every page of a KMS list call (Marker/NextMarker paging)."""
        while True:
            page = call(**kwargs)
            yield page
            if not page.get("Truncated") or not page.get("NextMarker"):
                return
            kwargs["Marker"] = page["NextMarker"]


class EbsDirectHook(AwsBaseHook):
    """
    The EBS direct API (ListChangedBlocks), to measure a round's delta in bytes.

    Additional arguments (such as ``aws_conn_id`` and ``region_name``) are passed down to the underlying
    :class:`~airflow.providers.amazon.aws.hooks.base_aws.AwsBaseHook`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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
