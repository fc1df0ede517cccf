"""The production login: the REAL api-server with Airflow's FAB auth manager, the pgops roles synced from an
inventory of two clusters (alpha, beta), and one user per role, created through FAB's own REST API by the admin.

What each may and may not do is asked of the api-server itself: triggering DAGs, answering approvals, reading
task logs, the dashboard's reports, users and connections; and a user whose role names only alpha's DAGs does not
see beta, neither in Airflow nor on the dashboard.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime

import pytest
from test_ui_api import _inventory, _write_fixtures

from pgops.airflow_stack import AirflowStack
from pgops.fab_roles import cluster_dag_ids
from pgops.inventory import load_inventory

pytestmark = [pytest.mark.lab, pytest.mark.slow]

USERS = {  # user -> FAB roles
    "viewer": ["pgops_viewer"],
    "operator": ["pgops_operator"],
    "alpha_viewer": ["pgops_viewer__alpha"],
    "alpha_operator": ["pgops_operator__alpha"],
    "norole": ["Public"],  # FAB's role without permissions
}


@pytest.fixture(scope="module")
def fab(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    inventory_path = _inventory(tmp)
    _write_fixtures(inventory_path, datetime.now(UTC))
    stack = AirflowStack(tmp / "airflow", auth="fab",
                         extra_env={**lab.env(), "PGOPS_INVENTORY": str(inventory_path), "PGOPS_UI_CACHE_TTL_S": "2"})
    try:
        stack.up()
        stack.wait_for_dag("pgops_ebs_migration__beta")
        stack.wait_for_dag("pgops_wal_audit__alpha")
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
