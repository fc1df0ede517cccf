"""Replication health and the standby rebuild on the real lab: a primary (pg1) and a streaming standby (pg2) with
repmgr, their own cluster prefix in the lab bucket, one base backup; tests run in file order (the failover last).
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from helpers import load_dag, task_states

from pgops.airflow.replication import check_cluster
from pgops.core import findings as F
from pgops.core import replication as R

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_standby_rebuild__repl"


def _check(pair, **thresholds):
    cluster = pair.cluster()
    if thresholds:
        cluster = dataclasses.replace(cluster, replication=dataclasses.replace(cluster.replication, **thresholds))
    body, found = check_cluster(cluster, base_url="http://airflow.test")
    return body, {f.id: f for f in found if f.severity != F.OK}, found


def _wait_for(what: str, fn, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout_s} s")


def _streaming(pair, primary, standby) -> bool:
    return pair.rl.psql(primary, "SELECT count(*) FROM pg_stat_replication WHERE application_name = "
                                 f"'{standby.name}' AND state = 'streaming'") == "1"


# In the worker's environment during the rebuild; none may reach the standby's postmaster (a superuser reads its
# environment with pg_read_file('/proc/self/environ')).
WORKER_SECRETS = {"AIRFLOW__CORE__FERNET_KEY": "fernet-secret-2c8e", "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-6a1f",
                  "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:db-secret-93b0@db/airflow",
                  "AIRFLOW_CONN_SOMETHING_ELSE": "postgres://u:conn-secret-47d5@h/db",
                  "PGOPS_UNRELATED": "pgops-unrelated-0e9c"}
# What a postmaster pgops starts may hold: PATH, the locale, the user's HOME and login names, what PostgreSQL sets
# itself, and the AWS credentials its restore_command needs.
POSTMASTER_ENV = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "PGDATA", "PG_GRANDPARENT_PID",
                  "PGSYSCONFDIR", "PGLOCALEDIR", "PWD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE", "MAIL", "TERM", "XDG_SESSION_ID", "XDG_RUNTIME_DIR"}


def _assert_no_worker_secrets(pid: int, aws_env: dict[str, str]) -> None:
    """/proc/<postmaster>/environ (read as root) holds no AIRFLOW*/PGOPS* variable, none of the worker's secrets, and
    of AWS exactly the engine connection's credentials (``aws_env``)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(item.split("=", 1) for item in fh.read().decode().split("\0") if "=" in item)
    assert not [k for k in env if k.startswith(("AIRFLOW", "PGOPS"))], sorted(env)
    text = "\0".join(f"{k}={v}" for k, v in env.items())
    assert not [v for v in WORKER_SECRETS.values() if v in text]
    assert env.get("PATH") and env.get("AWS_ACCESS_KEY_ID")  # what restore_command needs is there
    assert {k: v for k, v in env.items() if k.startswith("AWS_")} == aws_env
    assert set(env) <= POSTMASTER_ENV | {k for k in env if k.startswith("LC_")}, sorted(env)


@pytest.fixture(scope="module")
def backup(replicated_pair):
    """Some data on pg1, one base backup of it, its WAL archived."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    rl, pg1 = replicated_pair.rl, replicated_pair.primary
    rl.psql(pg1, "CREATE TABLE repl_data (id int PRIMARY KEY, note text); "
                 "INSERT INTO repl_data SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="repl").execute(
        {"run_id": f"replication-{os.getpid()}"})
    return backup_id


def test_healthy_pair_has_no_findings(replicated_pair):
    pair = replicated_pair
    _wait_for("pg2 streams from pg1", lambda: _streaming(pair, pair.primary, pair.standby))
    body, problems, found = _check(pair)
    assert problems == {}, problems
    assert [f.id for f in found] == [R.REPLICATION_OK]
    assert body["current_primary"] == "pg1" and body["nodes"]["pg2"]["role"] == "standby"
    assert body["repmgr_nodes"][1]["type"] == "standby"

    from pgops.airflow import audit

    report = audit.audit_cluster(pair.cluster(), run_id="replication-test")
    assert report["body"]["replication"]["current_primary"] == "pg1"
    ids = [f["id"] for f in report["body"]["findings"]]
    assert R.REPLICATION_OK in ids
    assert not [f for f in report["body"]["findings"] if f["id"].startswith(("REPLICATION_", "REPMGR_"))
                and f["severity"] != F.OK]


def test_stopped_standby_shows_lag_and_inactive_slot_then_critical(replicated_pair):
    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    rl.stop(pg2)
    try:
        # ~12 MB of WAL the slot has to keep for the stopped standby
        rl.psql(pg1, "CREATE TABLE IF NOT EXISTS wal_filler (id int, pad text); "
                     "INSERT INTO wal_filler SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g")
        _, problems, _ = _check(pair)
        assert R.REPLICATION_NOT_STREAMING in problems and R.REPLICATION_SLOT_INACTIVE in problems, problems
        assert R.REPLICATION_NODE_UNREACHABLE in problems
        lag = problems[R.REPLICATION_NOT_STREAMING]
        assert lag.severity == F.CRITICAL and lag.evidence["lag_bytes"] > 10_000_000, lag
        slot = problems[R.REPLICATION_SLOT_INACTIVE]
        retained = slot.evidence["retained_bytes"]
        assert slot.severity == F.WARNING and retained > 10_000_000 and slot.evidence["slot"] == "pg2"
        assert f"retains {retained} bytes" in slot.message

        _, problems, _ = _check(pair, slot_warning_bytes=1024 * 1024, slot_critical_bytes=retained - 1)
        assert problems[R.REPLICATION_SLOT_INACTIVE].severity == F.CRITICAL
    finally:
        rl.start(pg2)
    _wait_for("pg2 streams again", lambda: _streaming(pair, pg1, pg2))
    _, problems, _ = _check(pair)
    assert problems == {}, problems


def test_failover_is_found_and_the_old_primary_is_rebuilt_from_the_backup(replicated_pair, backup, run_dag,
                                                                          monkeypatch):
    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    rl.psql(pg1, "INSERT INTO repl_data SELECT g, 'before failover' FROM generate_series(20001, 21000) g")
    _wait_for("pg2 replays the last rows", lambda: rl.psql(pg2, "SELECT count(*) FROM repl_data") == "21000")
    rl.promote(pg2)  # the failover; pg1 stays up as the old primary that came back
    rl.psql(pg2, "INSERT INTO repl_data SELECT g, 'after failover' FROM generate_series(21001, 22000) g")

    body, problems, _ = _check(pair)
    assert body["current_primary"] == "pg2" and body["primary_timeline"] == 2
    mismatch = problems[R.REPLICATION_TIMELINE_MISMATCH]
    assert mismatch.severity == F.CRITICAL and mismatch.evidence["node"] == "pg1"
    assert mismatch.evidence["timeline"] == 1 and mismatch.evidence["primary_timeline"] == 2
    url = mismatch.evidence["rebuild"]["url"]
    assert url.startswith(f"http://airflow.test/dags/{DAG_ID}/trigger?conf=") and "pg1" in url
    assert '"target": "pg1"' in mismatch.evidence["rebuild"]["conf"]
    assert R.REPLICATION_MULTIPLE_PRIMARIES in problems and R.REPLICATION_PRIMARY_MOVED in problems
    assert problems[R.REPMGR_ROLE_MISMATCH].evidence["node"] == "pg2"  # repmgr still calls pg2 a standby

    # The current primary is refused as a target, loudly, and left alone.
    dr = run_dag(load_dag(DAG_ID), {"target": "pg2", "force": True, "socket_dir": pg2.socket_dir})
    states = task_states(dr)
    assert states["preflight"] == "failed" and states["restore"] == "upstream_failed", states
    error = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight", key="error")
    assert error.startswith("REFUSED: pg2 is the current primary"), error
    assert rl.psql(pg2, "SELECT pg_is_in_recovery()") == "f"

    # The old primary came back writable: a rebuild never stops it, force or not (a person fences it first).
    dr = run_dag(load_dag(DAG_ID), {"target": "pg1", "force": True, "socket_dir": pg1.socket_dir})
    assert task_states(dr)["preflight"] == "failed"
    error = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight", key="error")
    assert error.startswith("REFUSED: pg1 answers as a primary too") and "fence it" in error, error
    assert rl.psql(pg1, "SELECT pg_is_in_recovery()") == "f"
    rl.stop(pg1)  # fenced

    # Without force the old primary's contents are not replaced, and the error says why.
    dr = run_dag(load_dag(DAG_ID), {"target": "pg1", "socket_dir": pg1.socket_dir})
    error = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight", key="error")
    assert "is not empty (it was a primary" in error and "force=true" in error, error

    # Rebuild the old primary in its own data directory as a standby of pg2 from the backup (timeline 1 → 2), from
    # a worker whose environment holds Airflow's secrets: the standby it starts must not inherit them.
    for key, value in WORKER_SECRETS.items():
        monkeypatch.setenv(key, value)
    dr = run_dag(load_dag(DAG_ID), {"target": "pg1", "force": True, "socket_dir": pg1.socket_dir,
                                    "skip_approval": True})
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    ready = dr.get_task_instance("wait_streaming").xcom_pull(task_ids="wait_streaming")
    assert ready["time_to_ready_s"] > 0 and ready["timeline"] == 2, ready
    plan = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")
    assert plan["backup_id"] == backup and plan["primary"] == "pg2" and plan["slot_exists"] is False
    assert dr.get_task_instance("restore").xcom_pull(task_ids="restore")["slot_created"] is True  # after approval
    rl.refresh(pg1)
    try:
        assert dr.get_task_instance("restore").xcom_pull(task_ids="restore")["pid"] == pg1.pid
        from pgops.airflow.hooks import aws_child_env

        _assert_no_worker_secrets(pg1.pid, aws_child_env(pair.cluster().engine_aws_conn_id))
        assert rl.psql(pg1, "SELECT pg_is_in_recovery()") == "t"
        _wait_for("pg1 streams from pg2", lambda: _streaming(pair, pg2, pg1))
        nodes = {n["node_name"]: n for n in rl.repmgr_nodes(pg2)}
        assert nodes["pg1"]["type"] == "standby" and nodes["pg1"]["active"] and nodes["pg1"]["upstream_node_id"] == 2
        target = rl.psql(pg2, "SELECT pg_current_wal_lsn()")
        _wait_for("pg1 replays up to pg2", lambda: rl.psql(
            pg1, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") == "t")
        check = "SELECT count(*) || ':' || md5(string_agg(id || note, ',' ORDER BY id)) FROM repl_data"
        assert rl.psql(pg1, check) == rl.psql(pg2, check)
        assert rl.psql(pg1, "SELECT count(*) FROM repl_data") == "22000"

        body, problems, _ = _check(pair)
        assert body["nodes"]["pg1"]["role"] == "standby" and body["nodes"]["pg1"]["timeline"] == 2
        assert not {R.REPLICATION_TIMELINE_MISMATCH, R.REPLICATION_NOT_STREAMING, R.REPLICATION_MULTIPLE_PRIMARIES,
                    R.REPLICATION_SLOT_INACTIVE} & set(problems), problems
        assert R.REPLICATION_PRIMARY_MOVED in problems  # the inventory still names pg1: a human updates it
    finally:
        rl.stop(pg1)
