"""The restore verification's and the standby rebuild's data flow without a server: each step gets the values of
the steps before it as arguments the factory templates (rendered as native objects, None when the upstream task
pushed nothing), the reports read every step's value and error from one mapping; PgopsS3Hook keeps one client and
the end-WAL trigger one hook per run."""

from __future__ import annotations

import asyncio
import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.airflow.dags.standby_rebuild import build_standby_rebuild_dag
from pgops.airflow.operators.base import as_mapping
from pgops.airflow.operators.restore import step_outcomes
from pgops.inventory import load_inventory

PLAN = {"data_dir": "/var/tmp/pgops-restore/x/data", "port": 54321, "backup_id": "20261129T010000",
        "target": {"kind": "latest", "value": None}}
STARTED = {"pid": 4242, "restore_started_at": "2026-11-29T01:00:00+00:00"}


class FakeTI:
    def __init__(self, xcom: dict):
        self.xcom = xcom
        self.pulls: list[tuple[str, str]] = []

    def xcom_pull(self, task_ids, key="return_value"):
        self.pulls.append((task_ids, key))
        return self.xcom.get((task_ids, key))


def _rendered(dag, task_id: str, xcom: dict, **params):
    task = dag.get_task(task_id).prepare_for_execution()  # a copy, as a task instance renders
    ti = FakeTI(xcom)
    task.render_template_fields({"ti": ti, "task_instance": ti, "params": {**dag.params, **params}})
    return task, ti


def test_restore_steps_get_the_plan_and_the_started_instance_as_objects():
    dag = build_restore_verify_dag(load_inventory().get("main"))
    assert dag.render_template_as_native_obj
    xcom = {("setup", "return_value"): PLAN, ("restore", "return_value"): STARTED}
    wait, _ = _rendered(dag, "wait_recovery", xcom)
    assert wait.plan == PLAN and wait.started == STARTED and wait.planned() == PLAN
    assert wait.started_instance() == STARTED
    for task_id in ("restore", "checks", "teardown"):
        assert _rendered(dag, task_id, xcom)[0].plan == PLAN
    canary = {"id": 7, "committed_at": "2026-11-29T01:00:00+00:00"}
    setup, _ = _rendered(dag, "setup", {("canary", "return_value"): canary})
    assert setup.canary == canary


def test_a_teardown_whose_setup_did_not_finish_gets_no_plan():
    dag = build_restore_verify_dag(load_inventory().get("main"))
    teardown, _ = _rendered(dag, "teardown", {})
    assert teardown.plan is None and as_mapping(teardown.plan) is None
    wait, _ = _rendered(dag, "wait_recovery", {})
    with pytest.raises(AirflowFailException, match="no plan: the planning step before it did not finish"):
        wait.planned()
    with pytest.raises(AirflowFailException, match="no scratch instance"):
        wait.started_instance()


def test_the_restore_report_sees_every_steps_value_and_error():
    dag = build_restore_verify_dag(load_inventory().get("main"))
    xcom = {("setup", "return_value"): PLAN, ("restore", "error"): "pgops-restore of backup x failed: exit 1",
            ("checks", "checks"): {"database_size_bytes": 1}}
    report, _ = _rendered(dag, "report", xcom)
    assert set(report.steps) == {"canary", "setup", "restore", "wait_recovery", "checks"}
    assert report.steps["setup"] == {"value": PLAN, "error": None}
    assert report.plan == PLAN and report.checks == {"database_size_bytes": 1} and report.canary is None
    errors, missing = step_outcomes(report.steps, report.optional_steps)
    assert errors == {"restore": "pgops-restore of backup x failed: exit 1"}
    assert missing == ["wait_recovery", "checks"]  # the canary is optional


def test_standby_steps_get_the_plan_and_whether_the_restore_created_the_slot():
    dag = build_standby_rebuild_dag(load_inventory().get("main"))
    assert dag.render_template_as_native_obj
    xcom = {("preflight", "return_value"): {"node": "pg2", "slot_created": False},
            ("restore", "return_value"): STARTED, ("restore", "slot_created"): True}
    wait, _ = _rendered(dag, "wait_streaming", xcom)
    assert wait.planned() == {"node": "pg2", "slot_created": True} and wait.started_standby() == STARTED
    register, _ = _rendered(dag, "register", xcom)
    assert register.planned()["slot_created"] is True
    restore, _ = _rendered(dag, "restore", xcom)
    assert restore.plan == {"node": "pg2", "slot_created": False}


def test_the_standby_report_excuses_the_gated_steps_of_a_declined_rebuild():
    dag = build_standby_rebuild_dag(load_inventory().get("main"))
    xcom = {("preflight", "return_value"): {"node": "pg2"}, ("approve_rebuild", "return_value"): {"decision": "x"}}
    report, _ = _rendered(dag, "report", xcom)
    assert report.approval == {"decision": "x"} and report.registered is None
    assert step_outcomes(report.steps, report.optional_steps) == ({}, ["restore", "wait_streaming"])
    assert step_outcomes(report.steps, (*report.optional_steps, *report.gated_steps)) == ({}, [])


def test_a_mapping_rendered_as_text_is_parsed():
    assert as_mapping(json.dumps(PLAN)) == PLAN
    assert as_mapping(repr(PLAN)) == PLAN  # what a plain (not native) template renders
    for empty in (None, "", "None"):
        assert as_mapping(empty) is None
    with pytest.raises(AirflowFailException, match="is not a mapping"):
        as_mapping("[1, 2]", "plan")


# -- the S3 hook and the end-WAL trigger ------------------------------------------------------------------------------
class FakeS3:
    def __init__(self, keys: dict[str, bytes]):
        self.keys = keys

    def get_paginator(self, name):
        fake = self

        class Paginator:
            def paginate(self, *, Bucket, Prefix, Delimiter=None, PaginationConfig=None):  # noqa: N803 - boto3's names
                keys = sorted(k for k in fake.keys if k.startswith(Prefix))
                if Delimiter:
                    prefixes = sorted({Prefix + k[len(Prefix):].split(Delimiter)[0] + Delimiter for k in keys})
                    yield {"CommonPrefixes": [{"Prefix": p} for p in prefixes]}
                else:
                    yield {"Contents": [{"Key": k, "Size": len(fake.keys[k]), "LastModified": None} for k in keys]}

        return Paginator()

    def get_object(self, *, Bucket, Key):  # noqa: N803
        import io

        from botocore.exceptions import ClientError

        if Key not in self.keys:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        return {"Body": io.BytesIO(self.keys[Key])}


def _hook_with(client):
    from pgops.airflow.hooks import PgopsS3Hook

    hook = PgopsS3Hook(aws_conn_id=None)
    hook.__dict__["conn"] = client  # S3Hook.conn is a cached_property: this is the client it keeps
    return hook


def test_the_hook_reads_barman_clouds_catalog_and_keeps_one_client(monkeypatch):
    from pgops.airflow.hooks import PgopsS3Hook, s3_client

    cluster = load_inventory().get("main")
    base = f"{cluster.storage.server_prefix}/base/"
    hook = _hook_with(FakeS3({f"{base}20261129T010000/backup.info": b"status=DONE\nbackup_name=nightly\n",
                              f"{base}20261129T010000/data.tar": b"0123456789",
                              f"{base}20261129T020000/data.tar": b"01234"}))
    assert hook.backup_ids(cluster) == ["20261129T010000", "20261129T020000"]
    infos = hook.backup_infos(cluster, hook.backup_ids(cluster))
    assert list(infos) == ["20261129T010000"] and infos["20261129T010000"]["status"] == "DONE"
    assert hook.stored_bytes(cluster.storage.bucket, base) == 15 + len(b"status=DONE\nbackup_name=nightly\n")
    assert hook.find_key(cluster.storage.bucket, base, lambda k: k.endswith("data.tar")) == f"{base}20261129T010000/data.tar"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    real = PgopsS3Hook(aws_conn_id=None)
    assert real.conn is real.conn and real.get_conn() is real.conn
    assert type(s3_client(None)).__name__ == "S3"


def test_the_end_wal_trigger_lists_with_one_hook_per_run(monkeypatch):
    import pgops.airflow.hooks
    from pgops.airflow.triggers.s3 import WalSegmentArchivedTrigger

    segment = "pg/main/wals/0000000100000000/000000010000000000000003"
    made, answers = [], [None, None, segment + ".lz4"]

    class OneClientHook:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def find_key(self, bucket, prefix, match):
            key = answers.pop(0)
            return key if key and match(key) else None

    monkeypatch.setattr(pgops.airflow.hooks, "_s3_hook_class", lambda: OneClientHook)

    async def first():
        async for event in WalSegmentArchivedTrigger(aws_conn_id="aws", bucket="b", key_prefix=segment,
                                                     poll_interval_s=0).run():
            return event.payload

    assert asyncio.run(first()) == {"status": "success", "key": segment + ".lz4"}
    assert made == [{"aws_conn_id": "aws"}] and answers == []


@pytest.mark.parametrize("module", ["pgops.airflow.operators.restore", "pgops.airflow.operators.standby", "pgops.airflow.operators.audit",
                                    "pgops.airflow.triggers.s3", "pgops.airflow.triggers.restore", "pgops.airflow.triggers.standby"])
def test_no_raw_clients_and_no_upstream_pulls_in_the_restore_and_standby_tasks(module):
    import importlib
    import inspect
    import re

    source = inspect.getsource(importlib.import_module(module))
    code = [line.split("#")[0] for line in source.splitlines()]
    assert not [line for line in code if re.search(r"\bboto3\b|s3_client\(|aws_hook\(|\.get_paginator\(", line)]
    pulls = [line.strip() for line in code if "xcom_pull(" in line]
    assert all("task_ids=self.task_id" in line for line in pulls), pulls


class ReportBucket:
    """PgopsS3Hook's report methods, in memory."""

    written: list[dict] = []

    def __init__(self, **kwargs):
        pass

    def list_reports(self, cluster, kind, *, limit=200):
        return []

    def write_report(self, cluster, report):
        self.written.append(report)
        return f"reports/{report['kind']}/latest.json"


def test_the_reports_are_built_from_the_rendered_values(monkeypatch):
    import pgops.airflow.hooks

    monkeypatch.setattr(pgops.airflow.hooks, "_s3_hook_class", lambda: ReportBucket)
    ReportBucket.written = []
    dag = build_restore_verify_dag(load_inventory().get("main"))
    recovery = {"replay_s": 2.0, "segments_replayed": 3, "rto_s": 30.0, "recovery_stop": None}
    xcom = {("canary", "return_value"): None, ("setup", "return_value"): {**PLAN, "backup_size_bytes": 10},
            ("restore", "return_value"): {**STARTED, "download_s": 1.5, "restorer": "pgops-restore"},
            ("wait_recovery", "return_value"): recovery,
            ("checks", "return_value"): {"checks": {}}, ("checks", "checks"): {"checks": {}, "database_size_bytes": 5}}
    report, ti = _rendered(dag, "report", xcom)
    out = report.run_step({"ti": ti, "run_id": "r"})
    body = ReportBucket.written[-1]["body"]
    assert out["status"] == "ok" and body["errors"] == {} and body["steps_not_finished"] == []
    assert body["measurements"]["rto_s"] == 30.0 and body["measurements"]["download_s"] == 1.5
    assert body["backup_id"] == PLAN["backup_id"]

    failed, ti = _rendered(dag, "report", {**xcom, ("wait_recovery", "return_value"): None,
                                           ("wait_recovery", "error"): "recovery did not end within 60 s"})
    with pytest.raises(AirflowFailException, match="wait_recovery: recovery did not end within 60 s"):
        failed.run_step({"ti": ti, "run_id": "r"})
    assert ReportBucket.written[-1]["status"] == "failed"

    rebuild = build_standby_rebuild_dag(load_inventory().get("main"))
    monkeypatch.setattr("pgops.airflow.endpoint.report_state", lambda cluster, primary, standby: None)
    declined, ti = _rendered(rebuild, "report", {("preflight", "return_value"): {"node": "pg2", "primary": "pg1"},
                                                 ("approve_rebuild", "return_value"): {"decision": "rejected"}})
    monkeypatch.setattr("pgops.airflow.operators.standby.NOT_APPROVED", ("rejected",))
    assert declined.run_step({"ti": ti, "run_id": "r"})["status"] == "warning"
    assert ReportBucket.written[-1]["body"]["repmgr_registered"] is False
