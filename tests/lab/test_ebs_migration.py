"""The EBS migration DAG on the lab: moto's EC2 (snapshots complete at once) and the real PostgreSQL 15."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_ebs_migration__main"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"


def _snapshots(lab, region: str, **filters) -> list[dict]:
    ec2 = lab.aws_client("ec2", region=region)
    flt = [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    return ec2.describe_snapshots(OwnerIds=["self"], Filters=flt)["Snapshots"]


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _conf(volume_id: str, **changes) -> dict:
    return {"volume_ids": [volume_id], "target_region": TARGET_REGION, "target_az": f"{TARGET_REGION}b",
            "downtime_target_minutes": 10, "copy_time_minutes": 1, "max_rounds": 2, "cutover_mode": "backup",
            "skip_approval": True, **changes}


def test_whole_dag_snapshots_copies_and_creates_the_volume(moto, run_dag):
    from pgops.core.reports import read_latest

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
    from pgops.airflow.ebs_hooks import EbsEc2Hook

    lab = moto
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    volume_id = ec2.create_volume(Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    hook = EbsEc2Hook(aws_conn_id=lab.cluster.aws_conn_id)

    def take() -> dict[str, str]:
        return hook.create_round_snapshots(migration="pgops_test/retry", round_name="1", volume_ids=[volume_id])

    first = take()
    second = take()
    assert first == second and set(first) == {volume_id}
    assert len(_snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": "pgops_test/retry"})) == 1


def test_instance_snapshots_are_crash_consistent_and_idempotent(moto):
    from pgops.airflow.ebs_hooks import EbsEc2Hook

    lab = moto
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    inst = ec2.run_instances(MinCount=1, MaxCount=1, ImageId="ami-12345678", InstanceType="t3.micro",
                             Placement={"AvailabilityZone": f"{SOURCE_REGION}a"})["Instances"][0]["InstanceId"]
    data = [ec2.create_volume(Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"] for _ in range(2)]
    for device, vid in zip(("/dev/sdf", "/dev/sdg"), data, strict=True):
        ec2.attach_volume(VolumeId=vid, InstanceId=inst, Device=device)
    hook = EbsEc2Hook(aws_conn_id=lab.cluster.aws_conn_id)

    def take() -> dict[str, str]:
        return hook.create_round_snapshots(migration="pgops_test/instance", round_name="1", volume_ids=data,
                                           instance_id=inst)

    first = take()
    assert set(first) == set(data)
    assert take() == first
    assert len(_snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": "pgops_test/instance"})) == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"volume_ids": ["vol-xyz"]}, "volume_ids"),
    ({"target_region": "us-nowhere-1", "target_az": "us-nowhere-1a"}, "target_region"),
    ({"target_az": "eu-west-1a"}, "target_az"),
    ({"expected_volume_size_gib": 2048, "expected_throughput_mib_s": 40, "expected_write_rate_mib_s": 60},
     "diverges"),
])
def test_bad_params_fail_before_any_aws_call(moto, run_dag, changes, message):
    from pgops.core.ebs.spec import MigrationParamsError, migration_spec

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
    from pgops.dbhost.quiesce import backup_mode
    from pgops.airflow.hooks import pg_connect
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


# --- stop-writes cutover: a clean stop through the cluster's runner, the final snapshot while down, a restart ---
TARGET_ACCOUNT = "210987654321"


def _postmaster(lab) -> tuple[int | None, str | None]:
    """(postmaster pid from postmaster.pid, pg_postmaster_start_time) or (None, None) when the server is down."""
    from pathlib import Path

    from pgops.lab.local import LabError

    pid_file = Path(lab.load().pg_data) / "postmaster.pid"
    try:
        return int(pid_file.read_text().split()[0]), lab.psql("SELECT pg_postmaster_start_time()")
    except (OSError, LabError):
        return None, None


def _environ(pid: int) -> tuple[dict[str, str], bytes]:
    """/proc/<pid>/environ of a process (read as root: the postmaster runs as postgres), parsed and raw."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        raw = fh.read()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item), raw


def _wait_up(lab, within_s: float) -> tuple[int, str]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        pid, started = _postmaster(lab)
        if started:
            return pid, started
        time.sleep(0.5)
    raise AssertionError(f"the lab primary is not up {within_s} s later")


@pytest.fixture
def stoppable_primary(lab, monkeypatch):
    """The lab primary, which a test stops; the runner's environment is the one the lab starts it with (its
    archive_command needs it). Afterwards the primary runs and the lab state knows its new postmaster pid."""
    st = lab.load()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # would shadow the DB host's credentials file
    for name, value in lab.db_env(st).items():
        monkeypatch.setenv(name, value)
    lab.psql("CREATE TABLE IF NOT EXISTS pgops_ebs_canary (id int PRIMARY KEY, note text); "
             "TRUNCATE pgops_ebs_canary; INSERT INTO pgops_ebs_canary VALUES (1, 'before the stop')")
    try:
        yield lab
    finally:
        try:
            pid, _started = _wait_up(lab, 60)
        except AssertionError:
            lab.pg_ctl("start")  # records the new pid
        else:
            st = lab.load()
            st.pids["pg"] = pid
            lab._save(st)
        lab.psql("DROP TABLE IF EXISTS pgops_ebs_canary")


def _canary(lab) -> str:
    return lab.psql("SELECT note FROM pgops_ebs_canary WHERE id = 1")


def test_stop_writes_whole_dag_from_an_instance_shared_and_cleaned_up(stoppable_primary, moto, run_dag, monkeypatch):
    """stop-writes cutover of an instance's data volumes, shared with another account (KMS preflight), intermediate
    snapshots deleted after success; the final snapshot is taken while PostgreSQL is down, which runs again after."""
    import pgops.airflow.operators.ebs as ebs_ops
    from pgops.airflow.ebs_hooks import EbsEc2Hook

    lab = stoppable_primary
    ec2 = lab.aws_client("ec2", region=SOURCE_REGION)
    inst = ec2.run_instances(MinCount=1, MaxCount=1, ImageId="ami-12345678", InstanceType="t3.micro",
                             Placement={"AvailabilityZone": f"{SOURCE_REGION}a"})["Instances"][0]["InstanceId"]
    data = [ec2.create_volume(Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"] for _ in range(2)]
    for device, vid in zip(("/dev/sdf", "/dev/sdg"), data, strict=True):
        ec2.attach_volume(VolumeId=vid, InstanceId=inst, Device=device)
    key_policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "TargetAccountUsesCopies", "Effect": "Allow",
         "Principal": {"AWS": f"arn:aws:iam::{TARGET_ACCOUNT}:root"},
         "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:CreateGrant", "kms:ReEncrypt*"], "Resource": "*"}]}
    key_arn = lab.aws_client("kms", region=TARGET_REGION).create_key(
        Description="pgops migration", Policy=json.dumps(key_policy))["KeyMetadata"]["Arn"]

    pid_before, started_before = _postmaster(lab)
    env_before, _raw = _environ(pid_before)
    # The worker holds secrets the restarted server must not get (any superuser reads /proc/self/environ).
    # (a valid Fernet key: the run's deferrals encrypt their trigger kwargs with it)
    sentinels = {"AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(b"sentinel-fernet-key-" + os.urandom(12)).decode(),
                 "DB_ADMIN_PASSWORD": f"sentinel-db-admin-{os.urandom(6).hex()}"}
    for name, value in sentinels.items():
        monkeypatch.setenv(name, value)
    # ... nor the worker's locale and TZ where it ran without them (every other child gets those from the worker)
    worker_locale = {k: v for k, v in {"LC_ALL": "C.UTF-8", "LC_MONETARY": "C", "TZ": "Pacific/Chatham"}.items()
                     if k not in env_before}
    assert worker_locale, sorted(env_before)
    for name, value in worker_locale.items():
        monkeypatch.setenv(name, value)
    seen_at_final: list[tuple] = []
    original = EbsEc2Hook.create_round_snapshots

    def observed(ec2_hook, **kwargs):
        if kwargs["round_name"] == ebs_ops.FINAL_ROUND:
            seen_at_final.append(_postmaster(lab))
        return original(ec2_hook, **kwargs)

    monkeypatch.setattr(EbsEc2Hook, "create_round_snapshots", observed)
    conf = _conf("vol-0123456789abcdef0", volume_ids=[], instance_id=inst, cutover_mode="stop-writes",
                 kms_key_id=key_arn, target_account=TARGET_ACCOUNT, delete_intermediate_snapshots=True)
    dr = run_dag(load_dag(DAG_ID), conf=conf)
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    migration = f"{DAG_ID}/{dr.run_id}"

    # The final snapshot was taken with the server down; it runs again, restarted, with the data intact.
    assert seen_at_final == [(None, None)]
    pid_after, started_after = _wait_up(lab, 30)
    assert pid_after != pid_before and started_after != started_before
    assert _canary(lab) == "before the stop"
    # Restarted with the environment it ran with (read from /proc before the stop), none of the worker's.
    env_after, raw_after = _environ(pid_after)
    assert not [k for k in env_after if k.startswith("AIRFLOW")], sorted(env_after)
    assert not [v for v in sentinels.values() if v.encode() in raw_after] and "DB_ADMIN_PASSWORD" not in env_after
    assert not set(worker_locale) & set(env_after), (sorted(worker_locale), sorted(env_after))
    assert env_before and not [k for k in env_before if k.startswith("AIRFLOW")], sorted(env_before)
    # what pg_ctl itself puts in the environment of the server it starts (its own pid, its shell's cwd, and the
    # locale and service-file directories it derives from its binary), whoever started the server before
    per_start = {"PG_GRANDPARENT_PID", "PWD", "PGLOCALEDIR", "PGSYSCONFDIR"}
    assert set(env_after) - per_start == set(env_before) - per_start, (sorted(env_before), sorted(env_after))
    assert {k: v for k, v in env_after.items() if k not in per_start} == {
        k: v for k, v in env_before.items() if k not in per_start}
    cutover = dr.get_task_instance("cutover").xcom_pull(task_ids="cutover")
    stop = cutover["stop"]
    assert cutover["mode"] == "stop-writes" and stop["restarted_by"] == "task" and 0 < stop["down_s"] < 120
    # The restarted server archives again (its environment came through the runner).
    lab.psql("INSERT INTO pgops_ebs_canary VALUES (2, 'after the restart')")
    segment = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    lab.psql("SELECT pg_switch_wal()")
    deadline = time.monotonic() + 60
    while (lab.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") or "") < segment:
        assert time.monotonic() < deadline, lab.psql("SELECT * FROM pg_stat_archiver")
        time.sleep(0.5)

    # Preflight: the instance's data volumes (not its root), the KMS key lets the target account in.
    pre = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")
    assert sorted(pre["volume_ids"]) == sorted(data) and pre["kms"]["target_account_allowed"] is True
    # Shared with the target account; intermediate snapshots and copies deleted, the final ones kept.
    source = _snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": migration})
    copies = _snapshots(lab, TARGET_REGION, **{"pgops:migration-id": migration})
    assert {_tags(s)["pgops:round"] for s in source} == {"final"} and len(source) == 2
    assert {_tags(c)["pgops:round"] for c in copies} == {"final"} and len(copies) == 2
    target = lab.aws_client("ec2", region=TARGET_REGION)
    for c in copies:
        perms = target.describe_snapshot_attribute(SnapshotId=c["SnapshotId"],
                                                   Attribute="createVolumePermission")["CreateVolumePermissions"]
        assert {"UserId": TARGET_ACCOUNT} in perms, perms
    report = dr.get_task_instance("report").xcom_pull(task_ids="report")["body"]
    assert len(report["deleted_intermediate_snapshots"]) == 2 * 2 * len(report["rounds"])
    assert report["shared"]["shared_with"] == TARGET_ACCOUNT


def test_kms_preflight_refuses_a_key_the_target_account_cannot_use(moto):
    from airflow.sdk.exceptions import AirflowFailException

    from pgops.airflow.operators.ebs import EbsMigrationPreflightOperator

    lab = moto
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    key_arn = lab.aws_client("kms", region=TARGET_REGION).create_key(Description="this account only")["KeyMetadata"]["Arn"]
    op = EbsMigrationPreflightOperator(task_id="preflight", aws_conn_id=lab.cluster.aws_conn_id)
    params = _conf(volume_id, kms_key_id=key_arn, target_account=TARGET_ACCOUNT)
    with pytest.raises(AirflowFailException, match=f"does not let account {TARGET_ACCOUNT} use it"):
        op.execute({"params": params})


class _TI:
    """A task instance the operator pulls nothing from: its upstream values come as arguments."""

    dag_id = "pgops_test"

    def xcom_pull(self, task_ids: str, key: str | None = None):
        raise AssertionError(f"pulled XCom of {task_ids!r} (key {key!r}) instead of taking it as an argument")


def test_stop_writes_restarts_after_a_failure_between_stop_and_snapshot(stoppable_primary, moto):
    from pgops.airflow.operators.ebs import EbsCutoverOperator

    lab = stoppable_primary
    _pid, started_before = _postmaster(lab)
    missing = "vol-0123456789abcdef0"  # not in moto: CreateSnapshot fails after the stop
    # no chain before this cutover: no round for it to follow
    op = EbsCutoverOperator(task_id="cutover", preflight={"volume_ids": [missing], "instance_id": None}, chain=None,
                            postgres_conn_id=lab.cluster.postgres_conn_id, cluster_name=lab.cluster.name,
                            aws_conn_id=lab.cluster.aws_conn_id)
    context = {"params": _conf(missing, cutover_mode="stop-writes"), "run_id": "stop-fails", "ti": _TI()}
    with pytest.raises(Exception, match="InvalidVolume"):
        op.execute(context)
    _pid, started_after = _postmaster(lab)  # up again when execute returns, not later
    assert started_after and started_after != started_before
    assert _canary(lab) == "before the stop"


WATCHED = textwrap.dedent("""
    import sys, time
    from pgops.dbhost.quiesce import server_stopped
    from pgops.inventory import load_inventory
    from pgops.dbhost.procs import PG_BIN
    from pgops.dbhost.runners import get_runner

    runner = get_runner(load_inventory().get("main"))
    with server_stopped(runner, pg_ctl=str(PG_BIN / "pg_ctl"), data_dir=sys.argv[1], log_file=sys.argv[2],
                        restart_within_s=float(sys.argv[3]), log=lambda m: print(m, flush=True)):
        print("STOPPED", flush=True)
        time.sleep(3600)
""")


def test_stop_writes_watchdog_restarts_when_the_task_dies(stoppable_primary):
    from pathlib import Path

    lab = stoppable_primary
    st = lab.load()
    _pid, started_before = _postmaster(lab)
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, st.pg_data, str(Path(st.pg_data).parent / "postgres.log"),
                             "6"], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("STOPPED"):
                break
        else:
            raise AssertionError(f"the task exited with {proc.wait()} before stopping PostgreSQL")
        os.kill(proc.pid, signal.SIGKILL)  # the task dies with the server down
        proc.wait()
        assert _postmaster(lab) == (None, None)
        killed_at = time.monotonic()
        _pid, started_after = _wait_up(lab, 30)
        assert started_after != started_before and time.monotonic() - killed_at < 30
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _canary(lab) == "before the stop"


def test_backup_cutover_stores_the_full_label_and_a_retry_without_it_takes_a_new_final_round(moto):
    """The full backup_label goes to the bucket before the backup session ends; a retry reuses final snapshots only
    with it, and supersedes final snapshots whose label was never stored (a try that died in between)."""
    from pgops.airflow.operators.ebs import EbsCutoverOperator
    from pgops.core.ebs.backup_label import backup_label_key, read_backup_label

    lab = moto
    s3 = lab.s3_client()
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    op = EbsCutoverOperator(task_id="cutover", preflight={"volume_ids": [volume_id], "instance_id": None},
                            postgres_conn_id=lab.cluster.postgres_conn_id, cluster_name=lab.cluster.name,
                            aws_conn_id=lab.cluster.aws_conn_id)
    context = {"params": _conf(volume_id), "run_id": "label-retry", "ti": _TI()}
    migration = "pgops_test/label-retry"

    first = op.execute(context)
    label = first["backup"]["backup_label"]
    assert label.startswith("START WAL LOCATION") and f"LABEL: {migration}" in label and "START TIMELINE" in label
    stored = read_backup_label(s3, lab.cluster, migration)
    assert stored["backup"]["backup_label"] == label and stored["snapshots"] == first["snapshots"]
    assert backup_label_key(lab.cluster, migration).startswith(f"{lab.cluster.storage.server_prefix}/pgops/reports/")

    second = op.execute(context)  # a retry: the stored label makes the final snapshots usable, nothing new
    assert second["snapshots"] == first["snapshots"] and second["backup"]["backup_label"] == label
    assert "superseded_snapshots" not in second
    assert len(_snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": migration})) == 1

    # a try that died after the final snapshot, before its label was stored
    s3.delete_object(Bucket=lab.cluster.storage.bucket, Key=backup_label_key(lab.cluster, migration))
    third = op.execute(context)
    old_ids = sorted(first["snapshots"].values())
    assert third["superseded_snapshots"] == old_ids
    assert set(third["snapshots"].values()).isdisjoint(old_ids)
    assert third["backup"]["start_lsn"] != first["backup"]["start_lsn"]  # backup mode was entered again
    finals = _snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": migration, "pgops:round": "final"})
    assert sorted(s["SnapshotId"] for s in finals) == sorted(third["snapshots"].values())
    old = _snapshots(lab, SOURCE_REGION, **{"pgops:migration-id": migration, "pgops:round": "final-superseded"})
    assert sorted(s["SnapshotId"] for s in old) == old_ids  # kept, not deleted, and no longer "final"
    stored = read_backup_label(s3, lab.cluster, migration)
    assert stored["snapshots"] == third["snapshots"] and stored["backup"]["backup_label"] == third["backup"]["backup_label"]
    # balanced: no backup left in progress
    lab.psql("SELECT pg_backup_start('after-label-test', true); SELECT lsn FROM pg_backup_stop(false);")
