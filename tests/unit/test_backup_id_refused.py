"""A backup id param the form did not check (a run made through the API or the CLI with other conf) is refused by
the first task that takes it, naming the param, the value and the fix, before the catalog, the restore host or the
replication nodes are touched."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.operators.base import ClusterOperator
from pgops.airflow.operators.restore import RestoreSetupOperator, RestoreStepOperator
from pgops.airflow.operators.standby import StandbyPreflightOperator, StandbyStepOperator

BAD = ["../other-server/base/x", "latest\n", "a b", "x" * 101, "20250105T020000; rm -rf /"]


class Ti:
    def __init__(self):
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


@pytest.fixture
def no_work(monkeypatch):
    """Every way a planning step reaches the catalog, a host or the nodes: each records its use and fails."""
    touched: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            touched.append(what)
            raise AssertionError(f"{what} was reached")
        return call

    monkeypatch.setattr(ClusterOperator, "catalog", refuse("catalog"))
    monkeypatch.setattr(ClusterOperator, "run_engine", refuse("run_engine"))
    monkeypatch.setattr(RestoreStepOperator, "dbhost", refuse("dbhost"))
    monkeypatch.setattr(StandbyStepOperator, "replication", refuse("replication"))
    return touched


def _refusal(op, param: str, value: str) -> str:
    ti = Ti()
    with pytest.raises(AirflowFailException) as err:
        op.execute({"ti": ti, "run_id": "manual__x"})
    text = str(err.value)
    assert text.startswith(f"param {param}={value!r} is not a backup id"), text
    assert "Fix: copy an id from barman-cloud-backup-list, e.g. 20250105T020000, or give latest" in text
    assert ti.pushed["error"] == text  # the report names it too
    return text


@pytest.mark.parametrize("value", BAD)
def test_restore_setup_refuses_a_bad_backup_id_before_any_work(no_work, value):
    op = RestoreSetupOperator(task_id="setup", cluster_name="main", backup_id=value, target="latest",
                              scratch_root="/var/tmp/pgops-restore")
    _refusal(op, "backup_id", value)
    assert no_work == []


@pytest.mark.parametrize("value", BAD)
def test_standby_preflight_refuses_a_bad_backup_before_any_work(no_work, value):
    op = StandbyPreflightOperator(task_id="preflight", cluster_name="main", target="pg2", backup=value)
    _refusal(op, "backup", value)
    assert no_work == []


def test_a_good_backup_id_goes_on_to_the_next_step(no_work):
    """latest, an id and an empty value (latest) pass the check: the standby preflight then reads the nodes."""
    for value in ("latest", "20250105T020000", ""):
        op = StandbyPreflightOperator(task_id="preflight", cluster_name="main", target="pg2", backup=value)
        with pytest.raises(AssertionError, match="replication was reached"):
            op.execute({"ti": Ti(), "run_id": "manual__x"})
    assert no_work == ["replication"] * 3
