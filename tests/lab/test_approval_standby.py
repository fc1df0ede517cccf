"""A standby rebuild waits for a person before it wipes a node: the rebuild DAG through the real scheduler and
api-server on the lab's replicated pair, answered through the REST API (PATCH .../hitlDetails).

The gate shows the node, its host, data directory and system identifier; while it waits and after a Reject nothing
on the node or the primary has changed (files, slot, WAL position of the archive); after Approve the node is
rebuilt from the backup and streams again. Both reports say who decided and when.
(Why the real scheduler and not dag.test() in a thread: see tests/lab/test_approval_ebs.py.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import GateRuns, airflow_stack, task_errors

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DAG_ID = "pgops_standby_rebuild__repl"
GATE = "approve_rebuild"
runs = GateRuns(DAG_ID, GATE, run_timeout_s=420, run_poll_s=2)


@pytest.fixture(scope="module")
def stack(replicated_pair, lab, tmp_path_factory):
    pair = replicated_pair
    env = {**lab.env(), "PGOPS_INVENTORY": str(pair.inventory)}
    env.update({k: os.environ[k] for k in ("AIRFLOW_CONN_PGOPS_REPL_PG1", "AIRFLOW_CONN_PGOPS_REPL_PG2")})
    yield from airflow_stack(tmp_path_factory.mktemp("airflow-approval-standby"), env, dag_id=DAG_ID,
                             pools={pair.cluster().pool: 1})


def wait_gate(stack, run_id: str, timeout_s: float = 180) -> dict[str, str | None]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        states = runs.states(stack, run_id)
        if states.get(GATE) == "awaiting_input" or runs.run_state(stack, run_id) in ("success", "failed"):
            break
        time.sleep(1)
    assert states.get(GATE) == "awaiting_input", (f"{GATE} of run {run_id} was not waiting for an answer within "
                                                  f"{timeout_s:.0f} s; tasks: {states}")
    runs.wait_parked(stack, run_id)
    return states


def _files(data_dir: str) -> dict[str, int]:
    root = Path(data_dir)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _untouched(pair, files_before: dict[str, int], slots_before: str) -> None:
    """pg2 stopped with every file as it was; pg1 has the same slots."""
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    assert not (Path(pg2.data_dir) / "postmaster.pid").exists()
    assert _files(pg2.data_dir) == files_before
    assert rl.psql(pg1, "SELECT string_agg(slot_name || ':' || active, ',' ORDER BY slot_name) FROM "
                        "pg_replication_slots") == slots_before


def test_a_node_wipe_waits_for_a_person_reject_leaves_it_and_approve_rebuilds_it(replicated_pair, stack):
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    pair = replicated_pair
    rl, pg1, pg2 = pair.rl, pair.primary, pair.standby
    rl.psql(pg1, "CREATE TABLE approval_rows (id int PRIMARY KEY); "
                 "INSERT INTO approval_rows SELECT g FROM generate_series(1, 1000) g")
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="repl").execute(
        {"run_id": f"approval-{os.getpid()}"})
    sysid = rl.psql(pg1, "SELECT system_identifier FROM pg_control_system()")
    rl.stop(pg2)  # a node whose slot is free: the rebuild replaces its contents (force)
    files_before = _files(pg2.data_dir)
    slots_before = rl.psql(pg1, "SELECT string_agg(slot_name || ':' || active, ',' ORDER BY slot_name) FROM "
                                "pg_replication_slots")
    conf = {"target": "pg2", "force": True, "socket_dir": pg2.socket_dir, "approval_timeout_minutes": 30}

    run_id = stack.trigger(DAG_ID, conf)
    states = wait_gate(stack, run_id)
    assert states["preflight"] == "success" and states["restore"] is None, states
    details = stack._request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{runs.q(run_id)}/hitlDetails")["hitl_details"]
    (detail,) = [d for d in details if d["task_instance"]["task_id"] == GATE]
    assert detail["subject"].startswith("Standby rebuild of pg2 on ") and "remove the contents of" in detail["subject"]
    for row in ("| Node | `pg2` |", f"| Data directory | `{pg2.data_dir}` |", f"| System identifier (cluster) | `{sysid}` |",
                f"| System identifier (in the directory) | `{sysid}` |", "| Primary | `pg1` |",
                f"| Backup | `{backup_id} (ended "):
        assert row in detail["body"], detail["body"]
    time.sleep(5)  # nobody answers: nothing moves on its own
    assert runs.states(stack, run_id)[GATE] == "awaiting_input"
    _untouched(pair, files_before, slots_before)

    rejected = runs.answer(stack, run_id, "Reject")
    assert runs.wait_run(stack, run_id) == "success", (runs.states(stack, run_id), task_errors(stack, DAG_ID, run_id))
    states = runs.states(stack, run_id)
    assert [states[t] for t in ("restore", "wait_streaming", "register")] == ["skipped"] * 3, states
    _untouched(pair, files_before, slots_before)
    report = stack.xcom(DAG_ID, runs.q(run_id), "report")
    assert report["status"] == "warning" and report["approval"]["decision"] == "rejected", report
    assert report["approval"]["by"] == "admin" and report["approval"]["at"].startswith(rejected["responded_at"][:19])
    assert report["approval"]["facts"]["node"] == "pg2" and report["approval"]["facts"]["system_identifier"] == sysid

    run_id = stack.trigger(DAG_ID, conf)
    wait_gate(stack, run_id)
    _untouched(pair, files_before, slots_before)
    runs.answer(stack, run_id, "Approve")
    try:
        assert runs.wait_run(stack, run_id) == "success", (runs.states(stack, run_id), task_errors(stack, DAG_ID, run_id))
    finally:
        if (Path(pg2.data_dir) / "postmaster.pid").exists():
            rl.refresh(pg2)  # the fixture stops it by its new pid
    assert set(runs.states(stack, run_id).values()) == {"success"}
    report = stack.xcom(DAG_ID, runs.q(run_id), "report")
    assert report["status"] == "ok" and report["approval"]["decision"] == "approved" and report["approval"]["by"] == "admin"
    assert rl.psql(pg2, "SELECT pg_is_in_recovery()") == "t"
    rl.psql(pg1, "INSERT INTO approval_rows VALUES (1001)")
    deadline = time.monotonic() + 60
    while rl.psql(pg2, "SELECT count(*) FROM approval_rows") != "1001":
        assert time.monotonic() < deadline, "the rebuilt pg2 did not replay the new row within 60 s"
        time.sleep(0.5)
