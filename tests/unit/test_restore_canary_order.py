"""The restore verification's first step, the canary, refuses a bad backup id before it writes anything to the
primary: a run made through the API or the CLI with a hostile backup_id leaves no canary row behind. A good id
goes on to write the canary. The DAG passes the run's backup_id to the canary step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from airflow.sdk.exceptions import AirflowFailException

import pgops.airflow.operators.restore as restore
from pgops.airflow.dags.restore_verify import build_restore_verify_dag
from pgops.airflow.operators.restore import RestoreCanaryOperator
from pgops.inventory import load_inventory

BAD = ["../x", "latest; rm -rf /", "x" * 101, "20261129T101010\n", "a b", "../other-server/base/20261129T101010"]
GOOD = ["latest", "20261129T101010", "pgops-nightly-2026-11-29", ""]  # "" is latest, as the setup step reads it
SEGMENT = "000000010000000000000007"
COMMITTED = datetime(2026, 11, 29, 10, 10, 10, tzinfo=UTC)


class Ti:
    def __init__(self):
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


class Primary:
    """The canary's connection to the primary, in memory: the statements it ran, the commits it made."""

    def __init__(self):
        self.sql: list[str] = []
        self.commits = 0
        self.closed = False
        self.autocommit = True
        self._rows = [(41, "1234"), (COMMITTED, "0/7000060", SEGMENT)]

    def cursor(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql, params=None):
        self.sql.append(" ".join(sql.split()))

    def fetchone(self):
        return self._rows.pop(0)

    def commit(self):
        self.commits += 1

    def close(self):
        self.closed = True


@pytest.fixture
def primary(monkeypatch):
    """The canary's ways to the primary: ``opened`` records every connection and query; ``conn`` is what a
    connection gets. Its archiver reports the canary's segment archived at once."""
    state = {"opened": [], "conn": Primary()}

    def connect(conn_id, **kwargs):
        state["opened"].append(("connect", conn_id))
        return state["conn"]

    def query(conn_id, sql, params=None):
        state["opened"].append(("query", conn_id))
        return [{"last_archived_wal": SEGMENT, "last_archived_time": COMMITTED + timedelta(seconds=2),
                 "failed_count": 0, "archive_mode": "on"}]

    monkeypatch.setattr(restore, "pg_connect", connect)
    monkeypatch.setattr(restore, "pg_query", query)
    return state


@pytest.fixture
def no_primary(monkeypatch):
    """Any connection to the primary or query on it fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the canary reached the primary")

    monkeypatch.setattr(restore, "pg_connect", refuse)
    monkeypatch.setattr(restore, "pg_query", refuse)


def _canary(backup_id: str, target: str = "canary") -> RestoreCanaryOperator:
    return RestoreCanaryOperator(task_id="canary", cluster_name="main", target=target, backup_id=backup_id,
                                 poll_interval_s=0)


@pytest.mark.parametrize("target", ["canary", "latest", "2026-11-28T10:00:00+00:00"])
@pytest.mark.parametrize("value", BAD)
def test_a_bad_backup_id_is_refused_before_the_canary_is_written(no_primary, value, target):
    ti = Ti()
    with pytest.raises(AirflowFailException) as err:
        _canary(value, target).execute({"ti": ti, "run_id": "manual__x"})
    text = str(err.value)
    assert text.startswith(f"param backup_id={value!r} is not a backup id"), text
    assert "Fix: copy an id from barman-cloud-backup-list, e.g. 20250105T020000, or give latest" in text
    assert ti.pushed["error"] == text  # the report names it too


@pytest.mark.parametrize("value", GOOD)
def test_a_good_backup_id_goes_on_to_write_the_canary(primary, value):
    ti = Ti()
    canary = _canary(value).execute({"ti": ti, "run_id": "manual__x"})
    conn = primary["conn"]
    assert primary["opened"][0] == ("connect", load_inventory().get("main").postgres_conn_id)
    assert any(s.startswith("INSERT INTO pgops.restore_canary") for s in conn.sql), conn.sql
    assert conn.commits == 1 and conn.closed
    assert canary["id"] == 41 and canary["xid"] == "1234" and canary["segment"] == SEGMENT
    assert canary["archive_lag_s"] == 2.0 and "error" not in ti.pushed


def test_the_dag_passes_the_runs_backup_id_to_the_canary():
    dag = build_restore_verify_dag(load_inventory().get("main"))
    canary = dag.get_task("canary")
    assert "backup_id" in canary.template_fields
    assert canary.backup_id == dag.get_task("setup").backup_id == "{{ params.backup_id }}"
    assert dag.get_task("setup").upstream_task_ids == {"canary"}  # the canary runs first: it must check too


@pytest.mark.parametrize("value", ["../x", "latest; rm -rf /", "20261129T101010"])
def test_the_rendered_canary_task_gets_the_runs_backup_id(value):
    dag = build_restore_verify_dag(load_inventory().get("main"))
    task = dag.get_task("canary").prepare_for_execution()  # a copy, as a task instance renders
    task.render_template_fields({"params": {**dag.params, "backup_id": value}})
    assert task.backup_id == value
