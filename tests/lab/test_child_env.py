"""PostgreSQL servers that pgops starts do not inherit the worker's environment: a scratch restore started by a
worker whose environment holds Airflow's secrets has none of them in /proc/<postmaster>/environ (any superuser
could read them there with pg_read_file), only PATH, the locale, HOME and the AWS credentials its
restore_command needs."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_restore_verify__main"


def test_scratch_postmaster_environment_has_no_worker_secrets(lab, run_dag, monkeypatch):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator
    from pgops.airflow.operators.restore import stop_and_remove
    from pgops.dbhost.host import DbHost
    from pgops.inventory import load_inventory

    secrets = {"AIRFLOW__CORE__FERNET_KEY": "fernet-secret-7f3a", "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-91c2",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:db-secret-5d1e@db/airflow",
               "AIRFLOW_CONN_SOMETHING_ELSE": "postgres://u:conn-secret-0b7d@h/db", "PGOPS_UNRELATED": "pgops-unrelated-4e2f"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute(
        {"run_id": f"child-env-{os.getpid()}"})
    root = f"/var/tmp/pgops-child-env-{os.getpid()}"
    dr = run_dag(load_dag(DAG_ID), {"scratch_root": root, "backup_id": backup_id, "keep": True,
                                    "heapallindexed": False, "checks": ["canary", "system_identifier"]})
    plan = dr.get_task_instance("setup").xcom_pull(task_ids="setup")
    host = DbHost.for_node(load_inventory().get("main"))
    try:
        assert set(task_states(dr).values()) == {"success"}, task_states(dr)
        pid = dr.get_task_instance("restore").xcom_pull(task_ids="restore")["pid"]
        assert host.postmaster(plan["data_dir"]).pid == pid
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(item.split("=", 1) for item in fh.read().decode().split("\0") if "=" in item)
        assert not [k for k in env if k.startswith(("AIRFLOW", "PGOPS"))], sorted(env)
        text = "\0".join(f"{k}={v}" for k, v in env.items())
        assert not [v for v in secrets.values() if v in text]
        assert env["PATH"].startswith("/usr/local/sbin") and env.get("AWS_ACCESS_KEY_ID")  # what restore_command needs
        assert set(env) <= {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "PGDATA",
                            "PG_GRANDPARENT_PID", "PGSYSCONFDIR", "PGLOCALEDIR", "PWD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                            "AWS_DEFAULT_REGION", "MAIL", "TERM", "XDG_SESSION_ID", "XDG_RUNTIME_DIR"} | {
                               k for k in env if k.startswith("LC_")}, sorted(env)
    finally:
        stop_and_remove(host, plan)
        shutil.rmtree(root, ignore_errors=True)
    assert not os.path.exists(plan["scratch_dir"])
