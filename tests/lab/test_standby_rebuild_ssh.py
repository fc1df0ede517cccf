"""The standby rebuild through the ssh runner, into a data directory the worker cannot see: the node's own runner
(an ssh connection in the inventory) reaches a host whose data directory lives on a tmpfs that exists only in
sshd's mount namespace (0700, owned by postgres). Preflight, restore, the streaming wait and the report pass, so
no step read the worker's files or process table on the host's behalf.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import load_dag, task_states
from sshd_lab import start_sshd

pytestmark = [pytest.mark.lab, pytest.mark.airflow,
              pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="openssh-server is not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="sshd must start as root to log in as postgres"),
              pytest.mark.skipif(not shutil.which("unshare"), reason="util-linux unshare is missing")]

DAG_ID = "pgops_standby_rebuild__repl"
CONN_ID = "pgops_repl_pg2_ssh"


def test_rebuild_over_ssh_into_a_directory_only_the_host_sees(replicated_pair, run_dag, tmp_path, monkeypatch):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator
    from pgops.dbhost.host import DbHost

    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    rl.psql(pg1, "CREATE TABLE ssh_rebuild (id int PRIMARY KEY); "
                 "INSERT INTO ssh_rebuild SELECT g FROM generate_series(1, 5000) g")
    BarmanCloudBackupOperator(task_id="backup", cluster_name="repl").execute({"run_id": f"ssh-rebuild-{os.getpid()}"})
    root = Path(f"/var/tmp/pgops-private-rebuild-{os.getpid()}")
    with start_sshd(private_root=root) as server:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", server.conn())
        data = yaml.safe_load(pair.inventory.read_text())
        cluster = data["clusters"][0]
        cluster["replication"]["repmgr"] = False  # repmgr.conf on this host names the old directory
        node = cluster["replication"]["standbys"][0]
        node.update(data_directory=f"{root}/pg2/data", runner={"kind": "ssh", "ssh_conn_id": CONN_ID})
        inv = tmp_path / "clusters.yaml"
        inv.write_text(yaml.safe_dump(data))
        monkeypatch.setenv("PGOPS_INVENTORY", str(inv))
        from pgops.inventory import load_inventory

        repl = load_inventory().get("repl").replication
        host = DbHost.for_node(load_inventory().get("repl"), repl.node("pg2"))
        assert host.where == f"ssh connection {CONN_ID!r}"
        rl.stop(pg2)  # the old standby goes; its slot is free for the rebuilt one
        rebuilt = f"{root}/pg2/data"
        try:
            dr = run_dag(load_dag(DAG_ID), {"target": "pg2", "socket_dir": f"{root}/pg2/run", "skip_approval": True})
            states = task_states(dr)
            assert states == {"preflight": "success", "approve_rebuild": "success", "restore": "success",
                              "wait_streaming": "success", "register": "skipped", "report": "success"}, states
            plan = dr.get_task_instance("preflight").xcom_pull(task_ids="preflight")
            assert plan["host"] == host.where and plan["data_realpath"] == rebuilt and plan["slot"] == "pg2"
            ready = dr.get_task_instance("wait_streaming").xcom_pull(task_ids="wait_streaming")
            assert ready["lag_bytes"] <= 16 * 1024 * 1024 and ready["time_to_ready_s"] > 0, ready
            # the rebuilt standby exists only on the host: the worker sees an empty tmpfs mount point
            assert not Path(rebuilt).exists() and host.postmaster(rebuilt).running
            assert host.query("SELECT pg_is_in_recovery()", socket_dir=f"{root}/pg2/run", port=pg2.port,
                              user="postgres") == [["t"]]
            assert rl.psql(pg1, "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg2' "
                                "AND state = 'streaming'") == "1"
            rl.psql(pg1, "INSERT INTO ssh_rebuild VALUES (5001)")
            lsn = rl.psql(pg1, "SELECT pg_current_wal_lsn()")
            import time

            deadline = time.monotonic() + 60
            while host.query(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", socket_dir=f"{root}/pg2/run",
                             port=pg2.port, user="postgres") != [["t"]]:
                assert time.monotonic() < deadline, "the rebuilt standby did not replay the new row within 60 s"
                time.sleep(0.5)
            assert host.query("SELECT count(*) FROM ssh_rebuild", socket_dir=f"{root}/pg2/run", port=pg2.port,
                              user="postgres") == [["5001"]]
        finally:
            stopped = host.stop_postmaster(rebuilt, mode="immediate", timeout_s=30)
            assert stopped.state in ("stopped", "killed", "none", "nodir"), stopped
