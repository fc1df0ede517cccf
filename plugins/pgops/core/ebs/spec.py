"""What an EBS migration run is asked to do: its params, validated without any AWS call.

The DAG's Param JSON schema checks each field in the trigger form; `migration_spec` adds the
cross-field rules (one source, AZ inside the target region, copy estimate under the target) and
the plan-time divergence check, and gives every error the field, the value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pgops.core import params as bounds
from pgops.core.ebs import planner

MIB = 1024 * 1024
# Param patterns match whole values (bounds.whole: no trailing newline); the run-time checks use fullmatch.
VOLUME_ID_PATTERN = bounds.whole(r"^vol-[0-9a-f]{8,17}$")
INSTANCE_ID_PATTERN = bounds.whole(r"^i-[0-9a-f]{8,17}$")
REGION_PATTERN = bounds.whole(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
AZ_PATTERN = bounds.whole(r"^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$")
ACCOUNT_PATTERN = bounds.whole(r"^[0-9]{12}$")
# A key id, a multi-Region key id, an alias, or the ARN of a key or alias.
KMS_KEY_PATTERN = bounds.whole(r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key/[A-Za-z0-9-]{1,64}|alias/[A-Za-z0-9/_-]{1,250})|"
                               r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}|"
                               r"alias/[A-Za-z0-9/_-]{1,250})$")
CUTOVER_MODES = ("backup", "stop-writes", "crash-consistent")
INITIALIZATIONS = ("none", "rate", "fast-snapshot-restore")
VOLUME_TYPES = ("gp3", "gp2", "io1", "io2", "st1", "sc1")
# VolumeInitializationRate accepts 100..300 MiB/s.
MIN_INIT_RATE_MIB_S, MAX_INIT_RATE_MIB_S = 100, 300
# Tag keys every migration resource carries (a retry finds its own resources by them).
TAG_MIGRATION = "pgops:migration-id"
TAG_ROUND = "pgops:round"
TAG_SOURCE_VOLUME = "pgops:source-volume"
TAG_SOURCE_SNAPSHOT = "pgops:source-snapshot"
TAG_BACKUP_LABEL = "pgops:backup-label"
TAG_VALUE_MAX = 256


class MigrationParamsError(ValueError):
    """Bad migration params: raised before any AWS call."""


def known_regions() -> frozenset[str]:
    """EC2 regions botocore knows (its bundled endpoint data: no network)."""
    import boto3

    return frozenset(boto3.session.Session().get_available_regions("ec2"))


@dataclass(frozen=True, kw_only=True)
class MigrationSpec:
    volume_ids: tuple[str, ...]
    instance_id: str | None
    target_region: str
    target_account: str | None
    kms_key_id: str | None
    target_az: str
    downtime_target_s: float
    copy_time_s: float
    max_rounds: int
    cutover_at: str | None
    cutover_mode: str
    volume_initialization: str
    volume_initialization_rate_mib_s: int | None
    volume_type: str
    delete_intermediate_snapshots: bool
    dry_run: bool
    plan: dict[str, Any] | None = None

    def chain_params(self) -> planner.ChainParams:
        cutover_at = datetime.fromisoformat(self.cutover_at) if self.cutover_at else None
        return planner.ChainParams(downtime_target_s=self.downtime_target_s, max_rounds=self.max_rounds,
                                   copy_time_s=self.copy_time_s, cutover_at=cutover_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"volume_ids": list(self.volume_ids)}


def migration_id(dag_id: str, run_id: str) -> str:
    """Tag value naming one migration run (truncated to the EC2 tag value limit)."""
    return f"{dag_id}/{run_id}"[:TAG_VALUE_MAX]


def _fail(field: str, value: Any, problem: str, fix: str) -> MigrationParamsError:
    return MigrationParamsError(f"param {field}={value!r}: {problem}. Fix: {fix}")


def _optional_str(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise _fail(key, value, "must be a string", f"give {key} as text or leave it empty")
    return value.strip()


def _number(params: dict[str, Any], key: str, default: float | None, minimum: float,
            maximum: float = float("inf")) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
        limits = f"from {minimum:g} to {maximum:g}" if maximum != float("inf") else f"of at least {minimum:g}"
        raise _fail(key, value, f"must be a number {limits}", f"set {key} to a number {limits}")
    return float(value)


def migration_spec(params: dict[str, Any], *, regions: frozenset[str] | None = None,
                   now: datetime | None = None) -> MigrationSpec:
    """Validate the DAG params (no AWS call) and return the migration they describe."""
    regions = known_regions() if regions is None else regions
    raw_volumes = params.get("volume_ids") or []
    if isinstance(raw_volumes, str):
        raw_volumes = [v for v in re.split(r"[\s,]+", raw_volumes) if v]
    if not isinstance(raw_volumes, list | tuple):
        raise _fail("volume_ids", raw_volumes, "must be a list of volume ids", 'give e.g. ["vol-0123456789abcdef0"]')
    volume_ids = tuple(raw_volumes)
    for vid in volume_ids:
        if not isinstance(vid, str) or not re.fullmatch(VOLUME_ID_PATTERN, vid):
            raise _fail("volume_ids", vid, "is not an EBS volume id (vol- and 8 to 17 hex digits)",
                        "copy the id from the EC2 console or `aws ec2 describe-volumes`")
    if len(set(volume_ids)) != len(volume_ids):
        raise _fail("volume_ids", list(volume_ids), "lists a volume twice", "list each volume once")
    instance_id = _optional_str(params, "instance_id")
    if instance_id is not None and not re.fullmatch(INSTANCE_ID_PATTERN, instance_id):
        raise _fail("instance_id", instance_id, "is not an EC2 instance id (i- and 8 to 17 hex digits)",
                    "copy the id from the EC2 console")
    if bool(volume_ids) == bool(instance_id):
        raise _fail("volume_ids/instance_id", {"volume_ids": list(volume_ids), "instance_id": instance_id},
                    "give exactly one source", "set volume_ids (one or more volumes) or instance_id (all its "
                    "data volumes, snapshotted crash-consistent at one instant), not both")
    target_region = _optional_str(params, "target_region") or ""
    if not re.fullmatch(REGION_PATTERN, target_region) or target_region not in regions:
        raise _fail("target_region", target_region, "is not a known AWS region",
                    f"use one of {', '.join(sorted(regions)[:6])}, ...")
    target_az = _optional_str(params, "target_az") or ""
    if not re.fullmatch(rf"{re.escape(target_region)}[a-z]", target_az):
        raise _fail("target_az", target_az, f"is not an availability zone of target_region {target_region}",
                    f"use an AZ of {target_region}, e.g. {target_region}a")
    target_account = _optional_str(params, "target_account")
    if target_account is not None and not re.fullmatch(ACCOUNT_PATTERN, target_account):
        raise _fail("target_account", target_account, "is not a 12-digit AWS account id", "leave it empty to "
                    "keep the copy in this account")
    kms_key_id = _optional_str(params, "kms_key_id")
    if kms_key_id is not None and not re.fullmatch(KMS_KEY_PATTERN, kms_key_id):
        raise _fail("kms_key_id", kms_key_id, "is not a KMS key id, alias or ARN",
                    "copy the key ARN from the KMS console, e.g. arn:aws:kms:us-west-2:123456789012:key/<uuid>")
    if kms_key_id is not None and kms_key_id.startswith("arn:") and f":kms:{target_region}:" not in kms_key_id:
        raise _fail("kms_key_id", kms_key_id, f"is a KMS key ARN outside target_region {target_region}",
                    "copies are re-encrypted in the target region: name a key that lives there")
    if target_account is not None and kms_key_id is None:
        raise _fail("kms_key_id", None, "is required when sharing with target_account",
                    "snapshots encrypted with the AWS-managed key cannot be shared: name a customer-managed key "
                    "whose policy grants the target account kms:Decrypt/CreateGrant/DescribeKey")
    mode = params.get("cutover_mode", "backup")
    if mode not in CUTOVER_MODES:
        raise _fail("cutover_mode", mode, "is not a cutover mode", f"use one of {', '.join(CUTOVER_MODES)}")
    init = params.get("volume_initialization", "none")
    if init not in INITIALIZATIONS:
        raise _fail("volume_initialization", init, "is not an initialization", f"use one of {', '.join(INITIALIZATIONS)}")
    rate = params.get("volume_initialization_rate_mib_s")
    if init == "rate":
        if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_INIT_RATE_MIB_S <= rate <= MAX_INIT_RATE_MIB_S:
            raise _fail("volume_initialization_rate_mib_s", rate, f"must be an integer from {MIN_INIT_RATE_MIB_S} "
                        f"to {MAX_INIT_RATE_MIB_S} with volume_initialization=rate", "set a rate in MiB/s")
    else:
        rate = None
    cutover_at = _optional_str(params, "cutover_at")
    if cutover_at is not None:
        try:
            parsed = bounds.check_future_time("cutover_at", cutover_at,
                                              max_ahead_s=bounds.MAX_CUTOVER_AHEAD_DAYS * bounds.DAY_S, now=now)
        except bounds.ParamRefused as exc:
            raise MigrationParamsError(str(exc)) from None
        cutover_at = parsed.isoformat() if parsed else None
    downtime_target_s = 60 * _number(params, "downtime_target_minutes", 10, 0.1, bounds.MAX_DOWNTIME_TARGET_MINUTES)
    copy_time_s = 60 * _number(params, "copy_time_minutes", 5, 0, bounds.MAX_COPY_TIME_MINUTES)
    max_rounds = params.get("max_rounds", 10)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 2 <= max_rounds <= 100:
        raise _fail("max_rounds", max_rounds, "must be an integer from 2 to 100", "set max_rounds from 2 to 100")
    try:
        chain = planner.ChainParams(downtime_target_s=downtime_target_s, max_rounds=max_rounds,
                                    copy_time_s=copy_time_s)
    except ValueError as exc:
        raise MigrationParamsError(f"params downtime_target_minutes/copy_time_minutes/max_rounds: {exc}") from None
    volume_type = params.get("volume_type", "gp3")
    if volume_type not in VOLUME_TYPES:
        raise _fail("volume_type", volume_type, "is not an EBS volume type", f"use one of {', '.join(VOLUME_TYPES)}")
    plan = None
    expected = {}
    for key, low, high in (("expected_volume_size_gib", 1, bounds.MAX_VOLUME_SIZE_GIB),
                           ("expected_throughput_mib_s", 1e-9, bounds.MAX_THROUGHPUT_MIB_S),
                           ("expected_write_rate_mib_s", 0, bounds.MAX_THROUGHPUT_MIB_S)):
        expected[key] = None if params.get(key) is None else _number(params, key, None, low, high)
    write_mib_s, throughput_mib_s = expected["expected_write_rate_mib_s"], expected["expected_throughput_mib_s"]
    size_gib = expected["expected_volume_size_gib"]
    if write_mib_s is not None and throughput_mib_s is not None and size_gib:
        result = planner.plan_before_start(int(size_gib * 1024**3), throughput_mib_s * MIB, write_mib_s * MIB,
                                           _number(params, "expected_overhead_s", 60, 0, 3600), chain.downtime_target_s,
                                           chain.copy_time_s, chain.max_rounds)
        if result.outcome == planner.DIVERGING:
            raise _fail("expected_write_rate_mib_s", write_mib_s, result.message,
                        "throttle writes below the snapshot throughput or migrate by WAL replay instead")
        plan = result.to_dict()
    return MigrationSpec(volume_ids=volume_ids, instance_id=instance_id, target_region=target_region,
                         target_account=target_account, kms_key_id=kms_key_id, target_az=target_az,
                         downtime_target_s=downtime_target_s, copy_time_s=copy_time_s, max_rounds=max_rounds,
                         cutover_at=cutover_at, cutover_mode=mode, volume_initialization=init,
                         volume_initialization_rate_mib_s=rate, volume_type=volume_type,
                         delete_intermediate_snapshots=bool(params.get("delete_intermediate_snapshots", False)),
                         dry_run=bool(params.get("dry_run", False)), plan=plan)
