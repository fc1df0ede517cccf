"""The endpoint check's core (pgops.core.endpoint.evaluate, points_at, reach, the fix commands): plain values in,
findings out. The AWS reads are proven against the lab's moto in tests/lab/test_endpoint.py."""

from __future__ import annotations

import json
import shlex

import pytest

from pgops.core import endpoint as E
from pgops.core import findings as F
from pgops.core import replication as R
from pgops.inventory import Endpoint, ReplicaNode, Replication

PG1, PG2, PG3 = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2", "i-0ccccccccccccccc3"
EIP = Endpoint(kind="elastic_ip", allocation_id="eipalloc-0123456789abcdef0", region="us-east-1")
DNS = Endpoint(kind="dns", hosted_zone_id="Z0123456789ABC", record_name="db.example.internal")
REPL = Replication(primary=ReplicaNode(name="pg1", postgres_conn_id="c1", instance_id=PG1),
                   standbys=(ReplicaNode(name="pg2", postgres_conn_id="c2", instance_id=PG2, slot="pg2"),))


def inst(iid: str, state: str = "running", n: int = 1) -> E.Instance:
    return E.Instance(instance_id=iid, state=state, private_ips=(f"10.0.1.{n}",), public_ips=(f"54.0.0.{n}",),
                      dns_names=(f"ip-10-0-1-{n}.ec2.internal",))


def instances(pg1: str = "running", pg2: str = "running") -> dict[str, E.Instance]:
    return {PG1: inst(PG1, pg1, 1), PG2: inst(PG2, pg2, 2)}


def rbody(primary: str | None, **roles: str) -> dict:
    """replication.evaluate's body as the endpoint check reads it."""
    roles = {"pg1": "primary", "pg2": "standby", **roles}
    return {"current_primary": primary, "nodes": {k: {"role": v} for k, v in roles.items()}}


def eip_obs(on: str | None, **kw) -> E.Observation:
    return E.Observation(region="us-east-1", allocation_id=EIP.allocation_id, public_ip="54.0.0.99",
                         instance_id=on, instances=kw.pop("instances", instances()), **kw)


def by_id(found):
    return {f.id: f for f in found}


# --- Elastic IP -------------------------------------------------------------------------------------------


def test_eip_on_the_primary_is_ok_and_nothing_else_is_said():
    body, found = E.evaluate("main", EIP, REPL, rbody("pg1"), eip_obs(PG1))
    assert [f.id for f in found] == [E.ENDPOINT_OK] and found[0].severity == F.OK
    assert body["state"] == "on_primary" and body["points_at_nodes"] == ["pg1"] and body["fix"] is None
    assert body["nodes"]["pg2"] == {"instance_id": PG2, "role": "standby", "instance_state": "running"}
    assert body["old_primaries"] == {}
    assert "Elastic IP eipalloc-0123456789abcdef0" in found[0].message and PG1 in found[0].message


def test_eip_left_on_the_old_primary_after_a_failover_is_critical_with_the_exact_command():
    # pg1 crashed (PostgreSQL does not answer), pg2 was promoted, the Elastic IP still sits on pg1's instance
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), eip_obs(PG1))
    f = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY]
    assert f.severity == F.CRITICAL
    cmd = ("aws ec2 associate-address --allocation-id eipalloc-0123456789abcdef0 "
           f"--instance-id {PG2} --allow-reassociation --region us-east-1")
    assert f.fix == cmd and f.evidence["command"] == cmd and body["fix"] == cmd
    assert f.evidence["points_at_instances"] == [PG1] and f.evidence["points_at_nodes"] == ["pg1"]
    assert f.evidence["current_primary"] == "pg2" and f.evidence["primary_instance"] == PG2
    for part in ("Elastic IP eipalloc-0123456789abcdef0", f"instance {PG1} (pg1)", "current primary pg2", PG2, cmd):
        assert part in f.message, part
    assert body["state"] == "not_on_primary"
    # the old primary's instance still runs: a restart makes it writable behind the endpoint
    nf = by_id(found)[E.OLD_PRIMARY_NOT_FENCED]
    assert nf.severity == F.WARNING and nf.evidence["endpoint_reaches_it"] is True
    assert nf.evidence["command"] == f"aws ec2 stop-instances --instance-ids {PG1} --region us-east-1"
    assert body["old_primaries"]["pg1"]["fenced"] is False


def test_eip_unassociated_is_critical_and_says_so():
    _, found = E.evaluate("main", EIP, REPL, rbody("pg1"), eip_obs(None))
    f = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY]
    assert f.severity == F.CRITICAL and "not associated" in f.message and f.evidence["points_at_instances"] == []
    assert f"--instance-id {PG1}" in f.fix


def test_eip_on_an_instance_of_no_node_is_named():
    _, found = E.evaluate("main", EIP, REPL, rbody("pg1"), eip_obs(PG3))
    f = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY]
    assert f"instance {PG3} (no node of main)" in f.message and f.evidence["points_at_nodes"] == []


def test_eip_associated_with_an_interface_only_is_mapped_by_its_private_address():
    obs = eip_obs(None, private_ip="10.0.1.2")
    assert E.points_at(EIP, REPL, obs)["nodes"] == ["pg2"]
    _, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="standby", pg2="primary"), obs)
    assert E.ENDPOINT_OK in by_id(found)


def test_public_ip_endpoint_without_allocation_id_uses_public_ip_in_the_command():
    ep = Endpoint(kind="elastic_ip", public_ip="54.0.0.99")
    obs = E.Observation(region=None, public_ip="54.0.0.99", instance_id=PG1, instances=instances())
    _, found = E.evaluate("main", ep, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), obs)
    assert by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY].fix == (
        f"aws ec2 associate-address --public-ip 54.0.0.99 --instance-id {PG2} --allow-reassociation")
    assert ep.label == "Elastic IP 54.0.0.99"


def test_missing_and_unreadable_endpoint():
    _, found = E.evaluate("main", EIP, REPL, rbody("pg1"), E.Observation(region="us-east-1", found=False,
                                                                         instances=instances()))
    f = by_id(found)[E.ENDPOINT_NOT_FOUND]
    assert f.severity == F.CRITICAL and "does not exist in region us-east-1" in f.message and PG1 in f.fix
    obs = E.Observation(error="AccessDenied: not authorized to perform ec2:DescribeAddresses", instances=instances())
    _, found = E.evaluate("main", EIP, REPL, rbody("pg1"), obs)
    f = by_id(found)[E.ENDPOINT_UNKNOWN]
    assert f.severity == F.WARNING and "AccessDenied" in f.message and "ec2:DescribeAddresses" in f.fix
    assert E.reach(EIP, REPL, obs) is None


def test_no_primary_makes_the_endpoint_unknown_and_judges_no_fence():
    body, found = E.evaluate("main", EIP, REPL, rbody(None, pg1="unreachable", pg2="unreachable"), eip_obs(PG1))
    assert [f.id for f in found] == [E.ENDPOINT_UNKNOWN] and found[0].evidence["points_at_nodes"] == ["pg1"]
    assert body["old_primaries"] == {}


# --- fencing of the old primary -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["stopped", "stopping", "terminated", "shutting-down"])
def test_old_primary_with_its_instance_down_is_fenced(state):
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="unreachable", pg2="primary"),
                             eip_obs(PG2, instances=instances(pg1=state)))
    got = by_id(found)
    assert set(got) == {E.ENDPOINT_OK, E.OLD_PRIMARY_FENCED}, got
    f = got[E.OLD_PRIMARY_FENCED]
    assert f.severity == F.OK and f.evidence["instance_state"] == state and f"is {state}" in f.message
    assert "pgops_standby_rebuild__main" in f.fix
    assert body["old_primaries"]["pg1"] == {"instance_id": PG1, "instance_state": state, "role": "unreachable",
                                            "writable": False, "endpoint_reaches": False, "fenced": True}


def test_old_primary_whose_instance_is_gone_is_fenced():
    obs = eip_obs(PG2, instances={PG2: inst(PG2, n=2)})
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), obs)
    assert by_id(found)[E.OLD_PRIMARY_FENCED].evidence["instance_state"] == "not found"
    assert body["nodes"]["pg1"]["instance_state"] == "not found"


def test_old_primary_running_and_writable_is_critical_with_the_stop_command():
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="primary", pg2="primary"), eip_obs(PG2))
    f = by_id(found)[E.OLD_PRIMARY_NOT_FENCED]
    assert f.severity == F.CRITICAL and "accepts writes" in f.message and "split brain with pg2" in f.message
    assert f.fix.startswith(f"aws ec2 stop-instances --instance-ids {PG1} --region us-east-1; then rebuild pg1")
    assert f.evidence["endpoint_reaches_it"] is False and "endpoint sends clients" not in f.message
    assert E.ENDPOINT_OK in by_id(found)


def test_writable_old_primary_behind_the_endpoint_says_clients_write_there():
    _, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="primary", pg2="primary"), eip_obs(PG1))
    got = by_id(found)
    assert "clients write to pg1, whose writes are lost" in got[E.ENDPOINT_NOT_ON_PRIMARY].message
    assert "the endpoint sends clients to it" in got[E.OLD_PRIMARY_NOT_FENCED].message


def test_writable_node_on_a_stopped_instance_means_the_inventory_instance_is_wrong():
    _, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="primary", pg2="primary"),
                          eip_obs(PG2, instances=instances(pg1="stopped")))
    f = by_id(found)[E.OLD_PRIMARY_NOT_FENCED]
    assert f.severity == F.CRITICAL and "instance_id is not the instance pg1 runs on" in f.message
    assert E.OLD_PRIMARY_FENCED not in by_id(found)


def test_rebuilt_old_primary_is_a_standby_and_not_judged_as_one():
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="standby", pg2="primary"), eip_obs(PG2))
    assert [f.id for f in found] == [E.ENDPOINT_OK] and body["old_primaries"] == {}


def test_instances_unreadable_makes_fencing_unknown():
    obs = eip_obs(PG2, instances={})
    obs.instances_error = "UnauthorizedOperation: ec2:DescribeInstances"
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="primary", pg2="primary"), obs)
    f = by_id(found)[E.OLD_PRIMARY_FENCING_UNKNOWN]
    assert f.severity == F.CRITICAL and "UnauthorizedOperation" in f.message
    assert body["nodes"]["pg1"]["instance_state"] == "unknown"


def test_a_second_writable_standby_is_an_old_primary_too():
    repl = Replication(primary=REPL.primary, standbys=(*REPL.standbys, ReplicaNode(
        name="pg3", postgres_conn_id="c3", instance_id=PG3)))
    obs = eip_obs(PG1, instances={**instances(), PG3: inst(PG3, n=3)})
    body, found = E.evaluate("main", EIP, repl, rbody("pg1", pg3="primary"), obs)
    assert set(body["old_primaries"]) == {"pg3"}
    assert by_id(found)[E.OLD_PRIMARY_NOT_FENCED].evidence["node"] == "pg3"


# --- DNS ------------------------------------------------------------------------------------------------------


def dns_obs(*values: str, rtype: str = "A", **kw) -> E.Observation:
    return E.Observation(record_type=rtype, values=values, ttl_s=30, instances=kw.pop("instances", instances()), **kw)


def test_dns_record_on_the_primary_private_ip_is_ok():
    body, found = E.evaluate("main", DNS, REPL, rbody("pg1"), dns_obs("10.0.1.1"))
    assert [f.id for f in found] == [E.ENDPOINT_OK]
    assert body["values"] == ["10.0.1.1"] and body["points_at_nodes"] == ["pg1"]
    assert DNS.label == "DNS record db.example.internal (zone Z0123456789ABC)"


def test_dns_record_on_the_old_primary_gives_the_change_batch():
    _, found = E.evaluate("main", DNS, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), dns_obs("10.0.1.1"))
    f = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY]
    batch = f.evidence["change_batch"]
    assert batch["Changes"] == [{"Action": "UPSERT", "ResourceRecordSet": {
        "Name": "db.example.internal.", "Type": "A", "TTL": 30, "ResourceRecords": [{"Value": "10.0.1.2"}]}}]
    argv = shlex.split(f.fix)
    assert argv[:5] == ["aws", "route53", "change-resource-record-sets", "--hosted-zone-id", "Z0123456789ABC"]
    assert argv[5] == "--change-batch" and json.loads(argv[6]) == batch
    assert "10.0.1.1 (instance i-0aaaaaaaaaaaaaaa1 (pg1))" in f.message


def test_dns_record_on_public_addresses_is_fixed_with_the_public_address():
    _, found = E.evaluate("main", DNS, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), dns_obs("54.0.0.1"))
    rrs = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY].evidence["change_batch"]["Changes"][0]["ResourceRecordSet"]
    assert rrs["ResourceRecords"] == [{"Value": "54.0.0.2"}]


def test_dns_cname_is_mapped_by_the_instance_dns_name_and_fixed_with_it():
    body, found = E.evaluate("main", DNS, REPL, rbody("pg1"), dns_obs("ip-10-0-1-1.ec2.internal", rtype="CNAME"))
    assert [f.id for f in found] == [E.ENDPOINT_OK]
    _, found = E.evaluate("main", DNS, REPL, rbody("pg2", pg1="standby", pg2="primary"),
                          dns_obs("ip-10-0-1-1.ec2.internal", rtype="CNAME"))
    rrs = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY].evidence["change_batch"]["Changes"][0]["ResourceRecordSet"]
    assert rrs["Type"] == "CNAME" and rrs["ResourceRecords"] == [{"Value": "ip-10-0-1-2.ec2.internal"}]


def test_dns_record_with_the_primary_and_a_stray_value_is_not_ok():
    _, found = E.evaluate("main", DNS, REPL, rbody("pg1"), dns_obs("10.0.1.1", "10.9.9.9"))
    f = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY]
    assert "10.9.9.9 (no node of main)" in f.message


def test_dns_record_with_both_nodes_reaches_both():
    obs = dns_obs("10.0.1.1", "10.0.1.2")
    assert E.points_at(DNS, REPL, obs)["nodes"] == ["pg1", "pg2"]
    _, found = E.evaluate("main", DNS, REPL, rbody("pg2", pg1="primary", pg2="primary"), obs)
    assert "clients write to pg1" in by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY].message


def test_dns_alias_is_unknown_not_wrong():
    _, found = E.evaluate("main", DNS, REPL, rbody("pg1"), dns_obs(alias="my-nlb.elb.amazonaws.com"))
    assert [f.id for f in found] == [E.ENDPOINT_UNKNOWN] and "alias of my-nlb" in found[0].message


def test_dns_fix_without_the_primary_instance_names_what_to_fill_in():
    obs = dns_obs("10.0.1.1", instances={PG1: inst(PG1, n=1)})
    _, found = E.evaluate("main", DNS, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), obs)
    rrs = by_id(found)[E.ENDPOINT_NOT_ON_PRIMARY].evidence["change_batch"]["Changes"][0]["ResourceRecordSet"]
    assert rrs["ResourceRecords"] == [{"Value": f"<private IP of {PG2}>"}]


# --- the split-brain finding names the node clients reach -------------------------------------------------------


def _two_primaries() -> R.Observed:
    row = {"in_recovery": False, "system_identifier": "7", "current_lsn": "0/5000000", "has_repmgr": False}
    return R.Observed(nodes={"pg1": {**row, "primary_timeline": 1}, "pg2": {**row, "primary_timeline": 2}})


@pytest.mark.parametrize(("on", "reached", "text"), [
    (PG1, ["pg1"], "Clients reach pg1 through Elastic IP eipalloc-0123456789abcdef0 (move it to pg2"),
    (PG2, ["pg2"], "Clients reach pg2 through Elastic IP eipalloc-0123456789abcdef0."),
    (None, [], "Clients reach none of them through Elastic IP eipalloc-0123456789abcdef0"),
])
def test_multiple_primaries_names_the_node_the_endpoint_reaches(on, reached, text):
    reach = E.reach(EIP, REPL, eip_obs(on))
    _, found = R.evaluate("main", REPL, _two_primaries(), endpoint_reach=reach)
    f = by_id(found)[R.REPLICATION_MULTIPLE_PRIMARIES]
    assert f.evidence["current_primary"] == "pg2" and f.evidence["endpoint_reaches"] == reached
    assert text in f.message, f.message
    assert f.evidence["endpoint"] == EIP.label


def test_multiple_primaries_without_an_endpoint_is_unchanged():
    _, found = R.evaluate("main", REPL, _two_primaries())
    f = by_id(found)[R.REPLICATION_MULTIPLE_PRIMARIES]
    assert "endpoint" not in f.evidence and "Clients reach" not in f.message


def test_state_summary_keeps_only_endpoint_findings():
    body, found = E.evaluate("main", EIP, REPL, rbody("pg2", pg1="unreachable", pg2="primary"), eip_obs(PG1))
    s = E.state_summary(body, [*found, F.Finding(id="REPLICATION_OK", severity=F.OK, message="x")])
    assert s["state"] == "not_on_primary" and s["points_at_nodes"] == ["pg1"] and s["fix"].startswith("aws ec2")
    assert {x["id"] for x in s["findings"]} == {E.ENDPOINT_NOT_ON_PRIMARY, E.OLD_PRIMARY_NOT_FENCED}
    assert E.state_summary({}) is None
