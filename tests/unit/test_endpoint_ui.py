"""The dashboard shows the client endpoint next to the replication state: the fleet row's view and the HTML of the
fleet table and the cluster page, from a wal-audit report as the audit writes it (and from a hostile one)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from pgops.airflow.ui import api, summary
from pgops.airflow.ui.summary import AMBER, GREEN, RED
from pgops.core import endpoint as E
from pgops.core import replication as R
from pgops.core.reports import envelope
from pgops.inventory import Endpoint, ReplicaNode, Replication

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
PG1, PG2 = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"
EIP = Endpoint(kind="elastic_ip", allocation_id="eipalloc-0123456789abcdef0", region="us-east-1")
REPL = Replication(primary=ReplicaNode(name="pg1", postgres_conn_id="c1", instance_id=PG1),
                   standbys=(ReplicaNode(name="pg2", postgres_conn_id="c2", instance_id=PG2, slot="pg2"),))
ROW = {"system_identifier": "7", "current_lsn": "0/5000000", "has_repmgr": False}


def audit_report(*, pg1: dict, pg2: dict, eip_on: str, pg1_state: str = "running") -> dict:
    """A wal-audit report whose replication section comes from the real evaluators."""
    obs = R.Observed(nodes={"pg1": {**ROW, **pg1}, "pg2": {**ROW, **pg2}})
    seen = E.Observation(region="us-east-1", allocation_id=EIP.allocation_id, public_ip="54.0.0.9", instance_id=eip_on,
                         instances={PG1: E.Instance(PG1, pg1_state, ("10.0.1.1",)),
                                    PG2: E.Instance(PG2, "running", ("10.0.1.2",))})
    body, found = R.evaluate("main", REPL, obs, endpoint_reach=E.reach(EIP, REPL, seen))
    body["endpoint"], more = E.evaluate("main", EIP, REPL, body, seen)
    found = [f.to_dict() for f in [*found, *more]]
    return envelope(kind="wal-audit", cluster="main", run_id="r", started_at=NOW, finished_at=NOW,
                    status="critical" if any(f["severity"] == "critical" for f in found) else "ok",
                    body={"replication": body, "findings": found, "counts": {}})


PRIMARY = {"in_recovery": False, "primary_timeline": 1}
STANDBY = {"in_recovery": True, "received_tli": 1, "receiver_status": "streaming"}


def test_healthy_pair_with_the_endpoint_on_the_primary_is_green():
    rv = summary.fleet_row("main", now=NOW, audit=audit_report(pg1=PRIMARY, pg2=STANDBY, eip_on=PG1))["replication"]
    assert rv["current_primary"] == "pg1" and rv["roles"] == {"pg1": "primary", "pg2": "standby"}
    ep = rv["endpoint"]
    assert ep["state"] == "on_primary" and ep["colour"] == GREEN and ep["text"] == "reaches the primary pg1"
    assert ep["instances"]["pg2"] == {"instance_id": PG2, "instance_state": "running"} and ep["fix"] is None


def test_endpoint_left_behind_after_a_failover_is_red_with_the_fix_and_the_fence():
    report = audit_report(pg1={"error": "connection refused"}, pg2={**PRIMARY, "primary_timeline": 2}, eip_on=PG1)
    row = summary.fleet_row("main", now=NOW, audit=report)
    ep = row["replication"]["endpoint"]
    assert ep["state"] == "not_on_primary" and ep["colour"] == RED
    assert ep["text"] == "points at pg1, not the primary pg2"
    assert ep["fix"].startswith("aws ec2 associate-address --allocation-id eipalloc-0123456789abcdef0 --instance-id "
                                f"{PG2}")
    assert ep["old_primaries"] == [{"node": "pg1", "instance_id": PG1, "instance_state": "running", "fenced": False,
                                    "text": "old primary pg1 NOT fenced (instance running)"}]
    assert row["colour"] == RED and any("ENDPOINT_NOT_ON_PRIMARY" in x["text"] for x in row["reasons"])

    html = api._fleet_html([row], "/pgops")
    assert "<th>Primary and endpoint</th>" in html and "data-state='not_on_primary'" in html
    assert "points at pg1, not the primary pg2" in html and "old primary pg1 NOT fenced" in html
    page = api._cluster_html(row, summary.timeline(report, now=NOW), summary.rto_series([], target_s=3600), [],
                             "/pgops", 14)
    assert "<h2>Replication and endpoint</h2>" in page and f"<td>pg1</td><td>unreachable</td><td>{PG1}</td>" in page
    assert "id='endpoint-fix'>aws ec2 associate-address --allocation-id eipalloc-0123456789abcdef0" in page


def test_fenced_old_primary_is_green_and_a_warning_colours_amber():
    fenced = audit_report(pg1={"error": "x"}, pg2={**PRIMARY, "primary_timeline": 2}, eip_on=PG2, pg1_state="stopped")
    ep = summary.fleet_row("main", now=NOW, audit=fenced)["replication"]["endpoint"]
    assert ep["colour"] == GREEN and ep["old_primaries"][0]["text"] == "old primary pg1 fenced (instance stopped)"
    running = audit_report(pg1={"error": "x"}, pg2={**PRIMARY, "primary_timeline": 2}, eip_on=PG2)
    assert summary.fleet_row("main", now=NOW, audit=running)["replication"]["endpoint"]["colour"] == AMBER


def test_no_replication_no_column_content():
    row = summary.fleet_row("main", now=NOW, audit=envelope(kind="wal-audit", cluster="main", run_id="r",
                                                           started_at=NOW, finished_at=NOW, status="ok", body={}))
    assert row["replication"] is None
    assert api._replication_cell(None) == "—" and api._replication_html(None) == ""
    # a row of an unreadable report has no replication key at all: the table still renders
    assert "cluster-row" in api._fleet_html([api._unreadable_row("main", ValueError("x"))], "")


def test_hostile_report_values_are_escaped_everywhere():
    report = audit_report(pg1={"error": "x"}, pg2={**PRIMARY, "primary_timeline": 2}, eip_on=PG1)
    bad = "<script>alert(1)</script>'\""
    rep = copy.deepcopy(report)["body"]["replication"]
    rep["current_primary"] = bad
    rep["inventory_primary"] = bad
    rep["nodes"][bad] = {"role": bad}
    ep = rep["endpoint"]
    ep.update(endpoint=bad, state=bad, fix=bad, points_at_nodes=[bad], current_primary=bad)
    ep["old_primaries"] = {bad: {"instance_state": bad, "fenced": bad, "instance_id": bad}}
    ep["nodes"] = {bad: {"instance_id": bad, "instance_state": bad}}
    report["body"]["replication"] = rep
    row = summary.fleet_row("main", now=NOW, audit=report)
    html = api._fleet_html([row], "") + api._cluster_html(
        row, summary.timeline(report, now=NOW), summary.rto_series([], target_s=3600), [], "", 14)
    assert "<script>" not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#x27;&quot;" in html
    # malformed shapes (lists where mappings were, numbers where names were) still render
    report["body"]["replication"] = {"nodes": ["x"], "endpoint": {"old_primaries": [1], "points_at_nodes": 5,
                                                                  "nodes": "x"}}
    row = summary.fleet_row("main", now=NOW, audit=report)
    assert row["replication"]["endpoint"]["text"] == "state unknown" and row["replication"]["roles"] == {}
    api._fleet_html([row], "")
