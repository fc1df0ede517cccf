"""The endpoint check on the real lab: the replicated pair (pg1 primary, pg2 streaming standby, repmgr) stands on two
moto EC2 instances with an Elastic IP (and a Route 53 record) as the clients' endpoint. Tests run in file order:
healthy, then a failover that leaves the endpoint behind, then the old primary back writable, then fenced, then the
old primary rebuilt as a standby by the standby-rebuild DAG, whose report carries the endpoint's state. Every check
goes through the audit's entry point (pgops.airflow.audit.audit_cluster), as the hourly audit runs it.
"""

from __future__ import annotations

import copy
import os
import shlex
import time

import pytest
import yaml
from helpers import load_dag, task_states

from pgops.airflow.endpoint import report_state
from pgops.core import endpoint as E
from pgops.core import findings as F
from pgops.core import replication as R
from pgops.inventory import load_inventory

pytestmark = [pytest.mark.lab]
DAG_ID = "pgops_standby_rebuild__repl"


class Aws:
    """The nodes' moto instances, the Elastic IP and the hosted zone, and inventories that name them."""

    def __init__(self, pair, lab, tmp):
        self.pair, self.tmp = pair, tmp
        self.ec2 = lab.aws_client("ec2")
        self.route53 = lab.aws_client("route53")
        run = self.ec2.run_instances(MinCount=2, MaxCount=2, ImageId="ami-12345678", InstanceType="t3.micro")
        self.instance = dict(zip(("pg1", "pg2"), (i["InstanceId"] for i in run["Instances"]), strict=True))
        address = self.ec2.allocate_address(Domain="vpc")
        self.allocation_id, self.public_ip = address["AllocationId"], address["PublicIp"]
        self.associate("pg1")
        zone = self.route53.create_hosted_zone(Name="pgops-lab.internal", CallerReference=f"pgops-{os.getpid()}")
        self.zone_id = zone["HostedZone"]["Id"].rsplit("/", 1)[-1]
        self.record = f"repl-{os.getpid()}.pgops-lab.internal"
        self.upsert_record(self.private_ip("pg1"))

    def associate(self, node: str) -> None:
        self.ec2.associate_address(AllocationId=self.allocation_id, InstanceId=self.instance[node],
                                   AllowReassociation=True)

    def private_ip(self, node: str) -> str:
        res = self.ec2.describe_instances(InstanceIds=[self.instance[node]])
        return res["Reservations"][0]["Instances"][0]["PrivateIpAddress"]

    def upsert_record(self, value: str) -> None:
        self.route53.change_resource_record_sets(HostedZoneId=self.zone_id, ChangeBatch={"Changes": [{
            "Action": "UPSERT", "ResourceRecordSet": {"Name": self.record, "Type": "A", "TTL": 60,
                                                      "ResourceRecords": [{"Value": value}]}}]})

    def cluster(self, kind: str = "elastic_ip"):
        """The pair's cluster from an inventory file with instance ids and the endpoint (parsed, validated)."""
        return load_inventory(self.inventory(kind)).get(self.pair.cluster_name)

    def inventory(self, kind: str = "elastic_ip"):
        """That inventory file (for $PGOPS_INVENTORY)."""
        data = yaml.safe_load(self.pair.inventory.read_text())
        c = copy.deepcopy(data["clusters"][0])
        c["replication"]["primary"]["instance_id"] = self.instance["pg1"]
        c["replication"]["standbys"][0]["instance_id"] = self.instance["pg2"]
        c["endpoint"] = ({"elastic_ip": {"allocation_id": self.allocation_id}} if kind == "elastic_ip" else
                         {"dns": {"hosted_zone_id": self.zone_id, "record_name": self.record}})
        path = self.tmp / f"clusters-{kind}.yaml"
        path.write_text(yaml.safe_dump({"clusters": [c]}))
        return path


@pytest.fixture(scope="module")
def aws(replicated_pair, lab, tmp_path_factory):
    return Aws(replicated_pair, lab, tmp_path_factory.mktemp("endpoint"))


@pytest.fixture(scope="module")
def backup(replicated_pair):
    """A base backup of pg1 before the failover: the last test rebuilds the old primary from it."""
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator

    return BarmanCloudBackupOperator(task_id="backup", cluster_name=replicated_pair.cluster_name).execute(
        {"run_id": f"endpoint-{os.getpid()}"})


def _audit(cluster):
    """The audit report's replication section and its findings by id (pgops.airflow.audit, as the hourly audit runs)."""
    from pgops.airflow import audit

    report = audit.audit_cluster(cluster, run_id="endpoint-test")
    return report["body"]["replication"], {f["id"]: F.Finding(**f) for f in report["body"]["findings"]}


def _wait_for(what: str, fn, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout_s} s")


def _problems(found: dict) -> dict:
    """The replication check's findings that are not OK (the audit's archive findings are other tests' subject)."""
    return {k: f for k, f in found.items() if f.severity != F.OK
            and k.startswith(("ENDPOINT_", "OLD_PRIMARY_", "REPLICATION_", "REPMGR_"))}


def _endpoint_calls(aws_calls) -> dict[str, int]:
    with aws_calls.lock:
        return {f"{s}:{o}": n for (s, o, caller, _), n in aws_calls.calls.items() if caller == "plugins/pgops/airflow/endpoint.py"}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_endpoint_on_the_primary_is_ok(replicated_pair, aws, aws_calls):
    from pgops.airflow import audit

    pair = replicated_pair
    _wait_for("pg2 streams from pg1", lambda: pair.rl.psql(
        pair.primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "1")
    cluster = aws.cluster()
    before = _endpoint_calls(aws_calls)
    report = audit.audit_cluster(cluster, run_id="endpoint-test")
    after = _endpoint_calls(aws_calls)
    # one read of the address and one of every node's instance per audit
    assert _delta(before, after) == {"ec2:DescribeAddresses": 1, "ec2:DescribeInstances": 1}
    ep = report["body"]["replication"]["endpoint"]
    assert ep["state"] == "on_primary" and ep["points_at_instances"] == [aws.instance["pg1"]], ep
    assert ep["public_ip"] == aws.public_ip and ep["nodes"]["pg2"]["instance_state"] == "running"
    by_id = {f["id"]: f for f in report["body"]["findings"]}
    assert by_id[E.ENDPOINT_OK]["severity"] == F.OK and R.REPLICATION_OK in by_id
    assert not [f for f in report["body"]["findings"] if f["id"].startswith(("ENDPOINT_", "OLD_PRIMARY_"))
                and f["severity"] != F.OK]

    before = _endpoint_calls(aws_calls)
    body, found = _audit(aws.cluster("dns"))
    after = _endpoint_calls(aws_calls)
    assert _delta(before, after) == {"route53:ListResourceRecordSets": 1, "ec2:DescribeInstances": 1}
    assert body["endpoint"]["state"] == "on_primary" and body["endpoint"]["values"] == [aws.private_ip("pg1")]
    assert E.ENDPOINT_OK in found and not _problems(found), _problems(found)

    state = report_state(cluster, primary="pg1", standby="pg2")
    assert state["state"] == "on_primary" and state["findings"] == [{"id": E.ENDPOINT_OK, "severity": F.OK}]


def test_promote_with_the_endpoint_left_on_the_old_primary_is_critical_with_the_fix(replicated_pair, aws, backup):
    rl, pg1, pg2 = replicated_pair.rl, replicated_pair.primary, replicated_pair.standby
    rl.stop(pg1, mode="immediate")  # the primary dies ...
    rl.promote(pg2)  # ... and the standby takes over, but nobody moved the Elastic IP or the record

    body, found = _audit(aws.cluster())
    assert body["current_primary"] == "pg2"
    f = found[E.ENDPOINT_NOT_ON_PRIMARY]
    assert f.severity == F.CRITICAL
    assert f.evidence["points_at_instances"] == [aws.instance["pg1"]] and f.evidence["current_primary"] == "pg2"
    assert f.fix == (f"aws ec2 associate-address --allocation-id {aws.allocation_id} --instance-id "
                     f"{aws.instance['pg2']} --allow-reassociation --region us-east-1")
    for part in (f"Elastic IP {aws.allocation_id}", f"instance {aws.instance['pg1']} (pg1)", "current primary pg2"):
        assert part in f.message, f.message
    fence = found[E.OLD_PRIMARY_NOT_FENCED]  # pg1 does not answer, but its instance still runs
    assert fence.severity == F.WARNING and fence.evidence["instance_state"] == "running"
    assert fence.evidence["command"] == f"aws ec2 stop-instances --instance-ids {aws.instance['pg1']} --region us-east-1"

    # the DNS variant: the change batch in the finding, sent as it is, puts the record on the primary
    dns = aws.cluster("dns")
    _, found = _audit(dns)
    f = found[E.ENDPOINT_NOT_ON_PRIMARY]
    rrset = f.evidence["change_batch"]["Changes"][0]["ResourceRecordSet"]
    assert rrset["ResourceRecords"] == [{"Value": aws.private_ip("pg2")}] and rrset["Type"] == "A"
    argv = shlex.split(f.fix)
    assert argv[:5] == ["aws", "route53", "change-resource-record-sets", "--hosted-zone-id", aws.zone_id]
    aws.route53.change_resource_record_sets(HostedZoneId=aws.zone_id, ChangeBatch=f.evidence["change_batch"])
    _, found = _audit(dns)
    assert E.ENDPOINT_OK in found and E.ENDPOINT_NOT_ON_PRIMARY not in found


def test_both_nodes_writable_the_split_brain_finding_names_the_node_the_endpoint_reaches(replicated_pair, aws):
    rl, pg1 = replicated_pair.rl, replicated_pair.primary
    rl.start(pg1)  # the old primary comes back, still a primary on timeline 1
    assert rl.psql(pg1, "SELECT pg_is_in_recovery()") == "f"

    cluster = aws.cluster()
    _, found = _audit(cluster)
    split = found[R.REPLICATION_MULTIPLE_PRIMARIES]
    assert split.evidence["current_primary"] == "pg2" and split.evidence["endpoint_reaches"] == ["pg1"]
    assert f"Clients reach pg1 through Elastic IP {aws.allocation_id}" in split.message, split.message
    fence = found[E.OLD_PRIMARY_NOT_FENCED]
    assert fence.severity == F.CRITICAL and fence.evidence["endpoint_reaches_it"] is True
    assert "clients write to pg1" in found[E.ENDPOINT_NOT_ON_PRIMARY].message

    # the finding's command, run as it says (its arguments through boto3), moves the endpoint to the primary
    argv = shlex.split(found[E.ENDPOINT_NOT_ON_PRIMARY].fix)
    aws.ec2.associate_address(AllocationId=argv[argv.index("--allocation-id") + 1],
                              InstanceId=argv[argv.index("--instance-id") + 1], AllowReassociation=True)
    _, found = _audit(cluster)
    split = found[R.REPLICATION_MULTIPLE_PRIMARIES]
    assert split.evidence["endpoint_reaches"] == ["pg2"] and "Clients reach pg2 through" in split.message
    assert E.ENDPOINT_OK in found and found[E.OLD_PRIMARY_NOT_FENCED].severity == F.CRITICAL


def test_old_primary_instance_stopped_is_fenced(replicated_pair, aws):
    rl, pg1 = replicated_pair.rl, replicated_pair.primary
    # the fence as the seed's repmgrd does it: the old primary's instance is stopped (and its PostgreSQL with it)
    rl.stop(pg1, mode="immediate")
    aws.ec2.stop_instances(InstanceIds=[aws.instance["pg1"]])

    cluster = aws.cluster()
    body, found = _audit(cluster)
    fenced = found[E.OLD_PRIMARY_FENCED]
    assert fenced.severity == F.OK and fenced.evidence["instance_id"] == aws.instance["pg1"]
    assert fenced.evidence["instance_state"] in ("stopping", "stopped")
    assert body["endpoint"]["old_primaries"]["pg1"]["fenced"] is True
    assert E.ENDPOINT_OK in found
    assert not {k for k in _problems(found) if k.startswith(("ENDPOINT_", "OLD_PRIMARY_"))}, _problems(found)

    # the standby-rebuild report's view: the same endpoint state, judged without asking the nodes
    state = report_state(cluster, primary="pg2")
    assert state["state"] == "on_primary" and state["points_at_nodes"] == ["pg2"]
    assert {x["id"] for x in state["findings"]} == {E.ENDPOINT_OK, E.OLD_PRIMARY_FENCED}


def _latest_rebuild_report(cluster) -> dict:
    from pgops.airflow import hooks
    from pgops.core import reports

    report = reports.read_latest(hooks.s3_client(cluster.aws_conn_id), cluster, "replication")
    assert report is not None and report["body"]["action"] == "standby-rebuild", report
    return report


def _endpoint_findings(ep: dict) -> list[tuple[str, str]]:
    return sorted((f["id"], f["severity"]) for f in ep["findings"])


@pytest.mark.airflow
def test_the_rebuild_report_says_where_the_endpoint_points_and_that_the_old_primary_is_fenced(
        replicated_pair, aws, backup, run_dag, monkeypatch):
    """pg2 is the primary behind the Elastic IP, pg1 (the old primary) and its instance are stopped. The rebuild DAG
    of pg1, with the endpoint in the inventory, stores its report in the bucket: a run that fails after its preflight
    leaves pg1 an old primary, and the report says the endpoint reaches pg2 and pg1 is fenced; the run that rebuilds
    pg1 reports the endpoint on pg2 and no old primary left (pg1 streams from pg2 as a standby)."""
    rl, pg1, pg2 = replicated_pair.rl, replicated_pair.primary, replicated_pair.standby
    cluster = aws.cluster()
    monkeypatch.setenv("PGOPS_INVENTORY", str(aws.inventory()))
    dag = load_dag(DAG_ID)

    # a socket directory the postgres OS user cannot create: the restore step fails after the preflight planned it
    dr = run_dag(dag, {"target": "pg1", "force": True, "socket_dir": f"/root/pgops-nope-{os.getpid()}",
                       "skip_approval": True})
    states = task_states(dr)
    assert states["preflight"] == "success" and states["restore"] == "failed" and states["report"] == "failed", states
    report = _latest_rebuild_report(cluster)
    assert report["run_id"] == dr.run_id and report["status"] == "failed" and report["body"]["primary"] == "pg2"
    ep = report["body"]["endpoint"]
    assert aws.allocation_id in ep["endpoint"] and ep["state"] == "on_primary", ep
    assert ep["current_primary"] == "pg2" and ep["points_at_instances"] == [aws.instance["pg2"]], ep
    old = ep["old_primaries"]["pg1"]
    assert old["fenced"] is True and old["instance_id"] == aws.instance["pg1"], old
    assert old["instance_state"] in ("stopping", "stopped") and old["writable"] is False, old
    assert _endpoint_findings(ep) == [(E.ENDPOINT_OK, F.OK), (E.OLD_PRIMARY_FENCED, F.OK)], ep["findings"]

    try:
        dr = run_dag(dag, {"target": "pg1", "force": True, "socket_dir": pg1.socket_dir, "skip_approval": True})
    finally:
        rl.refresh(pg1)  # the fixture stops it by its new pid
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    report = _latest_rebuild_report(cluster)
    body = report["body"]
    assert report["run_id"] == dr.run_id and report["status"] == "ok", report
    assert body["node"] == "pg1" and body["primary"] == "pg2" and body["backup_id"] == backup, body
    ep = body["endpoint"]
    assert ep["state"] == "on_primary" and ep["points_at_nodes"] == ["pg2"] and ep["fix"] is None, ep
    assert ep["old_primaries"] == {} and _endpoint_findings(ep) == [(E.ENDPOINT_OK, F.OK)], ep

    # the hourly audit agrees: pg1 streams from pg2 and is no old primary any more
    _wait_for("pg1 streams from pg2", lambda: rl.psql(
        pg2, "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg1' AND state = 'streaming'") == "1")
    replication, found = _audit(cluster)
    assert replication["nodes"]["pg1"]["role"] == "standby" and replication["endpoint"]["old_primaries"] == {}
    assert E.ENDPOINT_OK in found and not [k for k in found if k.startswith("OLD_PRIMARY_")], sorted(found)
