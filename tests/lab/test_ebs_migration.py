"""The EBS migration DAG on the lab: moto's EC2 (snapshots complete at once) and the real PostgreSQL 15."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from conftest import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_ebs_migration__main"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"


@pytest.fixture
def moto(lab):
    """A fresh moto state (the alert topic the DAGs notify is made again)."""
    st = lab.load()
    urllib.request.urlopen(urllib.request.Request(f"{st.moto_endpoint}/moto-api/reset", method="POST"), timeout=10)
    lab.aws_client("sns", st).create_topic(Name=lab.cluster.alerts.sns_topic_arn.rsplit(":", 1)[-1])
    return lab


def _snapshots(lab, region: str, **filters) -> list[dict]:
    ec2 = lab.aws_client("ec2", region=region)
    flt = [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    return ec2.describe_snapshots(OwnerIds=["self"], Filters=flt)["Snapshots"]


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _conf(volume_id: str, **changes) -> dict:
    return {"volume_ids": [volume_id], "target_region": TARGET_REGION, "target_az": f"{TARGET_REGION}b",
            "downtime_target_minutes": 10, "copy_time_minutes": 1, "max_rounds": 2, "cutover_mode": "backup",
            **changes}


def test_whole_dag_snapshots_copies_and_creates_the_volume(moto, run_dag):
    from pgops.reports import read_latest

    lab = moto
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    volume_id = ec2.create_volume(Size=20, AvailabilityZone=f"{SOURCE_REGION}a", VolumeType="gp3")["VolumeId"]
    key_arn = lab.aws_client("kms", region=TARGET_REGION).create_key(Description="pgops migration")["KeyMetadata"]["Arn"]
    lab.psql("SELECT pg_stat_reset()")  # nothing of ours should be left in backup mode afterwards

    # The lab's snapshots complete at once, so the whole volume fits the target after round 1: a cutover_at
    # an hour away keeps the chain going until max_rounds (2).
    cutover_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    dr = run_dag(load_dag(DAG_ID), conf=_conf(volume_id, kms_key_id=key_arn, cutover_at=cutover_at))
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    migration = f"{DAG_ID}/{dr.run_id}"

    # Source: rounds 1 and 2 and the final snapshot, each tagged with the migration, round and volume.
    source = _snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": migration})
    by_round = {_tags(s)["pgops:round"]: s for s in source}
    assert set(by_round) == {"1", "2", "final"}, by_round.keys()
    assert all(_tags(s)["pgops:source-volume"] == volume_id for s in source)
    final_tags = _tags(by_round["final"])
    assert "START WAL LOCATION" in final_tags["pgops:backup-label"] and len(final_tags["pgops:backup-label"]) <= 256

    # Target: one copy per round, all with the one destination key; the volume in the target AZ from the final copy.
    copies = _snapshots(lab, TARGET_REGION, **{"pgops:migration-id": migration})
    assert {_tags(c)["pgops:round"] for c in copies} == {"1", "2", "final"}
    assert {c["KmsKeyId"] for c in copies} == {key_arn} and all(c["Encrypted"] for c in copies)
    final_copy = next(c for c in copies if _tags(c)["pgops:round"] == "final")
    assert _tags(final_copy)["pgops:source-snapshot"] == by_round["final"]["SnapshotId"]
    volumes = lab.aws_client("ec2", region=TARGET_REGION).describe_volumes(
        Filters=[{"Name": "tag:pgops:migration-id", "Values": [migration]}])["Volumes"]
    assert len(volumes) == 1
    new = volumes[0]
    assert new["AvailabilityZone"] == f"{TARGET_REGION}b" and new["State"] == "available"
    assert new["SnapshotId"] == final_copy["SnapshotId"] and _tags(new)["pgops:source-volume"] == volume_id

    # Report: XCom and the bucket agree; rounds, decisions, backup_label, destination ids.
    xcom = dr.get_task_instance("report").xcom_pull(task_ids="report")
    stored = read_latest(lab.s3_client(), lab.cluster, "ebs-migration")
    assert stored["run_id"] == dr.run_id and stored["status"] == "ok" and xcom["report_key"]
    body = stored["body"]
    assert [r["index"] for r in body["rounds"]] == [1, 2]
    assert body["rounds"][1]["duration_s"] > 0 and "predicted_duration_s" in body["rounds"][1]
    assert [d["action"] for d in body["decisions"]] == ["another_round", "another_round", "max_rounds"]
    assert "cutover_at" in body["decisions"][1]["reason"] and body["decisions"][2]["numbers"]["rounds"] == 2
    assert body["destination_snapshots"] == {volume_id: final_copy["SnapshotId"]}
    assert body["destination_volumes"] == {volume_id: new["VolumeId"]}
    assert body["initialization"] == {new["VolumeId"]: "unknown"}
    backup = body["cutover"]["backup"]
    assert backup["backup_label"].startswith("START WAL LOCATION") and f"LABEL: {migration[:100]}" in backup["backup_label"]
    assert backup["start_lsn"] and backup["stop_lsn"] and body["downtime_s"] >= 0
    # Balanced: the held session is gone, and a new backup starts and stops.
    assert lab.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backup['backend_pid']}") == "0"
    lab.psql("SELECT pg_backup_start('pgops-test', true); SELECT lsn FROM pg_backup_stop(false);")


def test_retried_create_snapshot_makes_no_duplicate(moto):
    from pgops.operators.ebs import EbsCreateSnapshotsOperator

    lab = moto
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    volume_id = ec2.create_volume(Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    op = EbsCreateSnapshotsOperator(task_id="snap", aws_conn_id=lab.cluster.aws_conn_id, volume_ids=[volume_id],
                                    round_name="1", migration_id="pgops_test/retry")
    first = op.execute({"run_id": "retry"})
    second = op.execute({"run_id": "retry"})
    assert first == second and set(first) == {volume_id}
    assert len(_snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": "pgops_test/retry"})) == 1


def test_instance_snapshots_are_crash_consistent_and_idempotent(moto):
    from pgops.operators.ebs import EbsCreateSnapshotsOperator

    lab = moto
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    inst = ec2.run_instances(MinCount=1, MaxCount=1, ImageId="ami-12345678", InstanceType="t3.micro",
                             Placement={"AvailabilityZone": f"{SOURCE_REGION}a"})["Instances"][0]["InstanceId"]
    data = [ec2.create_volume(Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"] for _ in range(2)]
    for device, vid in zip(("/dev/sdf", "/dev/sdg"), data, strict=True):
        ec2.attach_volume(VolumeId=vid, InstanceId=inst, Device=device)
    op = EbsCreateSnapshotsOperator(task_id="snap", aws_conn_id=lab.cluster.aws_conn_id, volume_ids=data,
                                    instance_id=inst, round_name="1", migration_id="pgops_test/instance")
    first = op.execute({"run_id": "i"})
    assert set(first) == set(data)
    assert op.execute({"run_id": "i"}) == first
    assert len(_snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": "pgops_test/instance"})) == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"volume_ids": ["vol-xyz"]}, "volume_ids"),
    ({"target_region": "us-nowhere-1", "target_az": "us-nowhere-1a"}, "target_region"),
    ({"target_az": "eu-west-1a"}, "target_az"),
    ({"expected_volume_size_gib": 2048, "expected_throughput_mib_s": 40, "expected_write_rate_mib_s": 60},
     "diverges"),
])
def test_bad_params_fail_before_any_aws_call(moto, run_dag, changes, message):
    from pgops.ebs.spec import MigrationParamsError, migration_spec

    lab = moto
    conf = _conf("vol-0123456789abcdef0", **changes)
    with pytest.raises(MigrationParamsError, match=message):
        migration_spec(conf)
    try:
        dr = run_dag(load_dag(DAG_ID), conf=conf)
    except Exception as exc:  # the Param JSON schema refused the conf before the run started
        assert message.split("_")[0] in str(exc) or "valid" in str(exc).lower(), exc
    else:
        states = task_states(dr)
        assert states["validate"] == "failed" and states["preflight"] == "upstream_failed", states
    assert _snapshots(lab, SOURCE_REGION) == [] and _snapshots(lab, TARGET_REGION) == []


def test_dry_run_plans_and_writes_a_report_without_snapshots(moto, run_dag):
    lab = moto
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    dr = run_dag(load_dag(DAG_ID), conf=_conf(volume_id, dry_run=True, max_rounds=10, expected_volume_size_gib=2048,
                                             expected_throughput_mib_s=40, expected_write_rate_mib_s=4))
    states = task_states(dr)
    assert states["preflight"] == "success" and states["chain"] == "skipped" and states["report"] == "success", states
    report = dr.get_task_instance("report").xcom_pull(task_ids="report")
    assert report["status"] == "warning" and report["body"]["plan"]["outcome"] == "cut_over"
    assert _snapshots(lab, SOURCE_REGION) == []


HOLDER = textwrap.dedent("""
    import sys, time
    from pgops.ebs.quiesce import backup_mode
    from pgops.hooks import pg_connect
    with backup_mode(lambda: pg_connect("pgops_main_pg"), label="pgops-watchdog", timeout_s=float(sys.argv[1]),
                     log=lambda m: print(m, flush=True)) as held:
        print("PID", held.backend_pid, flush=True)
        time.sleep(3600)
""")


def _hold_backup(timeout_s: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(timeout_s)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("PID "):
            return proc, int(line.split()[1])
    raise AssertionError(f"the holder exited with {proc.wait()} before pg_backup_start")


def _wait_gone(lab, pid: int, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if lab.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0":
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"backend {pid} still holds the backup after {within_s} s")


def test_watchdog_releases_backup_when_the_task_process_dies(lab):
    proc, pid = _hold_backup(600)
    assert lab.psql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {pid}") == "pgops"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone(lab, pid, 10) < 10
    lab.psql("SELECT pg_backup_start('after-kill', true); SELECT lsn FROM pg_backup_stop(false);")


def test_watchdog_releases_backup_when_the_task_hangs(lab):
    proc, pid = _hold_backup(3)
    os.kill(proc.pid, signal.SIGSTOP)  # a hung worker: alive, but never reaches pg_backup_stop
    try:
        assert _wait_gone(lab, pid, 15) < 15
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lab.psql("SELECT pg_backup_start('after-hang', true); SELECT lsn FROM pg_backup_stop(false);")
