"""The cluster's endpoint and every node's instance, read from AWS for pgops.core.endpoint to judge.

``observe`` reads DescribeAddresses or route53 ListResourceRecordSets, and one DescribeInstances for every node's
instance, one client per service per call. The replication check (pgops.airflow.replication.check_cluster) calls
it in the audit; ``report_state`` gives the standby-rebuild report the endpoint's state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pgops.core import findings as F
from pgops.core.endpoint import Instance, Observation, evaluate, norm_name, state_summary
from pgops.inventory import Cluster, Endpoint

NOT_FOUND_CODES = ("InvalidAllocationID.NotFound", "InvalidAddress.NotFound", "NoSuchHostedZone",
                   "InvalidIPAddress.NotFound")

ClientFor = Callable[[str], Any]


def _code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")) or type(exc).__name__


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{_code(exc)}: {text}" if _code(exc) not in text else text


def _instance(raw: Mapping[str, Any]) -> Instance:
    private: list[str] = []
    public: list[str] = []
    names: list[str] = []

    def add(seq: list[str], value: Any) -> None:
        if value and value not in seq:
            seq.append(str(value))

    add(private, raw.get("PrivateIpAddress"))
    add(public, raw.get("PublicIpAddress"))
    add(names, norm_name(raw.get("PrivateDnsName")) or None)
    add(names, norm_name(raw.get("PublicDnsName")) or None)
    for eni in raw.get("NetworkInterfaces") or []:
        for addr in eni.get("PrivateIpAddresses") or []:
            add(private, addr.get("PrivateIpAddress"))
            add(public, (addr.get("Association") or {}).get("PublicIp"))
            add(names, norm_name((addr.get("Association") or {}).get("PublicDnsName")) or None)
            add(names, norm_name(addr.get("PrivateDnsName")) or None)
    return Instance(instance_id=raw["InstanceId"], state=(raw.get("State") or {}).get("Name", "unknown"),
                    private_ips=tuple(private), public_ips=tuple(public), dns_names=tuple(names))


def observe(cluster: Cluster, *, client_for: ClientFor | None = None) -> Observation:
    """Read the endpoint and every node's instance from AWS; never raises (a failed read is in the observation)."""
    endpoint, repl = cluster.endpoint, cluster.replication
    assert endpoint is not None and repl is not None
    if client_for is None:
        from pgops.airflow import hooks

        def client_for(service: str):
            return hooks.aws_hook(cluster.aws_conn_id, service, region_name=endpoint.region).get_conn()

    obs = Observation(region=endpoint.region)
    try:
        ec2 = client_for("ec2")
        obs.region = getattr(getattr(ec2, "meta", None), "region_name", None) or endpoint.region
    except Exception as exc:  # no such connection, bad credentials config: the audit reports it and goes on
        obs.error = obs.instances_error = _short(exc)
        return obs
    try:
        if endpoint.kind == "elastic_ip":
            _read_address(ec2, endpoint, obs)
        else:
            _read_record(client_for("route53"), endpoint, obs)
    except Exception as exc:  # botocore ClientError / EndpointConnectionError: one finding says it
        if _code(exc) in NOT_FOUND_CODES:
            obs.found = False
        else:
            obs.error = _short(exc)
    ids = sorted({n.instance_id for n in repl.nodes if n.instance_id})
    try:
        # a filter, not InstanceIds: one unknown id must not hide the others (InstanceIds fails the whole call)
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[{"Name": "instance-id", "Values": ids}])
        for page in pages:
            for reservation in page.get("Reservations") or []:
                for raw in reservation.get("Instances") or []:
                    inst = _instance(raw)
                    obs.instances[inst.instance_id] = inst
    except Exception as exc:
        obs.instances_error = _short(exc)
    return obs


def _read_address(ec2, endpoint: Endpoint, obs: Observation) -> None:
    kwargs = {"AllocationIds": [endpoint.allocation_id]} if endpoint.allocation_id else {"PublicIps": [endpoint.public_ip]}
    addresses = ec2.describe_addresses(**kwargs).get("Addresses") or []
    if not addresses:
        obs.found = False
        return
    a = addresses[0]
    obs.allocation_id, obs.public_ip = a.get("AllocationId"), a.get("PublicIp")
    obs.instance_id = a.get("InstanceId") or None
    obs.private_ip = a.get("PrivateIpAddress") if a.get("AssociationId") or a.get("NetworkInterfaceId") else None


def _read_record(route53, endpoint: Endpoint, obs: Observation) -> None:
    name = norm_name(endpoint.record_name)
    resp = route53.list_resource_record_sets(HostedZoneId=endpoint.hosted_zone_id, StartRecordName=f"{name}.",
                                             MaxItems="20")
    sets = [r for r in resp.get("ResourceRecordSets") or []
            if norm_name(r.get("Name")) == name and r.get("Type") in ("A", "AAAA", "CNAME")]
    if not sets:
        obs.found = False
        return
    first = sets[0]
    obs.record_type = first.get("Type")
    obs.ttl_s = first.get("TTL")
    obs.routing = first.get("SetIdentifier")
    if first.get("AliasTarget"):
        obs.alias = norm_name(first["AliasTarget"].get("DNSName"))
    values: list[str] = []
    for r in sets:  # every routing variant of the name: clients may reach any of them
        for rr in r.get("ResourceRecords") or []:
            if rr.get("Value") and rr["Value"] not in values:
                values.append(norm_name(rr["Value"]) if r.get("Type") == "CNAME" else rr["Value"])
    obs.values = tuple(values)


def check(cluster: Cluster, replication_body: Mapping[str, Any], *,
          client_for: ClientFor | None = None) -> tuple[dict[str, Any], list[F.Finding]]:
    """Observe and evaluate the cluster's endpoint ({} and [] when it has none)."""
    if cluster.endpoint is None or cluster.replication is None:
        return {}, []
    obs = observe(cluster, client_for=client_for)
    return evaluate(cluster.name, cluster.endpoint, cluster.replication, replication_body, obs)


def report_state(cluster: Cluster, *, primary: str | None, standby: str | None = None,
                 client_for: ClientFor | None = None) -> dict[str, Any] | None:
    """The endpoint's state for the standby-rebuild report: where it points against the primary the rebuild used.

    The report asks no node: the rebuild's primary is writable, the rebuilt node (``standby``) a standby, and
    the others of unknown role (their instances' states still say whether they are fenced).
    """
    if cluster.endpoint is None or cluster.replication is None:
        return None
    try:
        roles = {n.name: {"role": "primary" if n.name == primary else "standby" if n.name == standby else "unknown"}
                 for n in cluster.replication.nodes}
        body, found = check(cluster, {"current_primary": primary, "nodes": roles}, client_for=client_for)
        return state_summary(body, found)
    except Exception as exc:  # the report is written whatever AWS answers
        return {"endpoint": cluster.endpoint.label, "state": "unknown", "error": _short(exc)}
