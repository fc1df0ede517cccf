"""Hostile trigger params through the real DAGs on the lab (dag.test): refused in the form (the Param schema, before a
run exists) or by the first task before any side effect; and nothing changed (no run, no scratch directory, no
snapshot or volume). A form refusal names the param, the offending value and, where the schema has one, what to
give instead (the bound, the allowed values, the format); a run-time refusal also says "Fix: ..."."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import load_dag, task_states

from pgops.core import params as P

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

RESTORE_DAG, EBS_DAG = "pgops_restore_verify__main", "pgops_ebs_migration__main"
SCRATCH_ROOT = f"/var/tmp/pgops-hostile-{os.getpid()}"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"


def _runs(dag_id: str) -> int:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(DagRun).filter(DagRun.dag_id == dag_id).count()


def _refused(run_dag, dag_id: str, conf: dict, param: str, shown: object, fix: str | None) -> str:
    """The form's refusal: its headline names the param, the offending value and, where the schema gives one, what
    to give instead (a bound or the allowed values). ``fix`` None: the headline shows only the schema's regex."""
    before = _runs(dag_id)
    with pytest.raises(Exception) as err:  # noqa: PT011 - Airflow's ParamValidationError, whatever its module
        run_dag(load_dag(dag_id), conf=conf)
    text = str(err.value)
    assert type(err.value).__name__ == "ParamValidationError", text
    headline = text.splitlines()[0]
    assert headline.startswith(f"Invalid input for param {param}: {shown!r} "), headline
    if fix is None:
        assert "does not match '^" in headline, headline
    else:
        assert headline.endswith(fix), headline
    assert _runs(dag_id) == before  # refused before a run exists
    return text


@pytest.fixture
def scratch():
    root = Path(SCRATCH_ROOT)
    shutil.rmtree(root, ignore_errors=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(("param", "value", "fix"), [
    ("recovery_timeout_s", 10**12, f"is greater than the maximum of {P.MAX_RECOVERY_TIMEOUT_S}"),  # timedelta overflow
    ("recovery_timeout_s", 30, "is less than the minimum of 60"),
    ("horizon_days", 10**9, f"is greater than the maximum of {P.MAX_HORIZON_DAYS}"),
    ("required_bytes", 2**63, f"is greater than the maximum of {P.MAX_REQUIRED_BYTES}"),
    ("scratch_root", "/var/lib/postgresql/15/main/..", None),
    ("scratch_root", "/var/tmp//x", None),
    ("scratch_root", "/var/tmp/a\nb", None),
    ("target", "2024-01-01T00:00:00", None),  # no zone
    ("target", "latest; DROP TABLE x", None),
    ("target", "recovery_target_action = 'shutdown'", None),
    ("backup_id", "../other-server/base/x", None),
    ("checks", ["amcheck", "sh -c id"], "is not one of ['canary', 'system_identifier', 'amcheck', 'sql']"),
])
def test_restore_verify_refuses_in_the_form(lab, run_dag, scratch, param, value, fix):
    shown = value[-1] if isinstance(value, list) else value  # an array names its offending item
    _refused(run_dag, RESTORE_DAG, {"scratch_root": SCRATCH_ROOT, param: value}, param, shown, fix)
    assert not scratch.exists()


def test_restore_verify_refuses_a_target_in_the_future_before_touching_the_restore_host(lab, run_dag, scratch):
    future = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    dr = run_dag(load_dag(RESTORE_DAG), conf={"scratch_root": SCRATCH_ROOT, "target": future})
    from pgops.core.reports import read_latest

    states = task_states(dr)
    assert states["setup"] == "failed" and states["restore"] == "upstream_failed", states
    report = read_latest(lab.s3_client(), lab.cluster, "restore-verify")
    assert report["run_id"] == dr.run_id
    assert f"param target={future!r} is in the future" in report["body"]["errors"]["setup"], report["body"]["errors"]
    assert "Fix: give a time in the past" in report["body"]["errors"]["setup"], report["body"]["errors"]
    assert not scratch.exists()  # no scratch area, no download, no instance


def _aws_state(lab) -> tuple:
    out = []
    for region in (SOURCE_REGION, TARGET_REGION):
        ec2 = lab.aws_client("ec2", region=region)
        out.append(sorted(s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]))
        out.append(sorted(v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]))
    return tuple(map(tuple, out))


def _ebs_conf(volume_id: str, **changes) -> dict:
    return {"volume_ids": [volume_id], "target_region": TARGET_REGION, "target_az": f"{TARGET_REGION}b",
            "max_rounds": 2, "cutover_mode": "crash-consistent", **changes}


@pytest.mark.parametrize(("param", "value", "fix"), [
    ("downtime_target_minutes", 10**9, f"is greater than the maximum of {P.MAX_DOWNTIME_TARGET_MINUTES}"),
    ("copy_time_minutes", 1e300, f"is greater than the maximum of {P.MAX_COPY_TIME_MINUTES}"),
    ("expected_volume_size_gib", 10**12, f"is greater than the maximum of {P.MAX_VOLUME_SIZE_GIB}"),
    ("expected_throughput_mib_s", 10**9, f"is greater than the maximum of {P.MAX_THROUGHPUT_MIB_S}"),
    ("max_rounds", 10**6, "is greater than the maximum of 100"),
    ("kms_key_id", "alias/x\nkms:*", None),
    ("kms_key_id", "arn:aws:kms:us-west-2:123456789012:key/../../x", None),
    ("cutover_at", "tomorrow", "is not a 'date-time'"),
    ("target_account", "12345678901' OR '1", None),
    ("volume_type", "gp3 --dry-run", "is not one of ['gp3', 'gp2', 'io1', 'io2', 'st1', 'sc1']"),
])
def test_ebs_migration_refuses_in_the_form(moto, run_dag, param, value, fix):
    volume_id = moto.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    before = _aws_state(moto)
    _refused(run_dag, EBS_DAG, _ebs_conf(volume_id, **{param: value}), param, value, fix)
    assert _aws_state(moto) == before


def test_ebs_cutover_far_in_the_future_fails_in_validate_before_any_aws_call(moto, run_dag):
    volume_id = moto.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    before = _aws_state(moto)
    far = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
    dr = run_dag(load_dag(EBS_DAG), conf=_ebs_conf(volume_id, cutover_at=far))
    states = task_states(dr)
    assert states["validate"] == "failed" and states["preflight"] == "upstream_failed", states
    assert _aws_state(moto) == before  # no snapshot, no copy, no volume
