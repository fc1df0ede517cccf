"""DB-host processes get the DB hosts' own AWS identity when the inventory names one, never the Airflow tasks'."""

from __future__ import annotations

import json

import yaml
from helpers import REPO


def _conn(key: str, secret: str) -> str:
    return json.dumps({"conn_type": "aws", "login": key, "password": secret,
                       "extra": {"region_name": "us-east-1", "endpoint_url": "http://127.0.0.1:9"}})


def test_engine_env_uses_the_dbhost_connection(tmp_path, monkeypatch):
    from pgops.airflow.operators.base import ClusterOperator
    from pgops.inventory import load_inventory

    data = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())
    data["clusters"][0]["dbhost_aws_conn_id"] = "pgops_main_dbhost_aws"
    inv = tmp_path / "clusters.yaml"
    inv.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("PGOPS_INVENTORY", str(inv))
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_MAIN_AWS", _conn("AKIATASKSREPORTS0001", "tasks-secret"))
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_MAIN_DBHOST_AWS", _conn("AKIADBHOSTWALONLY001", "dbhost-secret"))
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_MAIN_PG", json.dumps({"conn_type": "postgres", "host": "127.0.0.1",
                                                                 "port": 5432, "login": "postgres"}))
    cluster = load_inventory().get("main")
    assert cluster.engine_aws_conn_id == "pgops_main_dbhost_aws" and cluster.aws_conn_id == "pgops_main_aws"
    env = ClusterOperator(task_id="t", cluster_name="main").engine_env(cluster)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIADBHOSTWALONLY001" and env["AWS_SECRET_ACCESS_KEY"] == "dbhost-secret"
    assert "tasks-secret" not in json.dumps(env)

    data["clusters"][0].pop("dbhost_aws_conn_id")
    inv.write_text(yaml.safe_dump(data))
    cluster = load_inventory(inv).get("main")
    assert cluster.engine_aws_conn_id == "pgops_main_aws"  # the default: the tasks' own connection


def test_a_bad_dbhost_connection_id_is_refused(tmp_path):
    import pytest

    from pgops.inventory import InventoryError, parse_inventory

    data = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())
    data["clusters"][0]["dbhost_aws_conn_id"] = "bad id; rm -rf /"
    with pytest.raises(InventoryError, match="dbhost_aws_conn_id"):
        parse_inventory(data, tmp_path / "clusters.yaml")


def test_a_ca_bundle_in_the_connection_reaches_the_db_host_child(monkeypatch, tmp_path):
    from pgops.airflow.hooks import aws_child_env

    bundle = tmp_path / "ca.pem"
    conn = json.loads(_conn("AKIADBHOSTWALONLY001", "dbhost-secret"))
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_CA_AWS", json.dumps({**conn, "extra": {**conn["extra"], "verify": str(bundle)}}))
    env = aws_child_env("pgops_ca_aws")
    assert env["AWS_CA_BUNDLE"] == str(bundle) and env["AWS_ACCESS_KEY_ID"] == "AKIADBHOSTWALONLY001"
    monkeypatch.setenv("AIRFLOW_CONN_PGOPS_CA_AWS", _conn("AKIADBHOSTWALONLY001", "dbhost-secret"))
    assert "AWS_CA_BUNDLE" not in aws_child_env("pgops_ca_aws")
