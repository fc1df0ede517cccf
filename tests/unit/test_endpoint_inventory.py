"""Inventory: the cluster's endpoint (elastic_ip or dns) and each replication node's instance_id, validated like
every other field (cluster, field, value and fix in every error; hostile values refused, never a traceback)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pgops.inventory import DEFAULT_INVENTORY, InventoryError, parse_inventory

PATH = Path("/etc/pgops/clusters.yaml")
BASE = yaml.safe_load(DEFAULT_INVENTORY.read_text())["clusters"][0]
BASE = {**BASE, "name": "ep"}
BASE["replication"] = {
    "primary": {"name": "pg1", "instance_id": "i-0123456789abcdef0"},
    "standbys": [{"name": "pg2", "postgres_conn_id": "ep_pg2", "instance_id": "i-0fedcba9876543210"}],
}
EIP = {"elastic_ip": {"allocation_id": "eipalloc-0123456789abcdef0"}, "region": "us-east-1"}
DNS = {"dns": {"hosted_zone_id": "Z0123456789ABCDEFGHIJ", "record_name": "DB.Example.internal."}}


def parse(endpoint=None, **changes):
    data = copy.deepcopy(BASE)
    if endpoint is not None:
        data["endpoint"] = endpoint
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return parse_inventory({"clusters": [data]}, PATH).clusters[0]


def test_elastic_ip_and_instance_ids_parse():
    c = parse(copy.deepcopy(EIP))
    assert c.endpoint.kind == "elastic_ip" and c.endpoint.allocation_id == "eipalloc-0123456789abcdef0"
    assert c.endpoint.region == "us-east-1" and c.endpoint.label == "Elastic IP eipalloc-0123456789abcdef0"
    assert [n.instance_id for n in c.replication.nodes] == ["i-0123456789abcdef0", "i-0fedcba9876543210"]
    c = parse({"elastic_ip": {"public_ip": "203.0.113.10"}})
    assert c.endpoint.public_ip == "203.0.113.10" and c.endpoint.allocation_id is None


def test_dns_parses_and_is_normalised():
    c = parse(copy.deepcopy(DNS))
    assert (c.endpoint.kind, c.endpoint.hosted_zone_id, c.endpoint.record_name) == (
        "dns", "Z0123456789ABCDEFGHIJ", "db.example.internal")


def test_no_endpoint_and_instance_ids_are_optional():
    c = parse(replication__primary__instance_id=None)
    assert c.endpoint is None and c.replication.primary.instance_id is None
    assert parse_inventory({"clusters": [yaml.safe_load(DEFAULT_INVENTORY.read_text())["clusters"][0]]},
                           PATH).clusters[0].endpoint is None


@pytest.mark.parametrize(("endpoint", "changes", "field", "words"), [
    ({"elastic_ip": {"allocation_id": "eipalloc-0123456789abcdef0"}, "dns": DNS["dns"]}, {}, "elastic_ip or dns",
     "exactly one"),
    ({}, {}, "elastic_ip or dns", "exactly one"),
    ({"elastic_ip": {}}, {}, "allocation_id or public_ip", "is missing"),
    ({"elastic_ip": {"allocation_id": "eipalloc-0123456789abcdef0", "public_ip": "203.0.113.10"}}, {},
     "allocation_id or public_ip", "are both given"),
    ({"elastic_ip": {"allocation_id": "eip-123"}}, {}, "allocation_id", "eipalloc-0123456789abcdef0"),
    ({"elastic_ip": {"public_ip": "203.0.113.300"}}, {}, "public_ip", "dotted IPv4"),
    ({"elastic_ip": {"allocation_id": "eipalloc-0123456789abcdef0", "instance": "i-1"}}, {}, "instance",
     "unknown field(s) instance"),
    ({"dns": {"record_name": "db.example.com"}}, {}, "hosted_zone_id", "is missing"),
    ({"dns": {"hosted_zone_id": "/hostedzone/Z1", "record_name": "db.example.com"}}, {}, "hosted_zone_id",
     "without /hostedzone/"),
    ({"dns": {"hosted_zone_id": "Z1", "record_name": "db..example.com"}}, {}, "record_name", "fully qualified"),
    ({"dns": "db.example.com"}, {}, "dns", "is not a mapping"),
    ("eipalloc-0123456789abcdef0", {}, "endpoint", "is not a mapping"),
    ({**EIP, "region": "Mars"}, {}, "region", "us-east-1"),
    (EIP, {"replication": None}, "elastic_ip", "needs a replication section"),
    (EIP, {"replication__standbys": []}, "elastic_ip", "needs a replication section"),
    (EIP, {"replication__standbys__0__instance_id": None}, "instance_id", "pg2"),
    (EIP, {"replication__standbys__0__instance_id": "i-0123456789abcdef0"}, "instance_id", "twice"),
    (None, {"replication__primary__instance_id": "i-XYZ"}, "instance_id", "i-0123456789abcdef0"),
    (None, {"replication__primary__instance_id": "i-0123456"}, "instance_id", "EC2 instance id"),
])
def test_bad_endpoint_fields_name_cluster_field_value_and_fix(endpoint, changes, field, words):
    with pytest.raises(InventoryError) as err:
        parse(copy.deepcopy(endpoint) if isinstance(endpoint, dict) else endpoint, **changes)
    text = str(err.value)
    assert "cluster 'ep'" in text and field in text and "Fix:" in text and words in text, text
    assert f"'{field}'" in text or "unknown field" in text, text


HOSTILE = [1, -1, 10**30, 1e308, float("nan"), True, [], ["a"], {"a": 1}, "", "..", "../../etc", "a\nb", "a\x00b",
           "ŝérvér", "🙂", "a" * 5000, "$(id)", "a b", "-rf", "i-0123456789abcdef0\n", "eipalloc-0123456789abcdef0 x"]
FIELDS = {
    "allocation_id": lambda v: {"endpoint": {"elastic_ip": {"allocation_id": v}}},
    "public_ip": lambda v: {"endpoint": {"elastic_ip": {"public_ip": v}}},
    "hosted_zone_id": lambda v: {"endpoint": {"dns": {"hosted_zone_id": v, "record_name": "db.example.com"}}},
    "record_name": lambda v: {"endpoint": {"dns": {"hosted_zone_id": "Z1", "record_name": v}}},
    "region": lambda v: {"endpoint": {**EIP, "region": v}},
    "instance_id": lambda v: {"replication__primary__instance_id": v},
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_each_new_field_refuses_hostile_values_with_a_named_error(field):
    for value in HOSTILE:
        spec = FIELDS[field](value)
        endpoint = spec.pop("endpoint", EIP if field == "instance_id" else None)
        try:
            parse(copy.deepcopy(endpoint), **spec)
        except InventoryError as exc:
            text = str(exc)
            assert "Fix:" in text and field in text and "cluster 'ep'" in text, (field, value, text)
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{field} = {value!r}: {type(exc).__name__}: {exc} (not an InventoryError)")
        pytest.fail(f"{field} = {value!r} was accepted")
