"""`make demo`'s flow through the real scheduler, dag-processor, triggerer and api-server, on a fresh lab.

What dag.test() hides: DAG serialization, trigger import paths in the triggerer, pools, the API, what the
scheduler does on its own when a DAG is unpaused (it starts the latest scheduled run at once: the first run of
every DAG must find what it needs, so a new user's home page shows no failed run), and Deadline Alerts (the
scheduler notices a missed deadline, the triggerer sends the cluster's SNS alert).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest
import yaml

from pgops.inventory import REPO_ROOT
from pgops.lab import demo
from pgops.lab.airflow_stack import AirflowStack
from pgops.lab.local import Lab, pid_alive

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture
def fresh_lab():
    """A lab of its own: an empty bucket, as on a new user's machine (the session lab holds earlier backups)."""
    state_dir = tempfile.mkdtemp(prefix="pgops-demo-lab-")
    os.chmod(state_dir, 0o755)
    the_lab = Lab(state_dir)
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
        shutil.rmtree(state_dir, ignore_errors=True)


def test_demo_flow_on_real_components_leaves_no_failed_run(fresh_lab, tmp_path):
    lab = fresh_lab
    st = lab.load()
    keys = [o["Key"] for o in lab.s3_client().list_objects_v2(Bucket=st.bucket).get("Contents", [])]
    assert keys and not any("/base/" in k for k in keys), keys  # WAL archived by `up`, no base backup yet
    demo._seed(lab)
    # Deadlines short enough that both runs miss them (the audit has none); a missed deadline fails no run.
    inventory = yaml.safe_load((REPO_ROOT / "include" / "clusters.example.yaml").read_text())
    inventory["clusters"][0]["targets"].update(backup_deadline_s=2, restore_deadline_s=3)
    inventory_path = tmp_path / "clusters.yaml"
    inventory_path.write_text(yaml.safe_dump(inventory))
    sqs = lab.aws_client("sqs")
    queue_url = sqs.create_queue(QueueName=f"pgops-deadlines-{os.getpid()}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    lab.aws_client("sns").subscribe(TopicArn=st.sns_topic_arn, Protocol="sqs", Endpoint=queue_arn)
    stack = AirflowStack(tmp_path / "airflow", extra_env={**lab.env(), "PGOPS_INVENTORY": str(inventory_path)})
    st = stack.up()
    try:
        stack.ensure_pools({"pgops_main": 1})
        flow = demo.run_flow(stack, "main")
        assert [flow.get(k) for k in demo.FLOW] == ["success"] * 3, flow
        assert "deferred" in flow["backup_states"]["verify"]  # the trigger ran in the real triggerer
        summary = flow["backup_summary"]
        assert summary["status"] == "DONE" and summary["location"].startswith("s3://pgops-lab/")
        events = stack._request("GET", "/api/v2/assets/events?limit=10")["asset_events"]
        assert any(e["extra"].get("backup_id") == summary["backup_id"] for e in events)
        # No DAG of the demo has a failed run: the home page's "Failed Dags" stays empty.
        failed = stack._request("GET", "/api/v2/dags/~/dagRuns?state=failed&limit=100")["dag_runs"]
        assert failed == [], [(r["dag_id"], r["dag_run_id"]) for r in failed]
        dags = stack._request("GET", "/api/v2/dags?limit=100")["dags"]
        unpaused = {d["dag_id"] for d in dags if not d["is_paused"]}
        assert unpaused == {"pgops_base_backup__main", "pgops_restore_verify__main", "pgops_wal_audit__main"}
        # Both runs outlived their deadlines: one SNS alert each, naming the run and the setting to look at.
        alerts: dict[str, str] = {}
        deadline = time.monotonic() + 90
        while len(alerts) < 2 and time.monotonic() < deadline:
            for m in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2).get(
                    "Messages", []):
                body = json.loads(m["Body"])
                alerts[body.get("Subject", "")] = body["Message"]
        assert set(alerts) == {"pgops deadline missed: main base backup",
                               "pgops deadline missed: main restore verification"}, alerts
        backup_alert = alerts["pgops deadline missed: main base backup"]
        assert flow["backup_run_id"] in backup_alert and "within 2 s of its scheduled time (targets.backup_deadline_s)" in backup_alert
        assert flow["restore_verify_run_id"] in alerts["pgops deadline missed: main restore verification"]
        # a run with a deadline can still be retried from the UI: clearing one of its tasks works
        cleared = stack._request("POST", "/api/v2/dags/pgops_base_backup__main/clearTaskInstances", {
            "dry_run": False, "task_ids": ["retention"], "dag_run_id": flow["backup_run_id"], "only_failed": False})
        assert [ti["task_id"] for ti in cleared["task_instances"]] == ["retention"]
    finally:
        stack.down()
    assert not any(pid_alive(p) for p in st["pids"].values())
