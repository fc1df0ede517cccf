"""The production login: the REAL api-server with Airflow's FAB auth manager, the pgops roles synced from an
inventory of two clusters (alpha, beta), and one user per role, created through FAB's own REST API by the admin.
beta is the lab's replicated pair (its primary, storage and replication nodes), so its standby-rebuild DAG exists.

What each may and may not do is asked of the api-server itself: triggering DAGs (the standby rebuild too),
answering a real approval that waits for a person, reading task logs, the dashboard's reports, users and
connections; and a user whose role names only alpha's DAGs does not see beta, neither in Airflow nor on the
dashboard.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from helpers import GateRuns, task_errors
from test_ui_api import _inventory, _write_fixtures

from pgops.airflow.fab_roles import REBUILD_PREFIX, cluster_dag_ids
from pgops.inventory import load_inventory
from pgops.lab.airflow_stack import AirflowStack

pytestmark = [pytest.mark.lab, pytest.mark.slow]

USERS = {  # user -> FAB roles
    "viewer": ["pgops_viewer"],
    "operator": ["pgops_operator"],
    "alpha_viewer": ["pgops_viewer__alpha"],
    "alpha_operator": ["pgops_operator__alpha"],
    "beta_operator": ["pgops_operator__beta"],
    "norole": ["Public"],  # FAB's role without permissions
}
REBUILD = f"{REBUILD_PREFIX}beta"
REBUILD_GATE = "approve_rebuild"
rebuild_runs = GateRuns(REBUILD, REBUILD_GATE, run_timeout_s=300, run_poll_s=2)


@pytest.fixture(scope="module")
def fab(lab, replicated_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    pair = yaml.safe_load(replicated_pair.inventory.read_text())["clusters"][0]
    # beta's reports land in the pair's prefix: _write_fixtures empties it first (the pair has no backup yet)
    inventory_path = _inventory(tmp, {"beta": {k: pair[k] for k in ("postgres_conn_id", "storage", "replication")}})
    _write_fixtures(inventory_path, datetime.now(UTC))
    conns = {k: os.environ[k] for k in ("AIRFLOW_CONN_PGOPS_REPL_PG1", "AIRFLOW_CONN_PGOPS_REPL_PG2")}
    stack = AirflowStack(tmp / "airflow", auth="fab", extra_env={
        **lab.env(), **conns, "PGOPS_INVENTORY": str(inventory_path), "PGOPS_UI_CACHE_TTL_S": "2"})
    try:
        stack.up()
        stack.wait_for_dag("pgops_ebs_migration__beta")
        stack.wait_for_dag("pgops_wal_audit__alpha")
        stack.wait_for_dag(REBUILD)
        tokens = {"admin": stack.token()}
        for user, roles in USERS.items():
            password = secrets.token_urlsafe(16)
            status, body = stack.call("POST", "/auth/fab/v1/users", {
                "username": user, "email": f"{user}@pgops.invalid", "first_name": user, "last_name": "test",
                "roles": [{"name": r} for r in roles], "password": password}, token=tokens["admin"])
            assert status in (200, 201), (user, status, body)
            tokens[user] = stack.login(user, password)
        yield stack, tokens, load_inventory(inventory_path)
    finally:
        stack.down()


def clusters_on_dashboard(stack, token) -> set[str]:
    status, body = stack.call("GET", "/pgops/api/fleet", token=token)
    assert status == 200, body
    return {row["cluster"] for row in body["clusters"]}


def visible_dags(stack, token) -> set[str]:
    status, body = stack.call("GET", "/api/v2/dags?limit=100&dag_id_pattern=pgops_", token=token)
    assert status == 200, body
    return {d["dag_id"] for d in body["dags"]}


def trigger(stack, token, dag_id: str) -> int:
    """POST a manual run (the DAGs stay paused: a created run is queued and never starts)."""
    status, body = stack.call("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                              {"logical_date": None, "conf": {"dry_run": True}} if "ebs_migration" in dag_id
                              else {"logical_date": None}, token=token)
    assert status in (200, 403), (dag_id, status, body)
    return status


def answer_approval(stack, token, dag_id: str) -> int:
    """PATCH a human-in-the-loop answer. The auth manager decides first (403); past it, the lookup answers 404 because
    no task of that run waits for an answer."""
    status, body = stack.call("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/no_such_run/taskInstances/approve/-1/hitlDetails",
                              {"chosen_options": ["Approve"]}, token=token)
    assert status in (403, 404), (status, body)
    return status


def test_roles_exist_with_per_dag_access_only(fab):
    stack, tokens, inv = fab
    status, body = stack.call("GET", "/auth/fab/v1/roles?limit=100", token=tokens["admin"])
    assert status == 200
    roles = {r["name"]: {(a["action"]["name"], a["resource"]["name"]) for a in r["actions"]} for r in body["roles"]}
    assert {"Admin", "pgops_viewer", "pgops_operator", "pgops_viewer__alpha", "pgops_operator__beta"} <= set(roles)
    alpha, beta = (cluster_dag_ids(c) for c in inv.clusters)
    assert REBUILD in beta and not any(d.startswith(REBUILD_PREFIX) for d in alpha)
    for name in ("pgops_viewer", "pgops_operator", "pgops_viewer__alpha", "pgops_operator__alpha"):
        assert ("can_read", "DAGs") not in roles[name] and ("can_edit", "DAGs") not in roles[name], name
        assert {("can_read", f"DAG:{d}") for d in alpha} <= roles[name]
    assert not any(res.endswith("__beta") for _, res in roles["pgops_viewer__alpha"] | roles["pgops_operator__alpha"])
    assert not any(a in ("can_edit", "can_create", "can_delete") and not r.startswith("My ")
                   for a, r in roles["pgops_viewer"]), "a viewer may change nothing"
    assert {("can_create", f"DAG Run:{d}") for d in alpha + beta} <= roles["pgops_operator"]


def test_viewer_reads_everything_and_changes_nothing(fab):
    stack, tokens, _ = fab
    t = tokens["viewer"]
    assert clusters_on_dashboard(stack, t) == {"alpha", "beta"}
    assert stack.call("GET", "/pgops/clusters/beta", token=t)[0] == 200
    assert stack.call("GET", "/pgops/api/clusters/beta/migration", token=t)[0] == 200
    assert {"pgops_base_backup__alpha", "pgops_ebs_migration__beta"} <= visible_dags(stack, t)
    assert stack.call("GET", "/api/v2/dags/pgops_base_backup__beta/dagRuns", token=t)[0] == 200
    assert trigger(stack, t, "pgops_ebs_migration__beta") == 403
    assert trigger(stack, t, "pgops_base_backup__alpha") == 403
    assert stack.call("PATCH", "/api/v2/dags/pgops_base_backup__alpha", {"is_paused": False}, token=t)[0] == 403
    assert answer_approval(stack, t, "pgops_ebs_migration__beta") == 403
    assert stack.call("GET", "/api/v2/connections", token=t)[0] == 403
    assert stack.call("GET", "/auth/fab/v1/users", token=t)[0] == 403


def test_operator_triggers_migrations_and_answers_approvals_but_administers_nothing(fab):
    stack, tokens, _ = fab
    t = tokens["operator"]
    assert clusters_on_dashboard(stack, t) == {"alpha", "beta"}
    assert trigger(stack, t, "pgops_ebs_migration__beta") == 200
    assert trigger(stack, t, "pgops_restore_verify__alpha") == 200
    assert answer_approval(stack, t, "pgops_ebs_migration__beta") == 404  # allowed; nothing waits
    assert stack.call("GET", "/api/v2/connections", token=t)[0] == 403
    assert stack.call("GET", "/api/v2/variables", token=t)[0] == 403
    assert stack.call("GET", "/auth/fab/v1/users", token=t)[0] == 403


def test_a_one_cluster_role_does_not_see_the_other_cluster(fab):
    stack, tokens, _ = fab
    for user in ("alpha_viewer", "alpha_operator"):
        t = tokens[user]
        assert clusters_on_dashboard(stack, t) == {"alpha"}, user
        assert {d.rsplit("__", 1)[1] for d in visible_dags(stack, t)} == {"alpha"}, user
        for path in ("/pgops/clusters/beta", "/pgops/api/clusters/beta/timeline", "/pgops/api/clusters/beta/rto",
                     "/pgops/api/clusters/beta/migration", "/api/v2/dags/pgops_base_backup__beta",
                     "/api/v2/dags/pgops_base_backup__beta/dagRuns"):
            status, body = stack.call("GET", path, token=t)
            assert status == 403, (user, path, status, body)
        assert stack.call("GET", "/pgops/clusters/alpha", token=t)[0] == 200
        assert trigger(stack, t, "pgops_ebs_migration__beta") == 403
        assert answer_approval(stack, t, "pgops_ebs_migration__beta") == 403
    assert trigger(stack, tokens["alpha_operator"], "pgops_ebs_migration__alpha") == 200
    assert trigger(stack, tokens["alpha_viewer"], "pgops_ebs_migration__alpha") == 403
    assert answer_approval(stack, tokens["alpha_operator"], "pgops_ebs_migration__alpha") == 404


def test_the_standby_rebuild_may_be_started_by_its_clusters_operators_only(fab):
    """A rebuild replaces a node's data directory: pgops_operator and beta's own operator role may start one, the
    viewer and alpha's roles may not. The DAG stays paused, so the accepted runs wait queued and are removed."""
    stack, tokens, _ = fab
    assert REBUILD in visible_dags(stack, tokens["viewer"])
    assert stack._request("GET", f"/api/v2/dags/{REBUILD}")["is_paused"] is True
    made = []
    for user, want in (("operator", 200), ("beta_operator", 200), ("viewer", 403), ("alpha_operator", 403),
                       ("alpha_viewer", 403), ("norole", 403)):
        status, body = stack.call("POST", f"/api/v2/dags/{REBUILD}/dagRuns",
                                  {"logical_date": None, "conf": {"target": "pg2"}}, token=tokens[user])
        assert status == want, (user, status, body)
        if status == 200:
            assert body["state"] == "queued" and body["triggering_user_name"] == user, body
            made.append(body["dag_run_id"])
    assert stack.run_ids(REBUILD) == set(made) and len(made) == 2
    for run_id in made:  # the approval test starts the DAG: its run must be the only one
        stack._request("DELETE", f"/api/v2/dags/{REBUILD}/dagRuns/{GateRuns.q(run_id)}")
    assert stack.run_ids(REBUILD) == set()


def test_a_user_without_a_role_sees_no_cluster(fab):
    stack, tokens, _ = fab
    t = tokens["norole"]
    assert clusters_on_dashboard(stack, t) == set()
    assert stack.call("GET", "/pgops/clusters/alpha", token=t)[0] == 403
    assert trigger(stack, t, "pgops_base_backup__alpha") == 403


def test_admin_sees_all_and_task_logs_follow_dag_read(fab):
    """The admin runs alpha's WAL audit for real; its task log is readable by alpha's viewer, not by norole."""
    stack, tokens, _ = fab
    assert clusters_on_dashboard(stack, tokens["admin"]) == {"alpha", "beta"}
    dag_id = "pgops_wal_audit__alpha"
    run_id = stack.trigger(dag_id)
    stack.wait_for_run(dag_id, run_id, timeout_s=300)
    tis = stack._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    ti = next(t for t in tis if t["try_number"] >= 1)
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}?full_content=true"
    for user, want in (("alpha_viewer", 200), ("viewer", 200), ("operator", 200), ("norole", 403)):
        status, body = stack.call("GET", path, token=tokens[user])
        assert status == want, (user, status, body if status != 200 else "")
        if status == 200:
            assert ti["task_id"] in json.dumps(body), user


def _files(data_dir: str) -> dict[str, int]:
    root = Path(data_dir)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _wait_gate(stack, run_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        states = rebuild_runs.states(stack, run_id)
        if states.get(REBUILD_GATE) == "awaiting_input" or rebuild_runs.run_state(stack, run_id) in ("success", "failed"):
            break
        time.sleep(1)
    assert states.get(REBUILD_GATE) == "awaiting_input", (states, task_errors(stack, REBUILD, run_id))
    rebuild_runs.wait_parked(stack, run_id)


def test_a_waiting_rebuild_approval_is_answered_by_the_operator_and_refused_to_the_viewer(fab, replicated_pair):
    """The operator starts a real rebuild of beta's pg2; it waits at its gate for a person. The viewer's and alpha's
    roles' answers are refused and the gate keeps waiting; the operator's Reject resolves it: nothing is restored,
    pg2's files are as they were, and the report says the operator rejected it."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    stack, tokens, _ = fab
    rl, pg2 = replicated_pair.rl, replicated_pair.standby
    BarmanCloudBackupOperator(task_id="backup", cluster_name=replicated_pair.cluster_name).execute(
        {"run_id": f"roles-{os.getpid()}"})
    rl.stop(pg2)  # its slot is free: the preflight plans the rebuild
    files_before = _files(pg2.data_dir)
    op = tokens["operator"]
    assert stack.call("PATCH", f"/api/v2/dags/{REBUILD}", {"is_paused": False}, token=op)[0] == 200
    status, run = stack.call("POST", f"/api/v2/dags/{REBUILD}/dagRuns", {"logical_date": None, "conf": {
        "target": "pg2", "force": True, "socket_dir": pg2.socket_dir, "approval_timeout_minutes": 30}}, token=op)
    assert status == 200, run
    run_id = run["dag_run_id"]
    _wait_gate(stack, run_id)
    states = rebuild_runs.states(stack, run_id)
    assert states["preflight"] == "success" and states["restore"] is None, states

    answer = f"/api/v2/dags/{REBUILD}/dagRuns/{GateRuns.q(run_id)}/taskInstances/{REBUILD_GATE}/-1/hitlDetails"
    for user in ("viewer", "alpha_operator", "alpha_viewer", "norole"):
        status, body = stack.call("PATCH", answer, {"chosen_options": ["Reject"]}, token=tokens[user])
        assert status == 403, (user, status, body)
    time.sleep(2)
    assert rebuild_runs.states(stack, run_id)[REBUILD_GATE] == "awaiting_input"

    status, answered = stack.call("PATCH", answer, {"chosen_options": ["Reject"]}, token=op)
    assert status == 200, answered
    assert answered["responded_by"]["name"] == "operator" and answered["chosen_options"] == ["Reject"], answered
    assert rebuild_runs.wait_run(stack, run_id) == "success", (rebuild_runs.states(stack, run_id),
                                                               task_errors(stack, REBUILD, run_id))
    states = rebuild_runs.states(stack, run_id)
    assert states[REBUILD_GATE] == "success" and states["report"] == "success", states
    assert [states[t] for t in ("restore", "wait_streaming", "register")] == ["skipped"] * 3, states
    report = stack.xcom(REBUILD, GateRuns.q(run_id), "report")
    assert report["status"] == "warning" and report["approval"]["decision"] == "rejected", report
    assert report["approval"]["by"] == "operator" and report["approval"]["facts"]["node"] == "pg2", report
    assert not (Path(pg2.data_dir) / "postmaster.pid").exists() and _files(pg2.data_dir) == files_before
