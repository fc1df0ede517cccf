"""Deadline Alerts on the base backup and restore verification DAGs: what each watches, and the alert's text.
The alert sent for real (scheduler → triggerer → SNS → SQS) is proven in tests/lab/test_scheduler.py."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta

import pytest

from pgops.airflow import deadlines
from pgops.airflow.dags.base_backup import build_base_backup_dag
from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.airflow.dags.wal_audit import build_wal_audit_dag
from pgops.inventory import Alerts, InventoryError, load_inventory


@pytest.fixture
def cluster():
    return load_inventory().get("main")


def _only(dag):
    assert len(dag.deadline) == 1, dag.deadline
    return dag.deadline[0]


def test_backup_and_restore_runs_have_deadlines_from_the_inventory(cluster):
    from airflow.sdk import DeadlineReference

    backup = _only(build_base_backup_dag(cluster))
    assert backup.interval == timedelta(seconds=cluster.targets.backup_deadline_s) == timedelta(hours=6)
    assert backup.reference == DeadlineReference.DAGRUN_LOGICAL_DATE  # not queued_at: see pgops.airflow.deadlines
    assert backup.callback.path == "pgops.airflow.deadlines.deadline_missed"
    assert backup.callback.kwargs["target_arn"] == cluster.alerts.sns_topic_arn
    restore = _only(build_restore_verify_dag(cluster))
    assert restore.interval == timedelta(seconds=cluster.targets.rto_s)  # restore_deadline_s defaults to rto_s
    assert restore.callback.kwargs["setting"] == "targets.restore_deadline_s"
    assert not build_wal_audit_dag(cluster).deadline
    assert inspect.iscoroutinefunction(deadlines.deadline_missed)  # an AsyncCallback: it runs in the triggerer


def test_a_cluster_without_an_alert_topic_gets_no_deadline(cluster):
    quiet = dataclasses.replace(cluster, alerts=Alerts())
    assert deadlines.deadline_alerts(quiet, "backup") == [] and not build_base_backup_dag(quiet).deadline


def test_the_deadlines_are_validated_like_every_inventory_field(tmp_path):
    import yaml

    from pgops.inventory import DEFAULT_INVENTORY

    data = yaml.safe_load(DEFAULT_INVENTORY.read_text())
    data["clusters"][0]["targets"].update(rto_s=900)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_inventory(path).get("main").targets.restore_deadline_s == 900
    data["clusters"][0]["targets"]["backup_deadline_s"] = "6h"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError, match=r"targets.*backup_deadline_s.*whole number"):
        load_inventory(path)


def test_the_alert_names_the_run_the_deadline_and_the_setting():
    context = {"dag_run": {"dag_id": "pgops_base_backup__main", "dag_run_id": "scheduled__2026-11-29T02:00:00+00:00",
                           "logical_date": "2026-11-29T02:00:00Z", "state": "running"},
               "deadline": {"id": "d1", "deadline_time": "2026-11-29T08:00:01Z"}}
    subject, body = deadlines.deadline_message(cluster="main", what="base backup", limit_s=21600,
                                               setting="targets.backup_deadline_s", context=context)
    assert subject == "pgops deadline missed: main base backup"
    assert "has not finished within 6 h of its scheduled time (targets.backup_deadline_s)" in body
    assert "scheduled__2026-11-29T02:00:00+00:00" in body and "2026-11-29T08:00:01Z" in body and "running" in body
    # the triggerer's context may be missing: the alert still goes out
    assert "within 90 s" in deadlines.deadline_message(cluster="c", what="restore verification", limit_s=90,
                                                       setting="targets.restore_deadline_s", context=None)[1]
