"""`make demo`'s flow through the real scheduler, dag-processor, triggerer and api-server, on a fresh lab.

What dag.test() hides: DAG serialization, trigger import paths in the triggerer, pools, the API, and what the
scheduler does on its own when a DAG is unpaused (it starts the latest scheduled run at once): the first run of
every DAG must find what it needs, so a new user's home page shows no failed run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from pgops import demo
from pgops.airflow_stack import AirflowStack
from pgops.lab import Lab, pid_alive

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
    stack = AirflowStack(tmp_path / "airflow", extra_env=lab.env())
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
    finally:
        stack.down()
    assert not any(pid_alive(p) for p in st["pids"].values())
