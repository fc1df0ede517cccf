"""One boto3 client per PgopsS3Hook, and one hook per publisher: the triggers' progress records, the dashboard's
report source and the deployment's bucket set-up reuse their client instead of making one per call."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import pytest

from pgops.airflow import progress
from pgops.inventory import load_inventory

LOG = logging.getLogger("test")


class FakeS3:
    """The few S3 calls the hook's methods make, in memory."""

    def __init__(self, buckets=()):
        self.objects: dict[tuple[str, str], bytes] = {}
        self.buckets = list(buckets)
        self.fail_puts = 0

        class NoSuchKey(Exception):
            pass

        self.exceptions = SimpleNamespace(NoSuchKey=NoSuchKey)

    def put_object(self, *, Bucket, Key, Body, ContentType=None):
        if self.fail_puts:
            self.fail_puts -= 1
            raise RuntimeError("An error occurred (ExpiredToken) when calling the PutObject operation")
        self.objects[(Bucket, Key)] = Body

    def get_object(self, *, Bucket, Key):
        if (Bucket, Key) not in self.objects:
            raise self.exceptions.NoSuchKey(Key)
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def get_paginator(self, name):
        assert name == "list_objects_v2", name
        objects = self.objects

        def paginate(*, Bucket, Prefix):
            yield {"Contents": [{"Key": k, "Size": len(v)} for (b, k), v in sorted(objects.items())
                                if b == Bucket and k.startswith(Prefix)]}

        return SimpleNamespace(paginate=paginate)

    def list_buckets(self):
        return {"Buckets": [{"Name": b} for b in self.buckets]}

    def create_bucket(self, *, Bucket):
        self.buckets.append(Bucket)


@pytest.fixture
def clients(monkeypatch):
    """Every boto3 client a PgopsS3Hook makes (the hook's own ``conn`` path, only the client is a fake)."""
    from pgops.airflow.hooks import PgopsS3Hook

    made: list[tuple[FakeS3, str | None]] = []

    def get_client_type(self, region_name=None, config=None, deferrable=False):
        client = FakeS3()
        made.append((client, self.aws_conn_id))
        return client

    monkeypatch.setattr(PgopsS3Hook, "get_client_type", get_client_type)
    monkeypatch.setattr(progress, "_PUBLISHERS", {})
    return made


def _record(n: int) -> dict:
    return {"kind": "restore", "what": "replay", "run_id": "r", "state": "running", "elapsed_s": float(n)}


def test_one_publisher_writes_every_record_through_one_client(clients):
    cluster = load_inventory().get("main")
    for n in range(5):
        progress.publish_for_cluster("main", "restore", _record(n), LOG)
    assert len(clients) == 1 and clients[0][1] == cluster.aws_conn_id
    body = clients[0][0].objects[(cluster.storage.bucket, progress.progress_key(cluster, "restore"))]
    assert json.loads(body)["elapsed_s"] == 4.0
    assert progress.cluster_publisher("main", "restore") is progress.cluster_publisher("main", "restore")

    progress.publish_for_cluster("main", "migration", {**_record(0), "kind": "migration"}, LOG)
    assert len(clients) == 2  # another kind, another publisher
    progress.publish_for_cluster(None, "restore", _record(9), LOG)  # no cluster: logged only
    assert len(clients) == 2


def test_a_failed_write_or_an_old_client_makes_a_new_one(clients, caplog):
    now = [0.0]
    publisher = progress.ClusterPublisher("main", "restore", refresh_s=100.0, clock=lambda: now[0])
    publisher(_record(0), LOG)
    clients[0][0].fail_puts = 1
    with caplog.at_level(logging.INFO, logger="test"):
        publisher(_record(1), LOG)  # never raises: logged, and the next record gets a fresh client
    assert "progress not published (An error occurred (ExpiredToken)" in caplog.text
    publisher(_record(2), LOG)
    publisher(_record(3), LOG)
    assert len(clients) == 2
    now[0] = 100.0
    publisher(_record(4), LOG)
    assert len(clients) == 3


def test_a_changed_inventory_is_read_again(clients, monkeypatch, tmp_path):
    from pgops.inventory import DEFAULT_INVENTORY, INVENTORY_ENV

    moved = tmp_path / "clusters.yaml"
    moved.write_text(DEFAULT_INVENTORY.read_text().replace("bucket: pgops-lab", "bucket: pgops-lab-moved", 1))
    publisher = progress.ClusterPublisher("main", "restore")
    publisher(_record(0), LOG)
    publisher(_record(1), LOG)
    monkeypatch.setenv(INVENTORY_ENV, str(moved))
    publisher(_record(2), LOG)
    assert len(clients) == 2
    buckets = [{b for (b, _) in client.objects} for client, _ in clients]
    assert buckets[1] == {load_inventory(moved).get("main").storage.bucket} and buckets[0] != buckets[1]


def test_a_cluster_missing_from_the_inventory_is_logged_not_raised(clients, caplog):
    with caplog.at_level(logging.INFO, logger="test"):
        progress.publish_for_cluster("no-such-cluster", "restore", _record(0), LOG)
    assert "progress not published" in caplog.text and clients == []


def test_the_triggers_progress_records_share_one_client(clients):
    from pgops.airflow.triggers.ebs import EbsSnapshotCompletedTrigger
    from pgops.airflow.triggers.restore import RecoveryEndedTrigger

    recovery = RecoveryEndedTrigger(cluster_name="main", data_dir="/d", socket_dir="/s", port=5432, user="postgres",
                                    pid=1, log_file="/l", progress={"run_id": "r", "what": "replay", "target": "latest"})
    for n in range(3):
        recovery._report([("t", f"0/{n}000000")], n, float(n))
    snapshots = EbsSnapshotCompletedTrigger(snapshot_ids=["snap-1"], aws_conn_id=None,
                                            progress={"cluster": "main", "run_id": "r", "round": 1})
    for pct in ("10%", "50%", "90%"):
        snapshots._report([{"SnapshotId": "snap-1", "State": "pending", "Progress": pct}])
    assert len(clients) == 2  # one per kind (restore, migration), each reused for its three records
    cluster = load_inventory().get("main")
    written = {k for client, _ in clients for (_, k) in client.objects}
    assert written == {progress.progress_key(cluster, "restore"), progress.progress_key(cluster, "migration")}


def test_the_report_source_keeps_one_hook_per_connection(clients):
    from pgops.airflow.ui.data import ReportSource

    cluster = load_inventory().get("main")
    source = ReportSource(ttl_s=0.0)
    assert source.latest(cluster, "backup") is None and source.history(cluster, "backup", 5) == []
    assert source.progress(cluster, "backup") is None
    hook = source.hook(cluster.aws_conn_id)
    progress.bucket_publisher(hook.conn, cluster, "backup")({"kind": "backup", "state": "running"})
    assert source.progress(cluster, "backup") == {"kind": "backup", "state": "running"}
    assert source.hook(cluster.aws_conn_id) is hook and len(clients) == 1


def test_the_deployment_makes_missing_buckets_with_one_hook_per_connection(clients, monkeypatch):
    from pgops.airflow import deploy

    inventory = load_inventory()
    made = deploy.create_buckets(inventory)
    buckets = list(dict.fromkeys(c.storage.bucket for c in inventory.clusters))
    assert made == buckets
    assert len(clients) == len({c.aws_conn_id for c in inventory.clusters})
    assert sorted(b for client, _ in clients for b in client.buckets) == sorted(buckets)
