"""The restore-verification DAG on the real lab: a real backup restored into a scratch PostgreSQL 15.

One base backup is shared by the module (full restores are the slow part); tests that break the archive
run last, in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import REPO, load_dag, task_states, without_deadlines

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_restore_verify__main"
SCRATCH_ROOT = f"/var/tmp/pgops-restore-test-{os.getpid()}"


def _conf(**params) -> dict:
    return {"scratch_root": SCRATCH_ROOT, "heapallindexed": True, **params}


def _wait_archived(lab, timeout_s: float = 60) -> str:
    """Switch WAL in its own transaction and wait until that segment is archived."""
    segment = lab.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    lab.psql("SELECT pg_switch_wal()")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (lab.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") or "") >= segment:
            return segment
        time.sleep(0.3)
    pytest.fail(f"segment {segment} was not archived within {timeout_s} s")


def _latest_report(lab) -> dict:
    st = lab.load()
    key = f"{st.prefix}/{st.server_name}/pgops/reports/restore-verify/latest.json"
    return json.loads(lab.s3_client().get_object(Bucket=st.bucket, Key=key)["Body"].read())


def _processes_using(path: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            pids.append(int(proc.name))
    return pids


def _assert_nothing_left(dr) -> None:
    from pgops.airflow.operators.restore import scratch_paths

    paths = scratch_paths(SCRATCH_ROOT, DAG_ID, dr.run_id)
    assert not os.path.exists(paths["scratch_dir"]), f"{paths['scratch_dir']} was left behind"
    assert _processes_using(paths["data_dir"]) == [], "a scratch PostgreSQL is still running"


def _ti_state(run_id: str, task_id: str) -> str | None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(TaskInstance.state).where(
            TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id))
    return str(state) if state else None


def _stop_kept(plan: dict) -> None:
    """Stop a kept scratch instance by its pid and remove its directory (what the teardown log says to do)."""
    from pgops.lab.local import PG_BIN, as_db_user, stop_pid

    pid = int((Path(plan["data_dir"]) / "postmaster.pid").read_text().split()[0])
    subprocess.run(as_db_user([str(PG_BIN / "pg_ctl"), "-D", plan["data_dir"], "-m", "fast", "-w", "stop"]),
                   capture_output=True)
    stop_pid(pid, timeout_s=10)
    shutil.rmtree(plan["scratch_dir"], ignore_errors=True)


@pytest.fixture(scope="module")
def backup(lab):
    """One base backup for the module, taken after some data exists."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    lab.psql("CREATE TABLE IF NOT EXISTS rv_data (id int PRIMARY KEY, note text); "
             "INSERT INTO rv_data SELECT g, md5(g::text) FROM generate_series(1, 20000) g ON CONFLICT DO NOTHING; "
             "CREATE INDEX IF NOT EXISTS rv_data_note ON rv_data (note);")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
        {"run_id": f"restore-verify-{os.getpid()}"})
    _wait_archived(lab)
    try:
        yield backup_id
    finally:
        shutil.rmtree(SCRATCH_ROOT, ignore_errors=True)


def test_short_disk_fails_before_downloading(lab, backup, run_dag):
    from pgops.core.params import MAX_REQUIRED_BYTES

    dr = run_dag(load_dag(DAG_ID), _conf(required_bytes=MAX_REQUIRED_BYTES))  # 1 PiB, the form's maximum
    states = task_states(dr)
    assert states["setup"] == "failed" and states["restore"] == "upstream_failed", states
    assert states["report"] == "failed", states  # the failure is reported, and the run fails
    report = _latest_report(lab)
    assert report["status"] == "failed" and report["run_id"] == dr.run_id
    message = report["body"]["errors"]["setup"]
    assert f"{MAX_REQUIRED_BYTES} bytes" in message and "bytes) free in" in message, message
    _assert_nothing_left(dr)


def test_canary_restore_is_verified_and_rto_recorded(lab, backup, run_dag):
    dr = run_dag(load_dag(DAG_ID), _conf())
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    canary = dr.get_task_instance("canary").xcom_pull(task_ids="canary")
    report = _latest_report(lab)
    assert report["kind"] == "restore-verify" and report["run_id"] == dr.run_id
    assert report["status"] in ("ok", "warning"), report
    body = report["body"]
    assert body["backup_id"] == backup and body["target"] == {"kind": "xid", "value": canary["xid"]}
    assert body["checks"]["canary"]["ok"] and str(canary["id"]) in body["checks"]["canary"]["detail"]
    assert body["checks"]["system_identifier"]["ok"] and body["checks"]["amcheck"]["ok"]
    assert {k for k in body["checks"] if k.startswith("sql:")} == {
        "sql:10_invalid_indexes", "sql:20_missing_relation_files", "sql:30_wraparound_age"}
    m = body["measurements"]
    assert m["rto_s"] > 0 and m["download_s"] > 0 and m["replay_s"] >= 0 and m["segments_replayed"] >= 1, m
    assert m["database_size_bytes"] > 1_000_000
    assert m["rto_s"] >= m["download_s"]
    # the parallel restorer set-up installed into the DB-host tools venv, not the one-stream fallback
    assert m["restorer"] == "pgops-restore" and m["restore_parts"] >= 1, m
    assert body["restore_host"]["kept"] is False
    _assert_nothing_left(dr)


def test_timestamp_target_restores_exactly_the_earlier_rows(lab, backup, run_dag):
    lab.psql("CREATE TABLE IF NOT EXISTS rv_pitr (id int PRIMARY KEY)")
    lab.psql("INSERT INTO rv_pitr VALUES (1), (2)")
    time.sleep(1.1)
    target = lab.psql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                      "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')")
    time.sleep(1.1)
    lab.psql("INSERT INTO rv_pitr VALUES (3)")
    _wait_archived(lab)

    dag = load_dag(DAG_ID)
    dag.get_task("wait_recovery").wait_before_defer_s = 0  # the deferred path: the trigger sees recovery end
    dr = run_dag(dag, _conf(target=target, keep=True, checks=["system_identifier", "sql"]))
    plan = dr.get_task_instance("setup").xcom_pull(task_ids="setup")
    try:
        states = task_states(dr)
        assert set(states.values()) == {"success", "skipped"} and states["canary"] == "skipped", states
        from pgops.airflow.hooks import pg_connect_local

        conn = pg_connect_local(host=plan["socket_dir"], port=plan["port"], user="postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT array_agg(id ORDER BY id) FROM rv_pitr")
                assert cur.fetchone()[0] == [1, 2]
                cur.execute("SELECT pg_is_in_recovery(), current_setting('archive_mode'), "
                            "current_setting('listen_addresses')")
                assert cur.fetchone() == (False, "off", "127.0.0.1")
        finally:
            conn.close()
        assert _latest_report(lab)["body"]["restore_host"]["kept"] is True
    finally:
        _stop_kept(plan)
    _assert_nothing_left(dr)


def test_setup_failing_part_way_is_torn_down(lab, backup, run_dag, monkeypatch):
    """Setup fails after it made the scratch area: Airflow would skip a teardown whose setup failed; ours runs."""
    from pgops.airflow.operators.restore import scratch_paths
    from pgops.dbhost.host import DbHost

    seen: list[str] = []

    def no_port(self) -> int:
        seen.extend(str(p) for p in Path(SCRATCH_ROOT).iterdir())
        raise OSError("no free TCP port on the restore host")

    monkeypatch.setattr(DbHost, "free_port", no_port)
    dr = run_dag(load_dag(DAG_ID), _conf())
    states = task_states(dr)
    assert states["setup"] == "failed" and states["restore"] == "upstream_failed", states
    assert states["teardown"] == "success", states
    assert scratch_paths(SCRATCH_ROOT, DAG_ID, dr.run_id)["scratch_dir"] in seen, seen  # it got that far
    report = _latest_report(lab)
    assert report["run_id"] == dr.run_id and "no free TCP port" in report["body"]["errors"]["setup"], report
    _assert_nothing_left(dr)


# A try of the whole DAG in its own process, so the test can SIGKILL it like a worker dying mid-task. The
# restore task asks the scratch instance to pause at the target instead of promoting: recovery never ends by
# itself and the wait step stays in flight until the kill.
_KILLED_TRY = """
import json, sys
from datetime import datetime

from airflow.dag_processing.dagbag import DagBag

dag_folder, dag_id, when, conf = sys.argv[1:5]
bag = DagBag(dag_folder=dag_folder)
assert not bag.import_errors, bag.import_errors
dag = bag.dags[dag_id]
for task in dag.tasks:
    task.retries = 0
dag.get_task("restore").extra_settings = {"recovery_target_action": "pause"}
dag.deadline = None  # dag.test() of Airflow 3.3.2 cannot finish a DAG with Deadline Alerts (conftest.without_deadlines)
when = datetime.fromisoformat(when)
dag.test(run_after=when, logical_date=when, run_conf=json.loads(conf))
"""


def test_replay_killed_then_run_cleared_leaves_nothing(lab, backup, airflow_db, db_tmp_path):
    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunType

    from pgops.airflow.operators.restore import scratch_paths
    from pgops.dbhost.procs import pid_alive

    when = datetime.now(UTC).replace(microsecond=0)
    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=when, run_after=when)
    paths = scratch_paths(SCRATCH_ROOT, DAG_ID, run_id)
    conf = _conf(recovery_timeout_s=900)
    out = db_tmp_path / "first-try.log"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_TRY, str(REPO / "dags"), DAG_ID, when.isoformat(),
                                 json.dumps(conf)], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the first try ended by itself (rc {proc.returncode}): " \
                                        f"{out.read_text(errors='replace')[-3000:]}"
            paused = "pausing at the end of recovery" in (Path(paths["log_file"]).read_text(errors="replace")
                                                           if os.path.exists(paths["log_file"]) else "")
            if paused and _ti_state(run_id, "restore") == "success" and \
                    _ti_state(run_id, "wait_recovery") in ("queued", "running", "deferred"):
                break
            assert time.monotonic() < deadline, f"the first try did not reach the wait step: " \
                                                f"{out.read_text(errors='replace')[-3000:]}"
            time.sleep(0.5)
        postmaster = int((Path(paths["data_dir"]) / "postmaster.pid").read_text().split()[0])
        time.sleep(3)  # a few polls of the wait step against an instance that stays in recovery
        proc.send_signal(signal.SIGKILL)  # the worker dies with the replay wait in flight: no teardown
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # What the crash leaves: the scratch PostgreSQL still up in recovery, its directory in place.
        assert pid_alive(postmaster) and os.path.isdir(paths["data_dir"])

        # Clear the run: the same run id from its first task. Setup finds the scratch area by the run and
        # must stop and remove what the killed try left before restoring again.
        dag = load_dag(DAG_ID)
        for task in dag.tasks:
            task.retries = 0
        without_deadlines(dag)
        dr = dag.test(run_after=when, logical_date=when, run_conf=conf)
        assert dr.run_id == run_id
        states = task_states(dr)
        assert set(states.values()) == {"success"}, states
        assert not pid_alive(postmaster), f"the killed try's postmaster {postmaster} is still running"
        assert _latest_report(lab)["run_id"] == run_id
        _assert_nothing_left(dr)
    finally:  # a failed assertion must not leave the try or its instance behind
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if (Path(paths["data_dir"]) / "postmaster.pid").exists():
            _stop_kept(paths)
        shutil.rmtree(paths["scratch_dir"], ignore_errors=True)


def test_missing_wal_segment_is_named_and_everything_is_cleaned_up(lab, backup, run_dag):
    lab.psql("INSERT INTO rv_data SELECT g, 'late' FROM generate_series(20001, 21000) g ON CONFLICT DO NOTHING")
    segment = _wait_archived(lab)
    st = lab.load()
    s3 = lab.s3_client()
    prefix = f"{st.prefix}/{st.server_name}/wals/{segment[:16]}/{segment}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=st.bucket, Prefix=prefix).get("Contents", [])]
    assert keys, f"segment {segment} is not in the bucket"
    saved = {key: s3.get_object(Bucket=st.bucket, Key=key)["Body"].read() for key in keys}
    for key in keys:
        s3.delete_object(Bucket=st.bucket, Key=key)
    try:
        dr = run_dag(load_dag(DAG_ID), _conf())
    finally:  # the lab is shared: later tests need an archive without holes
        for key, body in saved.items():
            s3.put_object(Bucket=st.bucket, Key=key, Body=body)
    states = task_states(dr)
    assert states["wait_recovery"] == "failed" and states["checks"] == "upstream_failed", states
    assert states["teardown"] == "success", states
    report = _latest_report(lab)
    assert report["status"] == "failed"
    message = report["body"]["errors"]["wait_recovery"]
    assert f"WAL segment {segment} is missing" in message, message
    assert "recovery ended before configured recovery target was reached" in message, message
    _assert_nothing_left(dr)


def test_corrupted_base_backup_fails_clearly(lab, backup, run_dag):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    broken = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
        {"run_id": f"restore-verify-corrupt-{os.getpid()}"})
    st = lab.load()
    s3 = lab.s3_client()
    base = f"{st.prefix}/{st.server_name}/base/{broken}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=st.bucket, Prefix=base).get("Contents", [])]
    data_key = next(k for k in keys if "/data.tar" in k)  # data.tar.<compression>
    s3.put_object(Bucket=st.bucket, Key=data_key, Body=os.urandom(64 * 1024))
    try:
        dr = run_dag(load_dag(DAG_ID), _conf(backup_id=broken, target="latest"))
        states = task_states(dr)
        assert states["restore"] == "failed" and states["teardown"] == "success", states
        message = _latest_report(lab)["body"]["errors"]["restore"]
        # the parallel restorer names the backup and the part it could not read
        assert f"pgops-restore of backup {broken}" in message and "failed" in message, message
        assert f"{broken}/data.tar" in message and "corrupt compressed data" in message, message
        _assert_nothing_left(dr)
    finally:
        for key in keys:  # leave the catalog with usable backups only
            s3.delete_object(Bucket=st.bucket, Key=key)
