"""The EBS cutover waits for a person: the migration DAG through the real scheduler, triggerer and api-server on the
lab (moto's EC2), answered through the REST API a person's client uses (PATCH .../hitlDetails).

- Reject: no final snapshot, the chain's snapshots and copies kept, the report says who rejected and when; clearing
  the gate asks again, Approve cuts over (fresh round, final snapshot, volume) and the rounds view says who approved.
- No answer within approval_timeout_minutes: the scheduler answers Reject, no cutover, and if_not_approved=delete
  deletes the chain's snapshots and copies.

Why not dag.test() in a thread with an api-server beside it (an earlier attempt hung until pytest's 900 s timeout):
in Airflow 3.3.2 the task runner installs a SIGTERM handler, which Python allows only in the main thread, so every
task of a dag.test() in a worker thread fails before it runs and no approval is ever asked; and dag.test() never
applies a response timeout (the scheduler's awaiting_input sweep does), so a timeout cannot end such a run.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers import GateRuns, airflow_stack, task_errors

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DAG_ID = "pgops_ebs_migration__main"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"
GATE = "approve_cutover"
runs = GateRuns(DAG_ID, GATE, run_timeout_s=300, run_poll_s=1)


@pytest.fixture(scope="module")
def stack(lab, tmp_path_factory):
    # the awaiting_input timeout sweep every 3 s instead of 15 s
    yield from airflow_stack(tmp_path_factory.mktemp("airflow-approval-ebs"),
                             {**lab.env(), "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "3"}, dag_id=DAG_ID)


def wait_task(stack, run_id: str, task_id: str, state: str, timeout_s: float = 240) -> dict[str, str | None]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        states = runs.states(stack, run_id)
        if states.get(task_id) == state:
            return states
        if runs.run_state(stack, run_id) in ("success", "failed"):
            break
        time.sleep(1)
    pytest.fail(f"task {task_id} of run {run_id} did not reach {state} within {timeout_s:.0f} s; tasks: {states}")


def hitl_detail(stack, run_id: str) -> dict:
    details = stack._request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{runs.q(run_id)}/hitlDetails")["hitl_details"]
    mine = [d for d in details if d["task_instance"]["task_id"] == GATE]
    assert len(mine) == 1, details
    return mine[0]


def _snapshots(lab, region: str, migration: str) -> dict[str, str]:
    """{snapshot id: round} of a migration in a region."""
    snaps = lab.aws_client("ec2", region=region).describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:pgops:migration-id", "Values": [migration]}])["Snapshots"]
    return {s["SnapshotId"]: {t["Key"]: t["Value"] for t in s.get("Tags", [])}["pgops:round"] for s in snaps}


def _report(stack, run_id: str) -> dict:
    return stack.xcom(DAG_ID, runs.q(run_id), "report")


def _conf(volume_id: str, **changes) -> dict:
    return {"volume_ids": [volume_id], "target_region": TARGET_REGION, "target_az": f"{TARGET_REGION}b",
            "downtime_target_minutes": 10, "copy_time_minutes": 1, "max_rounds": 2,
            "cutover_mode": "crash-consistent", **changes}


def _alert_queue(lab) -> str:
    sqs = lab.aws_client("sqs")
    url = sqs.create_queue(QueueName=f"pgops-approval-{os.getpid()}-{int(time.time())}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    lab.aws_client("sns").subscribe(TopicArn=lab.load().sns_topic_arn, Protocol="sqs", Endpoint=arn)
    return url


def _messages(lab, url: str, want: int, timeout_s: float = 30) -> list[dict]:
    sqs, got = lab.aws_client("sqs"), []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += [json.loads(m["Body"]) for m in
                sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])]
    return got


def test_the_cutover_waits_for_a_person_reject_keeps_the_chain_and_asking_again_cuts_over(stack, moto):
    lab = moto
    queue = _alert_queue(lab)
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    run_id = stack.trigger(DAG_ID, _conf(volume_id, approval_timeout_minutes=30))
    migration = f"{DAG_ID}/{run_id}"

    states = wait_task(stack, run_id, GATE, "awaiting_input")
    runs.wait_parked(stack, run_id)
    assert states["chain"] == "success" and states["cutover"] is None and states["fresh_round"] is None, states
    detail = hitl_detail(stack, run_id)
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert detail["subject"].startswith("EBS cutover of main: predicted downtime ") and "round(s)" in detail["subject"]
    for label in ("| Predicted downtime |", "| Downtime target | `10.0 min` |", "| Floor (d*) |", "| Rounds so far |",
                  f"| Volumes | `{volume_id}` |"):
        assert label in detail["body"], detail["body"]
    chain_rounds = _snapshots(lab, SOURCE_REGION, migration)
    assert chain_rounds and "final" not in chain_rounds.values(), chain_rounds
    # the person is told: one SNS message on the cluster's topic naming the run and where to answer
    sent = _messages(lab, queue, 1)
    assert [m.get("Subject") for m in sent] == ["pgops approval needed: main"], sent
    assert run_id in sent[0]["Message"] and "/required_actions" in sent[0]["Message"], sent[0]["Message"]
    time.sleep(5)  # nobody answers: nothing moves on its own
    assert runs.states(stack, run_id)[GATE] == "awaiting_input"
    assert "final" not in _snapshots(lab, SOURCE_REGION, migration).values()

    rejected = runs.answer(stack, run_id, "Reject")
    assert rejected["responded_by"]["name"] == "admin" and rejected["chosen_options"] == ["Reject"]
    assert runs.wait_run(stack, run_id) == "success", (runs.states(stack, run_id), task_errors(stack, DAG_ID, run_id))
    states = runs.states(stack, run_id)
    assert states[GATE] == "success" and states["report"] == "success", states
    assert {states[t] for t in ("fresh_round", "cutover", "wait_final", "copy_final", "share", "create_volume")} \
        == {"skipped"}, states
    assert "final" not in _snapshots(lab, SOURCE_REGION, migration).values()
    report = _report(stack, run_id)
    body = report["body"]
    assert report["status"] == "warning" and body["approval"]["decision"] == "rejected", body["approval"]
    assert body["approval"]["by"] == "admin" and body["approval"]["at"].startswith(rejected["responded_at"][:19])
    assert body["approval_text"].startswith("rejected by admin at ")
    assert body["approval"]["facts"]["rounds"] == len(body["rounds"]) >= 1
    kept = body["not_cut_over"]
    assert kept["if_not_approved"] == "keep" and set(kept["kept"]) >= set(chain_rounds), kept
    assert set(_snapshots(lab, SOURCE_REGION, migration)) == set(chain_rounds)  # all still there: resumable
    copies = _snapshots(lab, TARGET_REGION, migration)
    assert copies and set(copies) <= set(kept["kept"])

    # Resume the same run: clear the gate with what follows it; it asks again and Approve cuts over.
    stack._request("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
                   {"dry_run": False, "dag_run_id": run_id, "task_ids": [GATE], "include_downstream": True,
                    "only_failed": False, "reset_dag_runs": True})
    wait_task(stack, run_id, GATE, "awaiting_input")
    runs.wait_parked(stack, run_id)
    approved = runs.answer(stack, run_id, "Approve")
    assert runs.wait_run(stack, run_id) == "success", (runs.states(stack, run_id), task_errors(stack, DAG_ID, run_id))
    states = runs.states(stack, run_id)
    assert set(states.values()) == {"success"}, states
    rounds = _snapshots(lab, SOURCE_REGION, migration)
    assert "final" in rounds.values() and set(chain_rounds) <= set(rounds), rounds
    report = _report(stack, run_id)
    body = report["body"]
    assert report["status"] == "ok" and body["approval"]["decision"] == "approved" and body["approval"]["by"] == "admin"
    assert body["approval"]["at"].startswith(approved["responded_at"][:19]) and body["not_cut_over"] is None
    assert list(body["destination_volumes"]) == [volume_id]
    # the dashboard's rounds view of this run says who approved the cutover, and when
    status, page = stack.call("GET", f"/pgops/migration?dag_id={DAG_ID}&run_id={runs.q(run_id)}", None,
                              token=stack.token())
    assert status == 200, page
    page = page.decode() if isinstance(page, bytes) else str(page)
    assert "<p id='approval' data-decision='approved'>Cutover approval: approved by admin at " in page, page[-3000:]


def test_no_answer_within_the_timeout_is_no_cutover_and_delete_cleans_up(stack, moto):
    lab = moto
    volume_id = lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=8, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]
    run_id = stack.trigger(DAG_ID, _conf(volume_id, approval_timeout_minutes=0.1, if_not_approved="delete"))
    migration = f"{DAG_ID}/{run_id}"
    wait_task(stack, run_id, GATE, "awaiting_input")
    made = _snapshots(lab, SOURCE_REGION, migration)
    assert made, "the chain took no round"
    # nobody answers: 6 s later the scheduler answers Reject
    assert runs.wait_run(stack, run_id) == "success", (runs.states(stack, run_id), task_errors(stack, DAG_ID, run_id))
    states = runs.states(stack, run_id)
    assert states[GATE] == "success" and states["cutover"] == "skipped" and states["report"] == "success", states
    detail = hitl_detail(stack, run_id)
    assert detail["chosen_options"] == ["Reject"] and detail["responded_by_user"] is None
    body = _report(stack, run_id)["body"]
    assert body["approval"]["decision"] == "timed_out" and body["approval"]["by"] is None
    assert body["approval_text"].startswith("timed out: no answer within 0.1 min (asked at ")
    gone = body["not_cut_over"]
    assert gone["if_not_approved"] == "delete" and gone["not_deleted"] == {} and set(made) <= set(gone["deleted"])
    assert _snapshots(lab, SOURCE_REGION, migration) == {} and _snapshots(lab, TARGET_REGION, migration) == {}
