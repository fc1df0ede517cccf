"""The EBS migration reaches the cluster's bucket through PgopsS3Hook: the cutover's backup_label (written before
the backup session ends, read back by a retried cutover) and the ebs-migration report, one client per hook."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from pgops.core.ebs.backup_label import backup_label_key
from pgops.inventory import load_inventory

LABEL = "START WAL LOCATION: 0/9000028 (file 000000010000000000000009)\nLABEL: mig\n"


class FakeS3:
    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}

        class NoSuchKey(Exception):
            pass

        self.exceptions = SimpleNamespace(NoSuchKey=NoSuchKey)

    def put_object(self, *, Bucket, Key, Body, ContentType=None):
        self.objects[(Bucket, Key)] = Body

    def get_object(self, *, Bucket, Key):
        if (Bucket, Key) not in self.objects:
            raise self.exceptions.NoSuchKey(Key)
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}


@pytest.fixture
def clients(monkeypatch):
    from pgops.airflow.hooks import PgopsS3Hook

    made: list[tuple[FakeS3, str | None]] = []

    def get_client_type(self, region_name=None, config=None, deferrable=False):
        made.append((FakeS3(), self.aws_conn_id))
        return made[-1][0]

    monkeypatch.setattr(PgopsS3Hook, "get_client_type", get_client_type)
    return made


def test_the_backup_label_round_trips_through_one_hook(clients):
    from pgops.airflow.operators.ebs import EbsCutoverOperator

    cluster = load_inventory().get("main")
    op = EbsCutoverOperator.__new__(EbsCutoverOperator)  # the hook cache needs no constructor arguments
    s3 = op.s3_hook(cluster.aws_conn_id)
    assert op.s3_hook(cluster.aws_conn_id) is s3  # one hook per connection for the task's life
    assert s3.read_backup_label(cluster, "run-1") is None
    key = s3.write_backup_label(cluster, "run-1", snapshots={"vol-1": "snap-1"}, backup={"backup_label": LABEL})
    assert key == backup_label_key(cluster, "run-1")
    stored = s3.read_backup_label(cluster, "run-1")
    assert stored["snapshots"] == {"vol-1": "snap-1"} and stored["backup"]["backup_label"] == LABEL
    assert s3.read_backup_label(cluster, "run-2") is None  # none stored for another migration
    assert len(clients) == 1 and clients[0][1] == cluster.aws_conn_id
    assert json.loads(clients[0][0].objects[(cluster.storage.bucket, key)])["migration_id"] == "run-1"


def test_no_operator_sensor_or_trigger_makes_its_own_s3_client():
    """Only pgops.airflow.hooks makes clients: the task code uses its hooks."""
    import re
    from pathlib import Path

    import pgops

    root = Path(pgops.__file__).parent / "airflow"
    made = re.compile(r"\bs3_client\(|\bboto3\.(client|resource|session)\b|^\s*(import boto3|from boto3\b)"
                      r"|^\s*(import psycopg2|from psycopg2\b)|\bpsycopg2\.connect\(", re.M)
    files = [path for package in ("operators", "sensors", "triggers") for path in sorted((root / package).rglob("*.py"))]
    assert len(files) >= 12, files  # the packages are where this test looks
    found = [f"{path.relative_to(root)}: {m.group(0).strip()}" for path in files for m in made.finditer(path.read_text())]
    assert found == []
