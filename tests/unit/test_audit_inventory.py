"""The inventory's optional storage.layout for the WAL audit."""

from pathlib import Path

import pytest

from pgops.inventory import InventoryError, parse_inventory


def cluster(**storage):
    return {"clusters": [{"name": "main", "postgres_conn_id": "pg", "aws_conn_id": "aws",
                          "storage": {"bucket": "pgops-lab", **storage}}]}


def test_layout_defaults_to_auto_and_accepts_known_layouts():
    assert parse_inventory(cluster(), Path("c.yaml")).get("main").storage.layout == "auto"
    assert parse_inventory(cluster(layout="pgbackrest"), Path("c.yaml")).get("main").storage.layout == "pgbackrest"


def test_unknown_layout_names_the_field_and_fix():
    with pytest.raises(InventoryError, match=r"storage: field 'layout' = 'barman'.*one of auto, barman-cloud"):
        parse_inventory(cluster(layout="barman"), Path("c.yaml"))
