"""Inventory validation: every bad input gets a message naming the cluster, the field and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pgops.inventory import DEFAULT_INVENTORY, InventoryError, load_inventory, parse_inventory

BASE = yaml.safe_load(DEFAULT_INVENTORY.read_text())


def _with(path: str, value) -> dict:
    data = copy.deepcopy(BASE)
    node = data["clusters"][0]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


_DELETE = object()


def test_example_inventory_is_valid():
    inv = load_inventory(DEFAULT_INVENTORY)
    main = inv.get("main")
    assert main.storage.destination_url == "s3://pgops-lab/clusters"
    assert main.storage.server_prefix == "clusters/main"
    assert main.runner.queue == "dbhost_main" and main.pool == "pgops_main"
    assert main.engine.bin("barman-cloud-backup").endswith("/bin/barman-cloud-backup")


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("name", "Main-DB", r"cluster.*field 'name' = 'Main-DB' is not valid\. Fix: use lower-case letters"),
    ("storage.bucket", "My_Bucket", r"cluster 'main': storage: field 'bucket' = 'My_Bucket' is not valid\. Fix: use an S3 bucket name"),
    ("storage.prefix", "s3://pgops-lab/x", r"field 'prefix' = 's3://pgops-lab/x' is a URL\. Fix: give only the key prefix"),
    ("engine.compression", "zstd", r"cluster 'main': engine: field 'compression' = 'zstd' is not a known value\. Fix: use one of gzip, bzip2, lz4, snappy, none"),
    ("engine.jobs", 0, r"field 'jobs' = 0 is out of range\. Fix: use a number between 1 and 64"),
    ("engine.jobs", "two", r"field 'jobs' = 'two' is not an integer"),
    ("runner.kind", "ssm", r"cluster 'main': runner: field 'kind' = 'ssm' is not a known value\. Fix: use one of local, ssh"),
    ("runner.kind", "ssh", r"field 'ssh_conn_id' = None is required when kind is ssh"),
    ("schedule.backup", "every night", r"field 'backup' = 'every night' is not a cron expression\. Fix: use five cron fields"),
    ("schedule.timezone", "Mars/Olympus", r"field 'timezone' = 'Mars/Olympus' is not a known time zone"),
    ("retention.policy", "KEEP 7 DAYS", r"field 'policy' = 'KEEP 7 DAYS' is not a barman retention policy\. Fix: write 'RECOVERY WINDOW OF 7 DAYS'"),
    ("alerts.sns_topic_arn", "pgops-alerts", r"cluster 'main': alerts: field 'sns_topic_arn' = 'pgops-alerts' is not valid\. Fix: use an SNS topic ARN"),
    ("postgres_conn_id", _DELETE, r"cluster 'main': field 'postgres_conn_id' is missing\. Fix: add 'postgres_conn_id:'"),
    ("storage.bukcet", "x", r"cluster 'main': storage: unknown field\(s\) bukcet\. Fix: remove them or correct the spelling"),
])
def test_bad_field_names_cluster_field_and_fix(path, value, expected):
    with pytest.raises(InventoryError, match=expected):
        parse_inventory(_with(path, value), Path("clusters.yaml"))


def test_duplicate_names_and_shared_prefix_are_rejected():
    data = copy.deepcopy(BASE)
    data["clusters"].append(copy.deepcopy(data["clusters"][0]))
    with pytest.raises(InventoryError, match=r"field 'name' is used twice \(clusters\[0\] and clusters\[1\]\)"):
        parse_inventory(data, Path("c.yaml"))
    data["clusters"][1]["name"] = "other"
    with pytest.raises(InventoryError, match=r"storage s3://pgops-lab/clusters/main is also used by cluster 'main'"):
        parse_inventory(data, Path("c.yaml"))


def test_file_level_errors(tmp_path):
    with pytest.raises(InventoryError, match="does not exist. Fix: set PGOPS_INVENTORY"):
        load_inventory(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n  - name: x\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory(bad)
    bad.write_text("servers: []\n")
    with pytest.raises(InventoryError, match="'clusters:'"):
        load_inventory(bad)


def test_env_defaults_expand(monkeypatch):
    monkeypatch.setenv("PGOPS_DBHOST_VENV", "/srv/tools")
    assert load_inventory(DEFAULT_INVENTORY).get("main").engine.bin_dir == "/srv/tools/bin"
    monkeypatch.delenv("PGOPS_DBHOST_VENV")
    assert load_inventory(DEFAULT_INVENTORY).get("main").engine.bin_dir == "/opt/pgops/dbhost-venv/bin"
