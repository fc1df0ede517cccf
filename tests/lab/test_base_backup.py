"""The base-backup DAG end to end on the real lab (PostgreSQL 15, SeaweedFS, moto SNS/SQS)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_base_backup__main"


def _barman(lab, *args: str) -> str:
    from pgops.dbhost.engines import barman_cloud
    from pgops.lab.local import as_db_user

    st = lab.load()
    cluster = lab.cluster
    argv = [cluster.engine.bin(args[0]), "--cloud-provider", "aws-s3", "--endpoint-url", st.s3_endpoint,
            *args[1:], cluster.storage.destination_url, cluster.storage.server_name]
    res = subprocess.run(as_db_user(argv, env=lab.db_env(st)), capture_output=True, text=True, check=True)
    assert barman_cloud  # the engine module knows these commands; here we call the bare CLI as a peer would
    return res.stdout


def _base_objects(lab) -> list[str]:
    st = lab.load()
    resp = lab.s3_client().list_objects_v2(Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/base/")
    return [o["Key"] for o in resp.get("Contents", [])]


def _write_inventory(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())
    cluster = data["clusters"][0]
    for dotted, value in changes.items():
        node = cluster
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "clusters.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_backup_end_to_end(lab, run_dag):
    lab.psql("CREATE TABLE IF NOT EXISTS bobby (id int primary key, note text); "
             "INSERT INTO bobby SELECT g, 'row ' || g FROM generate_series(1, 5000) g ON CONFLICT DO NOTHING;")
    dag = load_dag(DAG_ID)
    dr = run_dag(dag)
    assert task_states(dr) == {"preflight": "success", "backup": "success", "verify": "success",
                               "retention": "success"}, task_states(dr)

    summary = dr.get_task_instance("verify").xcom_pull(task_ids="verify")
    assert summary["status"] == "DONE"
    assert summary["stored_bytes"] > 0 and summary["begin_wal"] and summary["end_wal"]

    # The peer CLI agrees: barman-cloud-backup-list shows it DONE in the bucket.
    listed = json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]
    assert {b["backup_id"]: b["status"] for b in listed}[summary["backup_id"]] == "DONE"

    # WAL archived continuously: the backup's end segment is in the bucket.
    st = lab.load()
    keys = [o["Key"] for o in lab.s3_client().list_objects_v2(
        Bucket=st.bucket, Prefix=f"{st.prefix}/{st.server_name}/wals/").get("Contents", [])]
    assert any(summary["end_wal"] in k for k in keys)

    # The asset event carries the backup's facts for downstream DAGs.
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id).all()
        assert len(events) == 1
        extra = events[0].extra
    assert extra["backup_id"] == summary["backup_id"] and extra["end_wal"] == summary["end_wal"]
    assert extra["location"].startswith(f"s3://{st.bucket}/")

    # A retry of the backup task in the same run reuses the DONE backup instead of taking a second one.
    before = {b["backup_id"] for b in listed}
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    op = BarmanCloudBackupOperator(task_id="backup_retry", cluster_name="main")
    assert op.execute({"run_id": dr.run_id}) == summary["backup_id"]
    after = {b["backup_id"] for b in json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]}
    assert after == before

    # The preflight's catalog read (taken before the first attempt) says the run has no backup yet: a second
    # attempt must not believe it, or it takes a second backup; the first attempt's preflight did list nothing.
    preflight = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")
    assert preflight["run_id"] == dr.run_id and preflight["run_backups"] == []
    assert preflight["cluster_size_bytes"] > 0
    second_try = BarmanCloudBackupOperator(task_id="backup", cluster_name="main", preflight=preflight)
    assert second_try.execute({"run_id": dr.run_id, "ti": _Ti(try_number=2)}) == summary["backup_id"]
    after = {b["backup_id"] for b in json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]}
    assert after == before


class _Ti:
    def __init__(self, try_number: int):
        self.try_number = try_number


def test_runs_named_nightly_and_nightly_2_take_two_backups(lab):
    """Run nightly-2 first: run nightly must not take nightly-2's DONE backup for its own (a prefix match did)."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator, backup_name_for_run

    tag = f"{os.getpid()}-{int(time.time())}"
    second = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute({"run_id": f"nightly-{tag}-2"})
    first = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute({"run_id": f"nightly-{tag}"})
    assert first != second
    listed = {b["backup_id"]: b for b in json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]}
    assert listed[first]["status"] == listed[second]["status"] == "DONE"
    assert listed[first]["backup_name"] == backup_name_for_run(f"nightly-{tag}")
    assert listed[second]["backup_name"] == backup_name_for_run(f"nightly-{tag}-2")
    # each run's retry finds its own backup again
    assert BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute({"run_id": f"nightly-{tag}"}) == first


def test_db_down_fails_preflight_and_writes_nothing(lab, run_dag):
    before = _base_objects(lab)
    lab.pg_ctl("stop")
    try:
        dr = run_dag(load_dag(DAG_ID))
    finally:
        lab.pg_ctl("start")
    states = task_states(dr)
    assert states["preflight"] == "failed" and states["backup"] == "upstream_failed", states
    assert _base_objects(lab) == before


def test_broken_archive_command_is_named(lab, run_dag):
    lab.psql("ALTER SYSTEM SET archive_command = '/bin/false'; SELECT pg_reload_conf();")
    try:
        lab.psql("SELECT pg_switch_wal(); CREATE TABLE IF NOT EXISTS filler (x int); INSERT INTO filler VALUES (1);")
        lab.psql("SELECT pg_switch_wal();")
        deadline = time.time() + 30
        while time.time() < deadline and lab.psql("SELECT coalesce(failed_count, 0) FROM pg_stat_archiver") == "0":
            time.sleep(0.5)
        failing = lab.psql("SELECT last_failed_wal FROM pg_stat_archiver")
        assert failing
        from airflow.sdk.exceptions import AirflowFailException

        from pgops.airflow.operators.backup import BackupPreflightOperator

        with pytest.raises(AirflowFailException, match=f"archive_command failed for WAL segment {failing}"):
            BackupPreflightOperator(task_id="preflight", cluster_name="main").execute({"run_id": "t"})
    finally:
        lab.psql("ALTER SYSTEM RESET archive_command; SELECT pg_reload_conf();")
    deadline = time.time() + 60  # archiving recovers once the command is back
    while time.time() < deadline:
        if lab.psql("SELECT last_archived_time > last_failed_time FROM pg_stat_archiver") == "t":
            break
        time.sleep(1)
    else:
        pytest.fail("archiving did not recover after resetting archive_command")


def test_missing_bucket_is_a_clear_error(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("PGOPS_INVENTORY", str(_write_inventory(tmp_path, **{"storage.bucket": "pgops-no-such-bucket"})))
    from airflow.sdk.exceptions import AirflowFailException

    from pgops.airflow.operators.backup import BackupPreflightOperator

    with pytest.raises(AirflowFailException, match="bucket 'pgops-no-such-bucket' does not exist"):
        BackupPreflightOperator(task_id="preflight", cluster_name="main").execute({"run_id": "t"})


def test_retention_deletes_only_what_policy_allows(lab, tmp_path, monkeypatch):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator, BarmanCloudRetentionOperator

    ids = [BarmanCloudBackupOperator(task_id="b", cluster_name="main").execute({"run_id": f"retention-{i}"})
           for i in range(3)]
    catalog = [b["backup_id"] for b in json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]]
    assert set(ids) <= set(catalog)
    monkeypatch.setenv("PGOPS_INVENTORY", str(_write_inventory(
        tmp_path, **{"retention.policy": "REDUNDANCY 2", "retention.minimum_redundancy": 1})))
    dry = BarmanCloudRetentionOperator(task_id="r", cluster_name="main", dry_run=True).execute({"run_id": "r"})
    assert dry["deleted"] == [] and set(dry["kept"]) == set(catalog)
    result = BarmanCloudRetentionOperator(task_id="r", cluster_name="main").execute({"run_id": "r"})
    remaining = [b["backup_id"] for b in json.loads(_barman(lab, "barman-cloud-backup-list", "--format", "json"))["backups_list"]]
    assert sorted(remaining) == sorted(catalog)[-2:]  # the two newest survive
    assert sorted(result["deleted"]) == sorted(catalog)[:-2]


def test_failure_notification_reaches_sqs(lab, run_dag, tmp_path, monkeypatch):
    st = lab.load()
    sqs = lab.aws_client("sqs")
    queue_url = sqs.create_queue(QueueName=f"pgops-alerts-{os.getpid()}-{int(time.time())}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    lab.aws_client("sns").subscribe(TopicArn=st.sns_topic_arn, Protocol="sqs", Endpoint=queue_arn)
    # A cluster of its own: the "main" DAG's backup asset keeps pointing at the lab bucket for later tests.
    monkeypatch.setenv("PGOPS_INVENTORY", str(_write_inventory(
        tmp_path, **{"name": "alerting", "storage.bucket": "pgops-missing-for-alert"})))
    from pgops.airflow.dags.base_backup import build_base_backup_dag
    from pgops.inventory import load_inventory

    dr = run_dag(build_base_backup_dag(load_inventory().get("alerting")))
    assert task_states(dr)["preflight"] == "failed"
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=5).get("Messages", [])
    bodies = [json.loads(m["Body"]) for m in messages]
    assert any("pgops-missing-for-alert" in b["Message"] and "preflight" in b["Message"] for b in bodies), bodies
    assert any(b.get("Subject") == "pgops failure: alerting" for b in bodies)
