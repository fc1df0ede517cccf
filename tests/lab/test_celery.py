"""A real distributed run: the CeleryExecutor on loopback, with the processes docker-compose.yaml starts.

Redis (Debian's redis-server, with a password) is the broker; the lab's PostgreSQL holds the Airflow metadata DB
and, in a database of its own, Celery's results. api-server, scheduler, dag-processor, a triggerer and a Celery
worker for the queue "default", and a worker and a triggerer for the DB host's queue dbhost_main, each a process
of its own (pgops.lab.airflow_stack.celery_commands). Each worker stands for a host of its own (default-host,
dbhost_main-host): the REST API's task instances say where every task ran.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from pgops.inventory import load_inventory
from pgops.lab.airflow_stack import CeleryStack, StackError, descendants
from pgops.lab.local import pid_alive

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BACKUP, RESTORE = "pgops_base_backup__main", "pgops_restore_verify__main"
QUEUE = "dbhost_main"
DBHOST_WORKER = f"dbhost-worker:{QUEUE}"
SCRATCH_ROOT = f"/var/tmp/pgops-restore-celery-{os.getpid()}"


@pytest.fixture(scope="module")
def celery(lab, tmp_path_factory):
    st = lab.load()
    name = f"airflow_celery_{os.getpid()}"
    password = secrets.token_urlsafe(18)
    # SQL on psql's stdin (lab.psql): the password never reaches an argv
    lab.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    lab.psql(f"CREATE DATABASE {name} OWNER {name}")
    lab.psql(f"CREATE DATABASE {name}_results OWNER {name}")
    stack = CeleryStack(
        tmp_path_factory.mktemp("celery") / "airflow",
        extra_env={**lab.env(), "PGOPS_RESTORE_SCRATCH_ROOT": SCRATCH_ROOT,
                   # a worker that vanished is noticed in seconds, not the default 5 minutes
                   "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                   "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5"},
        sql_alchemy_conn=f"postgresql+psycopg2://{name}:{password}@127.0.0.1:{st.pg_port}/{name}",
        result_backend=f"db+postgresql://{name}:{password}@127.0.0.1:{st.pg_port}/{name}_results",
        dbhost_queues=[QUEUE], worker_concurrency=1)
    try:
        stack.up(timeout_s=240)
        stack.ensure_pools({"pgops_main": 1})
        stack.wait_for_dag(BACKUP)
        stack.wait_for_dag(RESTORE)
        yield stack
    finally:
        pids = dict((stack.load() or {}).get("pids", {}))
        stack.down()
        assert not any(pid_alive(p) for p in pids.values()), pids
        lab.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        lab.psql(f"DROP DATABASE IF EXISTS {name}_results WITH (FORCE)")
        lab.psql(f"DROP ROLE IF EXISTS {name}")
        shutil.rmtree(SCRATCH_ROOT, ignore_errors=True)


def task_instances(stack, dag_id: str, run_id: str) -> dict[str, dict]:
    tis = stack._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {ti["task_id"]: ti for ti in tis}


def declared_queues(dag_id: str) -> dict[str, str]:
    """task -> queue, from the DAG factories themselves (what the inventory routes where)."""
    from pgops.airflow.dags.base_backup import build_base_backup_dag
    from pgops.airflow.dags.restore_verify import build_restore_verify_dag

    cluster = load_inventory().get("main")
    dag = (build_base_backup_dag if dag_id == BACKUP else build_restore_verify_dag)(cluster)
    return {t.task_id: t.queue for t in dag.tasks}


def catalog(lab) -> dict[str, dict]:
    """barman's catalog in the bucket: backup id -> {"info": backup.info fields or None, "keys": [object keys]}."""
    st = lab.load()
    s3 = lab.s3_client()
    base = f"{st.prefix}/{st.server_name}/base/"
    out: dict[str, dict] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=st.bucket, Prefix=base):
        for obj in page.get("Contents", []):
            bid, _, rest = obj["Key"][len(base):].partition("/")
            out.setdefault(bid, {"info": None, "keys": []})["keys"].append(rest)
    for bid, entry in out.items():
        if "backup.info" in entry["keys"]:
            text = s3.get_object(Bucket=st.bucket, Key=f"{base}{bid}/backup.info")["Body"].read().decode()
            entry["info"] = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return out


def assert_complete_in_bucket(entry: dict, backup_id: str) -> None:
    assert entry["info"] is not None, f"{backup_id}: no backup.info in the bucket"
    assert entry["info"]["status"] == "DONE", entry["info"]
    assert any(k.startswith("data") and ".tar" in k for k in entry["keys"]), entry["keys"]


def test_backup_then_restore_verify_each_task_on_its_queue_s_worker(celery, lab):
    stack = celery
    before_backup, before_restore = stack.run_ids(BACKUP), stack.run_ids(RESTORE)
    stack.unpause(RESTORE)  # the backup's asset event starts the restore verification, as in production
    stack.unpause(BACKUP)  # catchup=False: the scheduler creates the latest missed nightly run
    try:
        backup_run = stack.wait_for_new_run(BACKUP, after=before_backup, timeout_s=60)
    except StackError:
        backup_run = stack.trigger(BACKUP)
    assert stack.wait_for_run(BACKUP, backup_run, timeout_s=600) == "success", task_instances(stack, BACKUP, backup_run)
    restore_run = stack.wait_for_new_run(RESTORE, after=before_restore, run_type="asset_triggered", timeout_s=120)
    assert stack.wait_for_run(RESTORE, restore_run, timeout_s=900) == "success", \
        task_instances(stack, RESTORE, restore_run)
    stack._request("PATCH", f"/api/v2/dags/{RESTORE}", {"is_paused": True})  # later backups start no restore

    hosts = {"default": "default-host", QUEUE: f"{QUEUE}-host"}
    ran_on: dict[str, set[str]] = {}
    for dag_id, run_id in ((BACKUP, backup_run), (RESTORE, restore_run)):
        declared = declared_queues(dag_id)
        tis = task_instances(stack, dag_id, run_id)
        assert set(tis) == set(declared), (dag_id, sorted(tis))
        for task_id, ti in tis.items():
            assert ti["state"] == "success", (dag_id, task_id, ti["state"])
            assert ti["queue"] == declared[task_id], (dag_id, task_id, ti["queue"])
            assert ti["hostname"] == hosts[declared[task_id]], (dag_id, task_id, ti["queue"], ti["hostname"])
            ran_on.setdefault(ti["hostname"], set()).add(f"{dag_id}.{task_id}")
    # both hosts did work: barman-cloud and the scratch instance on the DB host, the rest on the default worker
    assert {f"{BACKUP}.backup", f"{BACKUP}.verify", f"{RESTORE}.restore", f"{RESTORE}.checks"} <= ran_on[f"{QUEUE}-host"]
    assert {f"{BACKUP}.preflight", f"{RESTORE}.canary", f"{RESTORE}.report"} <= ran_on["default-host"]
    # the deferred tasks' triggers ran on the DB host's triggerer (it serves that queue only): each trigger writes
    # `<attempt>.log.trigger.<triggerer job id>.log`, and the REST API names the host of that job
    jobs = {j["id"]: j for j in stack._request("GET", "/api/v2/jobs?job_type=TriggererJob&limit=100")["jobs"]}
    assert sorted(j["hostname"] for j in jobs.values()) == sorted(["default-host", f"{QUEUE}-host"]), jobs
    logs = Path(stack.home) / "logs"
    deferred = []  # a task defers only while it must wait (the WAL not archived yet, recovery not ended)
    for dag_id, run_id, task_id in ((BACKUP, backup_run, "verify"), (RESTORE, restore_run, "wait_recovery")):
        for path in (logs / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}").glob(
                "attempt=*.log.trigger.*.log"):
            assert jobs[int(path.name.split(".")[-2])]["hostname"] == f"{QUEUE}-host", (dag_id, task_id, path.name)
            deferred.append(f"{dag_id}.{task_id}")
    assert deferred, "no DB-host task deferred: nothing proves where triggers run"

    summary = stack.xcom(BACKUP, backup_run, "verify")
    assert summary["status"] == "DONE"
    assert_complete_in_bucket(catalog(lab)[summary["backup_id"]], summary["backup_id"])


def _barman_backup_pids(root: int) -> list[int]:
    out = []
    for pid in descendants(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith((b"barman-cloud-backup", b"pgops-backup")) for a in argv):
            out.append(pid)
    return out


@pytest.fixture
def bulk_data(lab):
    """~100 MiB of incompressible rows, so a base backup takes long enough to be killed half-way."""
    db = f"celery_kill_{os.getpid()}"
    lab.psql(f"CREATE DATABASE {db}")
    lab.psql("CREATE TABLE filler AS SELECT g, decode(repeat(md5(random()::text), 1) || md5(random()::text) || "
             "md5(random()::text) || md5(random()::text), 'hex') || decode(md5(g::text), 'hex') AS b "
             "FROM generate_series(1, 1200000) g", db=db)
    yield db
    lab.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_dbhost_worker_killed_during_the_backup(celery, lab, bulk_data):
    """kill -9 of the DB host's worker and everything under it (barman-cloud-backup included) while the backup
    uploads: Airflow fails the try (up_for_retry), pgops reports no backup, the bucket holds no DONE backup for it;
    a rerun on the restarted worker succeeds and what pgops reports is complete in the bucket."""
    stack = celery
    before = catalog(lab)
    tmp_before = set(Path("/tmp").glob("barman-cloud-backup-*"))
    events_before = {e["id"] for e in stack._request("GET", "/api/v2/assets/events?limit=100")["asset_events"]}
    run_id = stack.trigger(BACKUP)
    worker = stack.load()["pids"][DBHOST_WORKER]
    deadline, barman = time.monotonic() + 300, []
    while time.monotonic() < deadline and not barman:
        state = task_instances(stack, BACKUP, run_id).get("backup", {}).get("state")
        assert state in (None, "scheduled", "queued", "running"), f"backup is {state} before it could be killed"
        barman = _barman_backup_pids(worker)
        time.sleep(0.5)
    assert barman, "barman-cloud-backup never started under the DB host's worker"
    time.sleep(2)  # half-way through the upload
    killed = stack.kill_host(DBHOST_WORKER)
    assert set(barman) <= set(killed) and not any(pid_alive(p) for p in killed)

    # Airflow notices the lost heartbeat and fails the try; with retries left the task waits for its retry
    deadline, seen = time.monotonic() + 180, []
    while time.monotonic() < deadline:
        ti = task_instances(stack, BACKUP, run_id)["backup"]
        seen.append(ti["state"])
        if ti["state"] in ("up_for_retry", "failed"):
            break
        time.sleep(2)
    assert ti["state"] in ("up_for_retry", "failed"), seen
    assert ti["try_number"] == 1 and ti["hostname"] == f"{QUEUE}-host"
    tis = task_instances(stack, BACKUP, run_id)
    assert tis["verify"]["state"] in (None, "upstream_failed"), tis["verify"]
    with pytest.raises(StackError, match="404"):
        stack.xcom(BACKUP, run_id, "backup")  # the killed try handed no backup id on
    events = stack._request("GET", "/api/v2/assets/events?limit=100")["asset_events"]
    assert not [e for e in events if e["id"] not in events_before], "a backup event without a verified backup"
    after_kill = catalog(lab)
    half = {bid: e for bid, e in after_kill.items() if bid not in before}
    for bid, entry in half.items():  # what barman left behind is not a DONE backup
        assert entry["info"] is None or entry["info"].get("status") != "DONE", (bid, entry["info"])

    # a rerun on the restarted worker succeeds
    stack.restart(DBHOST_WORKER)
    stack._request("POST", f"/api/v2/dags/{BACKUP}/clearTaskInstances", {
        "dag_run_id": run_id, "task_ids": ["backup"], "include_downstream": True, "only_failed": False,
        "reset_dag_runs": True, "dry_run": False})
    assert stack.wait_for_run(BACKUP, run_id, timeout_s=600) == "success", task_instances(stack, BACKUP, run_id)
    tis = task_instances(stack, BACKUP, run_id)
    assert tis["backup"]["try_number"] == 2 and tis["backup"]["hostname"] == f"{QUEUE}-host"
    summary = stack.xcom(BACKUP, run_id, "verify")
    assert summary["status"] == "DONE" and summary["backup_id"] not in half
    final = catalog(lab)
    assert_complete_in_bucket(final[summary["backup_id"]], summary["backup_id"])
    # every backup pgops reported (asset events, verify) is complete in the bucket
    for e in stack._request("GET", "/api/v2/assets/events?limit=100")["asset_events"]:
        bid = (e.get("extra") or {}).get("backup_id")
        if bid and e["id"] not in events_before:
            assert_complete_in_bucket(final[bid], bid)
    print(json.dumps({"killed": killed, "states_after_kill": seen[-3:], "left_behind": {
        b: (e["info"] or {}).get("status") for b, e in half.items()}}))
    # the killed barman could not remove its temporary directory (the rerun removed its own): the test does
    left_tmp = set(Path("/tmp").glob("barman-cloud-backup-*")) - tmp_before
    assert len(left_tmp) <= 1, sorted(left_tmp)
    for path in left_tmp:
        shutil.rmtree(path)
