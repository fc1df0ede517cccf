"""Progress of long work on the real lab: the base backup logs the bytes uploaded so far while barman-cloud
runs, and the dashboard's record in the bucket follows the run to its end."""

from __future__ import annotations

import logging

import pytest

from pgops.airflow import progress
from pgops.airflow.hooks import s3_client
from pgops.inventory import load_inventory

pytestmark = [pytest.mark.lab, pytest.mark.airflow]


def test_backup_reports_bytes_uploaded_while_it_runs(lab, airflow_db, capfd):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator, _stored_bytes

    # enough data that the upload spans several ticks
    lab.psql("CREATE TABLE IF NOT EXISTS progress_fill AS SELECT g AS id, md5(g::text) AS pad "
             "FROM generate_series(1, 400000) g")
    cluster = load_inventory().get("main")
    run_id = "progress-test"
    try:
        backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main",
                                              progress_interval_s=0.3).execute({"run_id": run_id})
    finally:
        lab.psql("DROP TABLE IF EXISTS progress_fill")
    out = capfd.readouterr()  # the task logger writes through structlog, not the logging records caplog sees
    lines = [line for line in (out.out + out.err).splitlines() if "progress base backup of main:" in line]
    assert len(lines) >= 3, lines  # ticks while running, and the final one
    assert all(" uploaded" in line and "before compression" in line for line in lines), lines
    record = progress.read_progress(s3_client(cluster.aws_conn_id), cluster, "backup")
    assert record["run_id"] == run_id and record["state"] == "done"
    stored = _stored_bytes(cluster, backup_id)
    # the final figure is what the new backup holds in the bucket (and nothing from older backups)
    assert stored * 0.98 <= record["done_bytes"] <= stored * 1.02, (record, stored)
    assert 0 < record["total_bytes"] and record["elapsed_s"] > 0


def test_restore_verification_reports_bytes_restored_and_the_replay_lsn(lab, airflow_db, run_dag, capfd):
    import os
    import shutil

    from helpers import load_dag, task_states

    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute({"run_id": "progress-restore"})
    dag = load_dag("pgops_restore_verify__main")
    dag.get_task("restore").progress_interval_s = 0.2
    dag.get_task("wait_recovery").progress_interval_s = 0.1
    scratch_root = f"/var/tmp/pgops-restore-progress-{os.getpid()}"  # the postgres user must reach it
    try:
        dr = run_dag(dag, {"scratch_root": scratch_root})
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)  # the teardown removed the run's directory, not the root
    assert set(task_states(dr).values()) == {"success"}, task_states(dr)
    out = capfd.readouterr()
    text = out.out + out.err
    restored = [line for line in text.splitlines() if "progress restore of main backup" in line]
    assert restored and all(" restored of ~" in line for line in restored), restored[-3:]
    replay = [line for line in text.splitlines() if "progress replay of main backup" in line]
    assert replay and any("replayed to " in line and "target " in line for line in replay), replay[-3:]


def test_an_ebs_wait_reports_the_round_and_each_snapshots_percent(lab):
    """The snapshot trigger (moto's snapshots are born completed, so the poll is driven by hand here): the round
    of the predicted total and each snapshot's percent, in the record the dashboard reads; kept across the
    trigger's serialisation (the triggerer rebuilds it from its kwargs)."""
    from pgops.airflow.triggers.ebs import EbsSnapshotCompletedTrigger

    cluster = load_inventory().get("main")
    trigger = EbsSnapshotCompletedTrigger(
        snapshot_ids=["snap-0123456789abcdef0"], aws_conn_id=cluster.aws_conn_id, region_name="us-east-1",
        progress={"cluster": "main", "run_id": "manual__chain", "what": "EBS chain round 3", "round": 3,
                  "rounds_predicted": 7})
    _path, kwargs = trigger.serialize()
    rebuilt = EbsSnapshotCompletedTrigger(**kwargs)
    rebuilt._report([{"SnapshotId": "snap-0123456789abcdef0", "State": "pending", "Progress": "42%"}])
    record = progress.read_progress(s3_client(cluster.aws_conn_id), cluster, "migration")
    assert record["run_id"] == "manual__chain" and record["state"] == "running"
    assert progress.describe(record).startswith("EBS chain round 3: round 3 of ~7, snap-0123456789abcdef0 pending 42%")


def test_describe_reads_as_a_sentence():
    line = progress.describe({"what": "restore of main", "done_bytes": 3 * 2**30, "total_bytes": 6 * 2**30,
                              "verb": "downloaded", "rate_bytes_s": 50 * 2**20, "elapsed_s": 61.4})
    assert line == ("restore of main: 3.0 GiB downloaded of ~6.0 GiB (50%), 50.0 MiB/s, 61 s elapsed")
    chain = progress.describe({"what": "EBS chain", "round": 3, "rounds_predicted": 7,
                               "volumes": {"vol-1": "snap-1 42%"}, "elapsed_s": 5})
    assert chain == "EBS chain: round 3 of ~7, vol-1 snap-1 42%, 5 s elapsed"
    assert "replayed to 0/3000060 of target 0/5000000" in progress.describe(
        {"what": "replay", "lsn": "0/3000060", "target_lsn": "0/5000000", "elapsed_s": 1})


def test_a_failing_measurement_never_fails_the_work(caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("t")

    def broken():
        raise OSError("no route to the bucket")

    with progress.ProgressTicker(kind="backup", what="w", run_id="r", measure=broken, log=log, interval_s=0.2,
                                 publish=lambda rec: (_ for _ in ()).throw(RuntimeError("denied"))) as ticker:
        import time

        time.sleep(0.7)
    assert ticker.records[-1]["state"] == "done" and len(ticker.records) >= 3
    text = caplog.text
    assert "progress not measured (no route to the bucket)" in text and "progress not published (denied)" in text
