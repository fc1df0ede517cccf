"""The verify task is what stands behind the backup task's id (barman's own "Starting backup" line and exit 0): a
backup whose catalog entry is not DONE, or has no end WAL, fails the run and is never announced as a backup."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.operators import backup as backup_mod
from pgops.airflow.operators.backup import BarmanCloudVerifyBackupOperator
from pgops.airflow.operators.base import ClusterOperator

BACKUP_ID = "20261129T162850"


@pytest.fixture
def show(monkeypatch):
    """barman-cloud-backup-show's answer, and whether the task went on to wait for the end WAL (defer)."""
    state = SimpleNamespace(entry={}, deferred=False, argv=None)
    monkeypatch.setattr(backup_mod, "s3_endpoint_url", lambda conn_id: None)

    def run_engine(self, cluster, argv, **kwargs):
        state.argv = argv
        return SimpleNamespace(stdout=json.dumps({"cloud": {"backup_id": BACKUP_ID, **state.entry}}))

    def defer(self, **kwargs):
        state.deferred = True

    monkeypatch.setattr(ClusterOperator, "run_engine", run_engine)
    monkeypatch.setattr(BarmanCloudVerifyBackupOperator, "defer", defer)
    return state


def _execute():
    ti = SimpleNamespace(xcom_push=lambda key, value: None)
    return BarmanCloudVerifyBackupOperator(task_id="verify", cluster_name="main", backup_id=BACKUP_ID).execute(
        {"ti": ti, "run_id": "manual__x"})


@pytest.mark.parametrize("status", ["FAILED", "STARTED", "WAITING_FOR_WALS", "UNKNOWN"])
def test_a_backup_not_done_fails_the_run(show, status):
    show.entry = {"status": status, "error": "failure uploading data", "end_wal": "000000010000000000000052"}
    with pytest.raises(AirflowFailException, match=f"backup {BACKUP_ID} has status {status}.*not usable for a restore"):
        _execute()
    assert show.argv[-1] == BACKUP_ID and not show.deferred


def test_a_done_backup_without_an_end_wal_fails_the_run(show):
    show.entry = {"status": "DONE"}
    with pytest.raises(AirflowFailException, match="has no end WAL in its catalog"):
        _execute()
    assert not show.deferred


def test_a_done_backup_goes_on_to_wait_for_its_end_wal(show):
    show.entry = {"status": "DONE", "end_wal": "000000010000000000000052"}
    _execute()
    assert show.deferred
