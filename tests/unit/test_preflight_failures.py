"""The backup preflight when the bucket's catalog cannot be read: S3 answers 403 AccessDenied or 500 to the listing of
base/ or to a backup.info GET. The real operator runs against a real boto3 S3 client whose answers botocore's
Stubber gives: the task fails with an error a retry may mend (not AirflowFailException), makes no further S3 call,
runs no engine command, and the backup task (downstream) does not start."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import boto3
import pytest
from airflow.sdk import TriggerRule
from airflow.sdk.exceptions import AirflowFailException
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber

import pgops.airflow.operators.backup as backup
from pgops.airflow.dags.base_backup import build_base_backup_dag
from pgops.airflow.operators.backup import BackupPreflightOperator, backup_name_for_run
from pgops.airflow.operators.base import ClusterOperator
from pgops.inventory import load_inventory

RUN = "scheduled__2026-11-29T02:00:00+00:00"
CLUSTER = load_inventory().get("main")
BUCKET = CLUSTER.storage.bucket
BASE = f"{CLUSTER.storage.server_prefix}/base/"
PROBE = CLUSTER.storage.report_key("preflight", "write-probe")
ARCHIVER = {"archive_mode": "on", "archive_command": "barman-cloud-wal-archive ... %p",
            "last_archived_wal": "000000010000000000000003", "last_archived_time": datetime(2026, 11, 29, 1, tzinfo=UTC),
            "last_failed_wal": None, "last_failed_time": None, "failed_count": 0, "cluster_size_bytes": 123456}
# (operation, S3 error code, HTTP status)
_OPERATION_NAMES = {"list_objects_v2": "ListObjectsV2", "get_object": "GetObject"}
FAILURES = [("list_objects_v2", "AccessDenied", 403), ("list_objects_v2", "InternalError", 500),
            ("get_object", "AccessDenied", 403), ("get_object", "InternalError", 500)]


def _body(text: str) -> StreamingBody:
    return StreamingBody(io.BytesIO(text.encode()), len(text))


@pytest.fixture
def preflight(monkeypatch):
    """The preflight of cluster main: a healthy archiver, and an S3 hook on a real boto3 client under a Stubber.

    The stub answers the bucket checks (HEAD, the write probe's PUT and DELETE); each test queues the catalog's
    answers. An S3 call nobody queued fails the test (the Stubber refuses it), as does any engine command."""
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    stub = Stubber(client)
    stub.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stub.add_response("put_object", {}, {"Bucket": BUCKET, "Key": PROBE, "Body": ANY, "ChecksumAlgorithm": ANY})
    stub.add_response("delete_objects", {"Deleted": [{"Key": PROBE}]},
                      {"Bucket": BUCKET, "Delete": {"Objects": [{"Key": PROBE}]}})
    engine: list[list[str]] = []

    def run_engine(self, cluster, argv, **kwargs):
        engine.append(argv)
        raise AssertionError(f"an engine command ran: {argv}")

    monkeypatch.setattr(backup, "pg_query", lambda conn_id, sql, params=None: [dict(ARCHIVER)])
    monkeypatch.setattr(ClusterOperator, "run_engine", run_engine)
    op = BackupPreflightOperator(task_id="preflight", cluster_name="main")
    hook = op.s3
    hook.__dict__["conn"] = client  # S3Hook.conn is a cached_property: this is the client the hook keeps
    with stub:
        yield op, stub
    assert engine == []


def _listing(stub: Stubber, *backup_ids: str) -> None:
    stub.add_response("list_objects_v2", {"CommonPrefixes": [{"Prefix": f"{BASE}{i}/"} for i in backup_ids]},
                      {"Bucket": BUCKET, "Prefix": BASE, "Delimiter": "/"})


def _info(stub: Stubber, backup_id: str, name: str, status: str = "DONE") -> None:
    stub.add_response("get_object", {"Body": _body(f"backup_name={name}\nstatus={status}\n")},
                      {"Bucket": BUCKET, "Key": f"{BASE}{backup_id}/backup.info"})


def _fail(stub: Stubber, operation: str, code: str, status: int, key: str | None = None) -> None:
    expected = ({"Bucket": BUCKET, "Prefix": BASE, "Delimiter": "/"} if operation == "list_objects_v2"
                else {"Bucket": BUCKET, "Key": key} if key else None)
    stub.add_client_error(operation, code, "Access Denied" if status == 403 else "We encountered an internal error.",
                          status, expected_params=expected)


def _queue_failure(stub: Stubber, operation: str, code: str, status: int) -> None:
    if operation == "list_objects_v2":
        _fail(stub, operation, code, status)
    else:
        _listing(stub, "20261129T020001")
        _fail(stub, operation, code, status, key=f"{BASE}20261129T020001/backup.info")


def test_a_readable_catalog_gives_the_runs_backups(preflight):
    """The same set-up with a readable catalog: the failures below come from the S3 answers alone."""
    op, stub = preflight
    name = backup_name_for_run(RUN)
    _listing(stub, "20261129T020001")
    _info(stub, "20261129T020001", name, "FAILED")
    out = op.execute({"run_id": RUN})
    stub.assert_no_pending_responses()
    assert out["run_backups"] == [{"backup_id": "20261129T020001", "backup_name": name, "status": "FAILED"}]
    assert out["cluster_size_bytes"] == 123456


@pytest.mark.parametrize(("operation", "code", "status"), FAILURES)
def test_a_catalog_read_s3_refuses_fails_the_preflight_for_a_retry(preflight, operation, code, status):
    op, stub = preflight
    _queue_failure(stub, operation, code, status)
    with pytest.raises(RuntimeError) as err:
        op.execute({"run_id": RUN})
    assert not isinstance(err.value, AirflowFailException)  # left to the task's retries
    assert f"({code} on {_OPERATION_NAMES[operation]}:" in str(err.value)
    stub.assert_no_pending_responses()  # every answer queued was asked for, and nothing after the failure


def test_a_denied_backup_info_among_several_fails_the_preflight(preflight):
    """The backup.info files are fetched at once (threads): an error in any of them reaches the task."""
    op, stub = preflight
    _listing(stub, "20261128T020001", "20261129T020001")
    # the two GETs run at once: the first asked gets the first answer, so the keys are not pinned
    stub.add_response("get_object", {"Body": _body("backup_name=another\nstatus=DONE\n")}, None)
    stub.add_client_error("get_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(RuntimeError, match="AccessDenied on GetObject") as err:
        op.execute({"run_id": RUN})
    assert not isinstance(err.value, AirflowFailException)
    stub.assert_no_pending_responses()


@pytest.mark.parametrize(("operation", "code", "status"), FAILURES)
def test_the_catalog_read_error_names_the_cluster_and_where(preflight, operation, code, status):
    op, stub = preflight
    _queue_failure(stub, operation, code, status)
    with pytest.raises(Exception) as err:  # noqa: B017 - whatever it is, its message must say where
        op.execute({"run_id": RUN})
    text = str(err.value)
    assert CLUSTER.name in text and BUCKET in text and BASE in text, text
    assert "Fix:" in text, text


def test_no_backup_starts_after_a_failed_preflight():
    """The backup task runs only when the preflight succeeded; a failed preflight is retried first."""
    dag = build_base_backup_dag(CLUSTER)
    pre, task = dag.get_task("preflight"), dag.get_task("backup")
    assert task.upstream_task_ids == {"preflight"} and task.trigger_rule == TriggerRule.ALL_SUCCESS
    assert pre.retries >= 1
