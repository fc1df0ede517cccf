"""Where clients write after a failover: the cluster's endpoint against the current primary, and the old primary's fence.

The field report's failover: repmgrd on the standby stops the old primary's instance through the EC2 API and takes
over the Elastic IP that clients connect to. Two things decide whether clients then write to the right place: the
endpoint (an Elastic IP, or a Route 53 record) reaches the current primary's instance, and the old primary is
fenced (its instance stopped). ``evaluate`` judges both from plain values: an ``Observation`` of the endpoint and
of every node's instance, which pgops.airflow.endpoint reads from AWS.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgops.core import findings as F
from pgops.core.replication import REBUILD_DAG_PREFIX
from pgops.inventory import Endpoint, Replication

# Finding ids (stable once published)
ENDPOINT_OK = "ENDPOINT_OK"
ENDPOINT_NOT_ON_PRIMARY = "ENDPOINT_NOT_ON_PRIMARY"
ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
ENDPOINT_UNKNOWN = "ENDPOINT_UNKNOWN"
OLD_PRIMARY_FENCED = "OLD_PRIMARY_FENCED"
OLD_PRIMARY_NOT_FENCED = "OLD_PRIMARY_NOT_FENCED"
OLD_PRIMARY_FENCING_UNKNOWN = "OLD_PRIMARY_FENCING_UNKNOWN"

# An instance in one of these states runs no PostgreSQL: the node is fenced.
FENCED_STATES = ("stopping", "stopped", "shutting-down", "terminated")
DEFAULT_TTL_S = 60


@dataclass(frozen=True)
class Instance:
    """An EC2 instance as DescribeInstances shows it: its state and every address a client could reach it by."""

    instance_id: str
    state: str
    private_ips: tuple[str, ...] = ()
    public_ips: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()


@dataclass
class Observation:
    """What AWS answered about the endpoint and the nodes' instances, or why it could not."""

    region: str | None = None
    found: bool = True  # False: the Elastic IP, the hosted zone or the record does not exist
    error: str | None = None  # the endpoint could not be read (denied, unreachable)
    # elastic_ip (DescribeAddresses)
    allocation_id: str | None = None
    public_ip: str | None = None
    instance_id: str | None = None  # the instance the address is associated with (None: not associated)
    private_ip: str | None = None
    # dns (ListResourceRecordSets)
    record_type: str | None = None
    values: tuple[str, ...] = ()
    ttl_s: int | None = None
    alias: str | None = None  # an alias record's target: not an instance address pgops can map
    routing: str | None = None  # a weighted/failover/latency record's SetIdentifier
    # DescribeInstances of every node's instance (a missing id: the instance does not exist any more)
    instances: dict[str, Instance] = field(default_factory=dict)
    instances_error: str | None = None


def norm_name(name: str | None) -> str:
    """A DNS name as compared: lower case, no trailing dot, Route 53's escaped \\052 as '*'."""
    return (name or "").replace("\\052", "*").rstrip(".").lower()


def points_at(endpoint: Endpoint, repl: Replication, obs: Observation) -> dict[str, Any]:
    """The instances and nodes the endpoint reaches ({"instances": [...], "nodes": [...], "values": [...]})."""
    by_instance = {n.instance_id: n.name for n in repl.nodes if n.instance_id}
    instances: list[str] = []
    values: list[str] = []
    if endpoint.kind == "elastic_ip":
        if obs.instance_id:
            instances = [obs.instance_id]
        elif obs.private_ip:  # associated with a network interface only: find the instance by its address
            instances = [i.instance_id for i in obs.instances.values() if obs.private_ip in i.private_ips]
        values = [v for v in (obs.public_ip,) if v]
    else:
        values = list(obs.values)
        for value in values:
            for inst in obs.instances.values():
                if value in inst.private_ips or value in inst.public_ips or norm_name(value) in inst.dns_names:
                    if inst.instance_id not in instances:
                        instances.append(inst.instance_id)
    nodes = [by_instance[i] for i in instances if i in by_instance]
    unmapped = [v for v in values if endpoint.kind == "dns" and not any(
        v in i.private_ips or v in i.public_ips or norm_name(v) in i.dns_names for i in obs.instances.values()
        if i.instance_id in by_instance)]
    return {"instances": instances, "nodes": nodes, "values": values, "unmapped_values": unmapped}


def reach(endpoint: Endpoint, repl: Replication, obs: Observation) -> dict[str, Any] | None:
    """For the split-brain finding: which nodes clients reach through the endpoint (None when it cannot be read)."""
    if obs.error or not obs.found:
        return None
    return {"endpoint": endpoint.label, **points_at(endpoint, repl, obs)}


def associate_command(endpoint: Endpoint, obs: Observation, instance_id: str) -> str:
    """The aws CLI line that moves the Elastic IP to the instance."""
    allocation = obs.allocation_id or endpoint.allocation_id
    argv = ["aws", "ec2", "associate-address"]
    argv += ["--allocation-id", allocation] if allocation else ["--public-ip", obs.public_ip or endpoint.public_ip or ""]
    argv += ["--instance-id", instance_id, "--allow-reassociation"]
    region = endpoint.region or obs.region
    if region:
        argv += ["--region", region]
    return shlex.join(argv)


def record_change(endpoint: Endpoint, obs: Observation, primary: Instance | None, primary_instance_id: str,
                  cluster_name: str, primary_name: str) -> tuple[dict[str, Any], str]:
    """The Route 53 change batch that points the record at the primary's instance, and the CLI line that sends it."""
    rtype = obs.record_type if obs.record_type in ("A", "CNAME") else "A"
    public = any(v in i.public_ips for v in obs.values for i in obs.instances.values())
    if rtype == "CNAME":
        value = (primary.dns_names[0] if primary and primary.dns_names else f"<private DNS name of {primary_instance_id}>")
    elif public:
        value = primary.public_ips[0] if primary and primary.public_ips else f"<public IP of {primary_instance_id}>"
    else:
        value = primary.private_ips[0] if primary and primary.private_ips else f"<private IP of {primary_instance_id}>"
    rrset: dict[str, Any] = {"Name": f"{endpoint.record_name}.", "Type": rtype, "TTL": obs.ttl_s or DEFAULT_TTL_S,
                             "ResourceRecords": [{"Value": value}]}
    batch = {"Comment": f"pgops: {endpoint.record_name} follows the primary of {cluster_name} ({primary_name})",
             "Changes": [{"Action": "UPSERT", "ResourceRecordSet": rrset}]}
    cli = shlex.join(["aws", "route53", "change-resource-record-sets", "--hosted-zone-id",
                      endpoint.hosted_zone_id or "", "--change-batch", json.dumps(batch, separators=(",", ":"))])
    return batch, cli


def stop_command(instance_id: str, region: str | None) -> str:
    return shlex.join(["aws", "ec2", "stop-instances", "--instance-ids", instance_id,
                       *(["--region", region] if region else [])])


def evaluate(cluster_name: str, endpoint: Endpoint, repl: Replication, replication_body: Mapping[str, Any],
             obs: Observation) -> tuple[dict[str, Any], list[F.Finding]]:
    """The endpoint section of the report and its findings (pure).

    ``replication_body`` is pgops.core.replication.evaluate's body: the current primary and each node's role
    (primary / standby / unreachable) as PostgreSQL answered.
    """
    out: list[F.Finding] = []
    label = endpoint.label
    region = endpoint.region or obs.region
    primary_name = replication_body.get("current_primary")
    roles = {k: (v or {}).get("role") for k, v in (replication_body.get("nodes") or {}).items()}
    by_name = {n.name: n for n in repl.nodes}
    primary_node = by_name.get(primary_name) if primary_name else None
    primary_instance = primary_node.instance_id if primary_node else None
    target = points_at(endpoint, repl, obs)
    body: dict[str, Any] = {
        "kind": endpoint.kind, "endpoint": label, "region": region,
        "allocation_id": obs.allocation_id or endpoint.allocation_id, "public_ip": obs.public_ip or endpoint.public_ip,
        "hosted_zone_id": endpoint.hosted_zone_id, "record_name": endpoint.record_name,
        "record_type": obs.record_type, "values": list(obs.values) if endpoint.kind == "dns" else target["values"],
        "points_at_instances": target["instances"], "points_at_nodes": target["nodes"],
        "current_primary": primary_name, "primary_instance": primary_instance,
        "nodes": {n.name: {"instance_id": n.instance_id, "role": roles.get(n.name),
                           "instance_state": obs.instances[n.instance_id].state
                           if n.instance_id in obs.instances else ("unknown" if obs.instances_error else "not found")}
                  for n in repl.nodes},
        "state": "unknown", "fix": None, "old_primaries": {},
    }

    where = _describe_target(endpoint, repl, obs, target, cluster_name)
    if obs.error:
        out.append(F.Finding(
            id=ENDPOINT_UNKNOWN, severity=F.WARNING,
            message=f"{label} of {cluster_name} cannot be read ({obs.error}): whether clients reach the primary is "
                    "unknown",
            evidence={"endpoint": label, "error": obs.error, "region": region},
            fix=("grant ec2:DescribeAddresses and ec2:DescribeInstances" if endpoint.kind == "elastic_ip" else
                 "grant route53:ListResourceRecordSets and ec2:DescribeInstances")
                + " to the audit's AWS connection (include/iam/pgops-airflow-policy.json), and check the endpoint's "
                  "region in the inventory"))
    elif not obs.found:
        body["state"] = "not_found"
        out.append(F.Finding(
            id=ENDPOINT_NOT_FOUND, severity=F.CRITICAL,
            message=f"{label} of {cluster_name} does not exist"
                    + (f" in region {region}" if region and endpoint.kind == "elastic_ip" else "")
                    + ": clients cannot reach the primary through it",
            evidence={"endpoint": label, "region": region, "record_type": obs.record_type},
            fix="correct 'endpoint' in the inventory (allocation id, address, hosted zone, record name or region), or "
                "create it and point it at the primary's instance"
                + (f" {primary_instance}" if primary_instance else "")))
    elif primary_name is None:
        out.append(F.Finding(
            id=ENDPOINT_UNKNOWN, severity=F.WARNING,
            message=f"{label} of {cluster_name} points at {where}, but no node is a reachable primary: which node it "
                    "should reach is unknown",
            evidence={"endpoint": label, "points_at_instances": target["instances"],
                      "points_at_nodes": target["nodes"]},
            fix="restore a primary first (see REPLICATION_NO_PRIMARY); then the audit checks the endpoint again"))
    elif obs.alias:
        out.append(F.Finding(
            id=ENDPOINT_UNKNOWN, severity=F.WARNING,
            message=f"{label} of {cluster_name} is an alias of {obs.alias}: pgops cannot tell which instance it "
                    f"reaches; the primary is {primary_name} ({primary_instance})",
            evidence={"endpoint": label, "alias": obs.alias, "current_primary": primary_name,
                      "primary_instance": primary_instance},
            fix="make the record an A record of the primary's address, or check the alias target by hand"))
    else:
        on_primary = target["instances"] == [primary_instance] and not target["unmapped_values"]
        body["state"] = "on_primary" if on_primary else "not_on_primary"
        if on_primary:
            out.append(F.Finding(
                id=ENDPOINT_OK, severity=F.OK,
                message=f"{label} of {cluster_name} reaches the primary {primary_name} ({primary_instance})",
                evidence={"endpoint": label, "current_primary": primary_name, "instance": primary_instance,
                          "values": body["values"]}))
        else:
            evidence: dict[str, Any] = {
                "endpoint": label, "points_at_instances": target["instances"], "points_at_nodes": target["nodes"],
                "values": body["values"], "current_primary": primary_name, "primary_instance": primary_instance,
                "region": region}
            if endpoint.kind == "elastic_ip":
                fix = associate_command(endpoint, obs, primary_instance or "<instance of the primary>")
                evidence["command"] = fix
            else:
                batch, fix = record_change(endpoint, obs, obs.instances.get(primary_instance or ""),
                                           primary_instance or "", cluster_name, primary_name)
                evidence.update(change_batch=batch, command=fix)
                if obs.routing:
                    evidence["set_identifier"] = obs.routing
            body["fix"] = fix
            writable = [n for n in target["nodes"] if roles.get(n) == "primary" and n != primary_name]
            out.append(F.Finding(
                id=ENDPOINT_NOT_ON_PRIMARY, severity=F.CRITICAL,
                message=f"{label} of {cluster_name} points at {where}"
                        + f", not at the current primary {primary_name} ({primary_instance}): clients "
                        + (f"write to {', '.join(writable)}, whose writes are lost to the cluster" if writable else
                           "do not reach the primary")
                        + f". Fix: {fix}",
                evidence=evidence, fix=fix))

    out.extend(_fencing(cluster_name, repl, roles, primary_name, obs, target, body, region))
    return body, out


def _describe_target(endpoint: Endpoint, repl: Replication, obs: Observation, target: Mapping[str, Any],
                     cluster_name: str) -> str:
    """'instance i-1 (pg1)', 'no instance', or for a record '10.0.1.5 (instance i-1, pg1), 10.0.9.9 (no node)'."""
    def inst_text(i: str) -> str:
        return f"instance {i} ({_node_of(i, repl) or 'no node of ' + cluster_name})"

    if endpoint.kind == "elastic_ip":
        return ", ".join(inst_text(i) for i in target["instances"]) or "no instance (it is not associated)"
    parts = []
    for v in target["values"]:
        owners = [i.instance_id for i in obs.instances.values()
                  if v in i.private_ips or v in i.public_ips or norm_name(v) in i.dns_names]
        parts.append(f"{v} ({', '.join(inst_text(i) for i in owners) or 'no node of ' + cluster_name})")
    return ", ".join(parts) or "no value"


def _node_of(instance_id: str, repl: Replication) -> str | None:
    for n in repl.nodes:
        if n.instance_id == instance_id:
            return n.name
    return None


def _fencing(cluster_name: str, repl: Replication, roles: Mapping[str, Any], primary_name: str | None,
             obs: Observation, target: Mapping[str, Any], body: dict[str, Any], region: str | None) -> list[F.Finding]:
    """After a failover: is every old primary (the inventory's primary, or any other writable node) fenced?"""
    if primary_name is None:
        return []
    out: list[F.Finding] = []
    rebuild = f"{REBUILD_DAG_PREFIX}{cluster_name}"
    for n in repl.nodes:
        role = roles.get(n.name)
        if n.name == primary_name or not (role == "primary" or (n.name == repl.primary.name and role != "standby")):
            continue  # the primary itself, a standby (a rebuilt old primary is one again), or never a primary
        inst = obs.instances.get(n.instance_id or "")
        writable = role == "primary"
        reached = n.name in target["nodes"]
        state = inst.state if inst else ("unknown" if obs.instances_error else "not found")
        entry = {"instance_id": n.instance_id, "instance_state": state, "role": role, "writable": writable,
                 "endpoint_reaches": reached, "fenced": None}
        body["old_primaries"][n.name] = entry
        ev = {"node": n.name, "instance_id": n.instance_id, "instance_state": state, "postgres_role": role,
              "current_primary": primary_name, "endpoint_reaches_it": reached, "region": region}
        stop = stop_command(n.instance_id or "<instance id>", region)
        if obs.instances_error:
            out.append(F.Finding(
                id=OLD_PRIMARY_FENCING_UNKNOWN, severity=F.CRITICAL if writable else F.WARNING,
                message=f"the old primary {n.name} of {cluster_name} is {_role_text(role)}; its instance "
                        f"{n.instance_id} cannot be read ({obs.instances_error}): whether it is fenced is unknown",
                evidence={**ev, "error": obs.instances_error},
                fix="grant ec2:DescribeInstances to the audit's AWS connection; check the instance by hand"))
            continue
        fenced_state = inst is None or inst.state in FENCED_STATES
        if fenced_state and not writable:
            entry["fenced"] = True
            out.append(F.Finding(
                id=OLD_PRIMARY_FENCED, severity=F.OK,
                message=f"the old primary {n.name} of {cluster_name} is fenced: its instance {n.instance_id} is "
                        f"{state}" + ("" if role == "unreachable" else f" and PostgreSQL is {_role_text(role)}"),
                evidence=ev,
                fix=f"rebuild {n.name} as a standby of {primary_name} with {rebuild} (start its instance first)"))
            continue
        entry["fenced"] = False
        if writable and fenced_state:
            # PostgreSQL answers as a primary through the node's connection, yet its instance is not running
            out.append(F.Finding(
                id=OLD_PRIMARY_NOT_FENCED, severity=F.CRITICAL,
                message=f"{n.name} of {cluster_name} still accepts writes although its instance {n.instance_id} is "
                        f"{state}: the inventory's instance_id is not the instance {n.name} runs on, so the fence "
                        "missed it",
                evidence=ev,
                fix=f"find the instance {n.name} really runs on, correct replication instance_id in the inventory, "
                    f"and stop that instance (aws ec2 stop-instances --instance-ids <its id>)"))
        elif writable:
            out.append(F.Finding(
                id=OLD_PRIMARY_NOT_FENCED, severity=F.CRITICAL,
                message=f"the old primary {n.name} of {cluster_name} is not fenced: its instance {n.instance_id} is "
                        f"{state} and PostgreSQL accepts writes on it"
                        + (", and the endpoint sends clients to it" if reached else "")
                        + f" (split brain with {primary_name}). Fix: {stop}",
                evidence={**ev, "command": stop},
                fix=f"{stop}; then rebuild {n.name} as a standby of {primary_name} with {rebuild}"))
        else:
            out.append(F.Finding(
                id=OLD_PRIMARY_NOT_FENCED, severity=F.WARNING,
                message=f"the old primary {n.name} of {cluster_name} "
                        + ("does not answer" if role == "unreachable" else f"is {_role_text(role)}")
                        + f", but its instance {n.instance_id} is {state}: a restart of its PostgreSQL (a reboot, "
                          "systemd) can make it writable again"
                        + (" behind the endpoint" if reached else ""),
                evidence={**ev, "command": stop},
                fix=f"{stop} until it is rebuilt as a standby of {primary_name} ({rebuild})"))
    return out


def _role_text(role: Any) -> str:
    return {"primary": "writable", "standby": "a standby", "unreachable": "not answering"}.get(
        role, "of unknown state (not asked)")


def state_summary(body: Mapping[str, Any] | None, findings: Sequence[F.Finding | Mapping[str, Any]] = ()) -> dict[str, Any] | None:
    """A small view of the endpoint section for other reports (the standby rebuild) and the dashboard."""
    if not body:
        return None
    ids = [(f.id, f.severity) if isinstance(f, F.Finding) else (f.get("id"), f.get("severity")) for f in findings]
    return {"endpoint": body.get("endpoint"), "state": body.get("state"), "points_at_nodes": body.get("points_at_nodes"),
            "points_at_instances": body.get("points_at_instances"), "current_primary": body.get("current_primary"),
            "fix": body.get("fix"), "old_primaries": body.get("old_primaries"),
            "findings": [{"id": i, "severity": s} for i, s in ids
                         if i and (str(i).startswith(("ENDPOINT_", "OLD_PRIMARY_")))]}
