"""The approval gates without a server: the questions built from a chain state and a rebuild plan, the decision
records from Airflow's resume events, skip_approval, Reject skipping only the next task (the report still runs), and
the dashboard's line for the decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pendulum
import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException, TaskAwaitingInput

from pgops.airflow.operators import approval as A

CHAIN = {
    "rounds": [{"index": 1, "completed_at": "2026-11-29T01:00:00+00:00"},
               {"index": 2, "completed_at": "2026-11-29T01:10:00+00:00"},
               {"index": 3, "completed_at": "2026-11-29T01:14:00+00:00"}],
    "decisions": [{"action": "another_round"}, {"action": "another_round"}, {"action": "another_round"},
                  {"action": "cut_over", "reason": "under target near the floor",
                   "numbers": {"predicted_downtime_s": 185.0, "floor_s": 110.0, "downtime_target_s": 300.0,
                               "predicted_next_s": 125.0, "predicted_copy_s": 60.0}}],
}
PLAN = {"node": "pg2", "host": "ssh connection 'pg2_ssh'", "data_dir": "/var/lib/postgresql/15/main",
        "data_realpath": "/srv/pg/15/main", "system_identifier": "7311112222333344445",
        "target_system_identifier": "7311112222333344445", "target_pid": 4242, "target_state": "in archive recovery",
        "target_used_bytes": 3 * 1024**3, "was_running": True, "was_non_empty": True, "backup_id": "20261129T010000",
        "backup_end_time": "2026-11-29T01:02:00+00:00", "backup_size_bytes": 2 * 1024**3, "primary": "pg1",
        "slot": "pg2", "slot_exists": False}


def test_the_cutover_question_shows_predicted_downtime_rounds_floor_and_target():
    subject, body, facts = A.cutover_question("main", CHAIN, {"volume_ids": ["vol-0123456789abcdef0"]},
                                              {"cutover_mode": "stop-writes", "target_region": "us-west-2"},
                                              timeout_minutes=90)
    assert subject == "EBS cutover of main: predicted downtime 3.1 min (target 5.0 min) after 3 round(s)"
    for row in ("| Predicted downtime | `3.1 min` |", "| Downtime target | `5.0 min` |", "| Floor (d*) | `1.8 min` |",
                "| Rounds so far | `3` |", "| Final snapshot + copy | `2.1 min + 60 s` |",
                "| Volumes | `vol-0123456789abcdef0` |", "| Destination | `us-west-2` |"):
        assert row in body, body
    assert "pg_ctl -m fast" in body and "no answer within 90 min: no cutover" in body
    assert "snapshots and copies stay: clear this task" in body  # if_not_approved defaults to keep
    assert facts["predicted_downtime_s"] == 185.0 and facts["rounds"] == 3 and facts["floor_s"] == 110.0
    assert facts["downtime_target_s"] == 300.0 and facts["last_round_completed_at"] == "2026-11-29T01:14:00+00:00"
    _, body, facts = A.cutover_question("main", CHAIN, None, {"if_not_approved": "delete"}, timeout_minutes=5)
    assert "the chain's snapshots and copies are deleted" in body and facts["if_not_approved"] == "delete"
    # a chain that decided nothing yet still gives a question, with "unknown" numbers
    subject, _, facts = A.cutover_question("main", {"rounds": [], "decisions": []}, None, {}, timeout_minutes=5)
    assert "predicted downtime unknown" in subject and facts["rounds"] == 0


def test_the_rebuild_question_shows_node_host_directory_and_system_identifier():
    subject, body, facts = A.rebuild_question("repl", PLAN, timeout_minutes=60)
    assert subject == ("Standby rebuild of pg2 on ssh connection 'pg2_ssh': stop PostgreSQL (pid 4242, in archive "
                       "recovery), remove the contents of /var/lib/postgresql/15/main (3.0 GiB), restore backup "
                       "20261129T010000 there")
    for row in ("| Node | `pg2` |", "| Host | `ssh connection 'pg2_ssh'` |",
                "| Data directory | `/var/lib/postgresql/15/main` |", "| Realpath on the host | `/srv/pg/15/main` |",
                "| System identifier (cluster) | `7311112222333344445` |",
                "| System identifier (in the directory) | `7311112222333344445` |",
                "| PostgreSQL there | `pid 4242, in archive recovery` |", "| Contents to remove | `3.0 GiB` |",
                "| Primary | `pg1` |", "| Replication slot | `pg2 (created on the primary)` |"):
        assert row in body, body
    assert "nothing is stopped or removed and nothing is created on the primary" in body
    assert facts["node"] == "pg2" and facts["target_pid"] == 4242
    empty = {**PLAN, "was_running": False, "was_non_empty": False, "target_pid": None, "target_system_identifier": None}
    subject, body, _ = A.rebuild_question("repl", empty, timeout_minutes=60)
    assert subject.endswith(": restore backup 20261129T010000 there") and "stop PostgreSQL" not in subject
    assert "| System identifier (in the directory) | `none (empty directory)` |" in body
    assert "| Contents to remove | `none` |" in body


def test_a_value_cannot_break_out_of_its_table_cell():
    body = A.markdown("q", [("Data directory", "/srv/a|b`c\n| Node | `pg1` |")], [])
    rows = body.splitlines()
    assert rows[-2] == "| Data directory | `/srv/a/b'c / Node / 'pg1' /` |", rows


@pytest.mark.parametrize("value", [0, -1, "nan", "inf", "x", None, A.MAX_TIMEOUT_MINUTES + 1])
def test_a_bad_timeout_is_refused(value):
    with pytest.raises(AirflowFailException, match="approval_timeout_minutes"):
        A.checked_timeout_minutes(value)
    assert A.checked_timeout_minutes("0.25") == 0.25


def test_decision_records_from_the_resume_events():
    at = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    user = {"id": "7", "name": "alice"}
    ok = A.decision_record({"chosen_options": ["Approve"], "responded_by_user": user, "responded_at": at,
                            "timedout": False}, asked_at="2026-11-29T01:15:00+00:00", timeout_minutes=60, facts={"x": 1})
    assert ok["decision"] == A.APPROVED and ok["by"] == "alice" and ok["by_id"] == "7"
    assert ok["at"] == "2026-11-29T02:00:00+00:00" and ok["facts"] == {"x": 1}
    assert A.describe(ok) == "approved by alice at 2026-11-29T02:00:00+00:00"
    no = A.decision_record({"chosen_options": ["Reject"], "responded_by_user": user, "responded_at": at},
                           asked_at=None, timeout_minutes=60, facts=None)
    assert no["decision"] == A.REJECTED and A.describe(no) == "rejected by alice at 2026-11-29T02:00:00+00:00"
    # the scheduler's sweep: the default (Reject) written with no user
    late = A.decision_record({"chosen_options": ["Reject"], "responded_by_user": None, "responded_at": at,
                              "timedout": True}, asked_at="2026-11-29T01:00:00+00:00", timeout_minutes=60, facts={})
    assert late["decision"] == A.TIMED_OUT and late["by"] is None
    assert A.describe(late) == "timed out: no answer within 60 min (asked at 2026-11-29T01:00:00+00:00)"
    skipped = A.skipped_record(by="deploy-bot", at=at, facts={})
    assert A.describe(skipped) == "not asked: param skip_approval (run triggered by deploy-bot), at 2026-11-29T02:00:00+00:00"
    assert A.describe(None) is None and A.describe({}) is None


# -- the operator, its DAG neighbours and Airflow's Reject handling -------------------------------------------------
class FakeTI:
    def __init__(self, xcom: dict):
        self.xcom, self.pushed = dict(xcom), {}
        self.dag_id, self.task_id, self.run_id, self.map_index = "d", "approve_cutover", "r", -1
        self.id = "0190f1e2-0000-7000-8000-000000000000"

    def xcom_pull(self, task_ids, key="return_value"):
        return self.pushed.get((task_ids, key), self.xcom.get((task_ids, key)))

    def xcom_push(self, key, value):
        self.pushed[(self.task_id, key)] = value


def _dag(chain=CHAIN, preflight=None):
    from airflow.providers.standard.operators.empty import EmptyOperator

    with DAG("approval_unit", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
        chain_task = EmptyOperator(task_id="chain")
        gate = A.EbsCutoverApprovalOperator(task_id=A.CUTOVER_GATE, cluster_name="main", chain=chain,
                                            preflight=preflight, skip_approval=False, timeout_minutes=30)
        fresh = EmptyOperator(task_id="fresh_round")
        cutover = EmptyOperator(task_id="cutover")
        report = EmptyOperator(task_id="report", trigger_rule="all_done")
        chain_task >> gate >> fresh >> cutover >> report
    return dag, gate


def _context(gate, ti, **params):
    return {"ti": ti, "task_instance": ti, "task": gate, "run_id": "r", "params": {"cutover_mode": "backup", **params},
            "dag_run": SimpleNamespace(triggering_user_name="deploy-bot")}


def test_skip_approval_answers_without_asking(monkeypatch):
    import airflow.providers.standard.operators.hitl as hitl

    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: pytest.fail("asked although skip_approval"))
    _, gate = _dag()
    gate.skip_approval = True
    record = gate.execute(_context(gate, FakeTI({})))
    assert record["decision"] == A.SKIPPED and record["by"] == "deploy-bot" and record["facts"]["rounds"] == 3


def test_the_gate_asks_with_the_built_question_and_parks_until_the_timeout(monkeypatch):
    import airflow.providers.standard.operators.hitl as hitl

    asked, notified = {}, []
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: asked.update(kw))
    monkeypatch.setattr(A.PgopsApprovalOperator, "_notify", lambda self, *a: notified.append(a[1]))
    _, gate = _dag(preflight={"volume_ids": ["vol-1"]})
    ti = FakeTI({})
    with pytest.raises(TaskAwaitingInput) as parked:
        gate.execute(_context(gate, ti))
    assert parked.value.method_name == "execute_complete" and parked.value.timeout == timedelta(minutes=30)
    assert asked["options"] == ["Approve", "Reject"] and asked["defaults"] == ["Reject"]
    assert asked["subject"].startswith("EBS cutover of main: predicted downtime 3.1 min")
    assert "| Rounds so far | `3` |" in asked["body"] and notified == [asked["subject"]]
    question = ti.pushed[(A.CUTOVER_GATE, "question")]
    assert question["timeout_minutes"] == 30 and question["facts"]["floor_s"] == 110.0


def test_no_chain_state_means_nothing_to_approve(monkeypatch):
    _, gate = _dag(chain=None)
    with pytest.raises(AirflowFailException, match="no chain state"):
        gate.execute(_context(gate, FakeTI({})))


@pytest.mark.parametrize(("event", "decision"), [
    ({"chosen_options": ["Approve"], "responded_by_user": {"id": "1", "name": "alice"}}, A.APPROVED),
    ({"chosen_options": ["Reject"], "responded_by_user": {"id": "1", "name": "alice"}}, A.REJECTED),
    ({"chosen_options": ["Reject"], "responded_by_user": None, "timedout": True}, A.TIMED_OUT),
])
def test_reject_skips_only_the_next_task_so_the_report_still_runs(monkeypatch, event, decision):
    from airflow.providers.common.compat.sdk import DownstreamTasksSkipped

    _, gate = _dag()
    ti = FakeTI({(A.CUTOVER_GATE, "question"): {"asked_at": "2026-11-29T01:15:00+00:00", "timeout_minutes": 30,
                                                "facts": {"rounds": 3}}})
    event = {**event, "params_input": {}, "responded_at": datetime(2026, 11, 29, 2, 0, tzinfo=UTC)}
    if decision == A.APPROVED:
        assert gate.execute_complete(_context(gate, ti), event)["decision"] == A.APPROVED
    else:  # Airflow's SkipMixin.skip ends the task with the tasks to skip: the next one only
        with pytest.raises(DownstreamTasksSkipped) as skipped:
            gate.execute_complete(_context(gate, ti), event)
        assert skipped.value.tasks == ["fresh_round"]  # cutover and the rest follow the skip; report is all_done
    record = ti.pushed[(A.CUTOVER_GATE, "return_value")]  # stored before the task ended
    assert record["decision"] == decision and record["facts"] == {"rounds": 3}
    assert record["asked_at"] == "2026-11-29T01:15:00+00:00" and record["timeout_minutes"] == 30


def _replicated_cluster():
    from pathlib import Path

    import yaml

    from pgops.inventory import DEFAULT_INVENTORY, parse_inventory

    data = {**yaml.safe_load(DEFAULT_INVENTORY.read_text())["clusters"][0], "name": "repl"}
    data["replication"] = {"primary": {"name": "pg1", "data_directory": "/srv/pg1"},
                           "standbys": [{"name": "pg2", "postgres_conn_id": "repl_pg2", "data_directory": "/srv/pg2"}]}
    return parse_inventory({"clusters": [data]}, Path("/etc/pgops/clusters.yaml")).clusters[0]


def test_the_dags_put_the_gates_before_the_steps_that_change_things():
    from helpers import load_dag

    from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag

    ebs = load_dag("pgops_ebs_migration__main")
    assert [t.task_id for t in ebs.topological_sort()] == [
        "validate", "preflight", "not_dry_run", "chain", "approve_cutover", "fresh_round", "cutover", "wait_final",
        "copy_final", "share", "create_volume", "report"]
    assert ebs.params["skip_approval"] is False and ebs.params["if_not_approved"] == "keep"
    gate = ebs.get_task("approve_cutover")
    assert gate.retries == 0 and gate.defaults == ["Reject"] and not gate.ignore_downstream_trigger_rules
    rebuild = build_standby_rebuild_dag(_replicated_cluster())
    assert [t.task_id for t in rebuild.topological_sort()] == [
        "preflight", "approve_rebuild", "restore", "wait_streaming", "register", "report"]
    assert rebuild.params["skip_approval"] is False and rebuild.params["approval_timeout_minutes"] == 60


def test_the_rounds_view_says_who_decided_and_a_refused_cutover_is_not_green():
    from pgops.airflow.ui import api, summary

    body = {"rounds": [{"index": 1, "started_at": "2026-11-29T01:00:00+00:00", "duration_s": 60}],
            "decisions": [{"action": "another_round"}, {"action": "cut_over"}], "outcome": "cut_over",
            "approval": {"decision": "rejected", "by": "<b>eve</b>"},
            "approval_text": "rejected by <b>eve</b> at 2026-11-29T02:00:00+00:00"}
    view = summary.migration_view({"status": "warning", "cluster": "main", "run_id": "r", "body": body})
    assert view["colour"] == summary.AMBER and view["approval_decision"] == "rejected"
    assert "no cutover: rejected by <b>eve</b> at 2026-11-29T02:00:00+00:00" in view["reasons"]
    html = api._migration_html(view, "/pgops")
    assert ("<p id='approval' data-decision='rejected'>Cutover approval: rejected by &lt;b&gt;eve&lt;/b&gt; at "
            "2026-11-29T02:00:00+00:00</p>") in html
    approved = {**body, "approval": {"decision": "approved"}, "approval_text": "approved by alice at t",
                "downtime_s": 40}
    view = summary.migration_view({"status": "ok", "body": approved})
    assert view["colour"] == summary.GREEN and view["approval"] == "approved by alice at t"
    assert "Cutover approval: not recorded" in api._migration_html(summary.migration_view({"body": {}}), "")
