"""Every DAG file imports cleanly, fast, with the expected ids; a bad inventory is an import error with its message."""

from __future__ import annotations

import socket
import time

import pytest
from helpers import REPO

from pgops.inventory import load_inventory

KINDS = ("pgops_base_backup__",)


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_with_expected_ids(monkeypatch):
    def _no_network(*args, **kwargs):
        raise AssertionError("DAG parsing must not open network connections")

    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    started = time.monotonic()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    elapsed = time.monotonic() - started
    assert bag.import_errors == {}
    clusters = [c.name for c in load_inventory().clusters]
    for kind in KINDS:
        for name in clusters:
            assert f"{kind}{name}" in bag.dags
    assert elapsed < 2.0, f"dags/ took {elapsed:.2f} s to parse"


def test_base_backup_dag_shape():
    dag = _bag().dags["pgops_base_backup__main"]
    assert [t.task_id for t in dag.topological_sort()] == ["preflight", "backup", "verify", "retention"]
    backup = dag.get_task("backup")
    assert backup.queue == "dbhost_main" and backup.pool == "pgops_main" and backup.retries == 2
    assert dag.max_active_runs == 1
    assert [o.name for o in dag.get_task("verify").outlets] == ["pgops_backup__main"]
    assert dag.params["retention_dry_run"] is False


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("clusters:\n  - name: Bad Name\n", "field 'name' = 'Bad Name' is not valid"),
    ("clusters:\n  - name: x\n    postgres_conn_id: a\n    aws_conn_id: b\n    storage: {bucket: ok-bucket}\n"
     "    retention: {policy: FOREVER}\n", "field 'policy' = 'FOREVER' is not a barman retention policy"),
])
def test_bad_inventory_is_an_import_error_with_the_message(tmp_path, monkeypatch, yaml_text, message):
    inv = tmp_path / "clusters.yaml"
    inv.write_text(yaml_text)
    monkeypatch.setenv("PGOPS_INVENTORY", str(inv))
    bag = _bag()
    assert bag.dags == {}
    errors = list(bag.import_errors.values())
    assert errors and all(message in e for e in errors), errors
    assert all("Traceback" not in e for e in errors)


def test_pgops_dag_tasks_see_the_dag_params_without_copies_of_them():
    from airflow.sdk.definitions.param import process_params
    from airflow.serialization.serialized_objects import DagSerialization

    bag = _bag()
    for dag_id in ("pgops_restore_verify__main", "pgops_ebs_migration__main"):
        dag = bag.dags[dag_id]
        assert len(dag.params) > 5
        task = dag.get_task("report")
        assert not task.params  # no per-task deep copy of the DAG params
        # what the task runner renders: the DAG params, the run's conf over them
        key, default = next((k, v) for k, v in dag.params.dump().items() if isinstance(v, bool))
        assert process_params(dag, task, {}, suppress_exception=False)[key] is default
        assert process_params(dag, task, {key: not default}, suppress_exception=False)[key] is (not default)
        # the serialized DAG (what the UI's trigger form reads) keeps every param with its schema
        back = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        assert list(back.params) == list(dag.params)
        assert back.params.get_param(key).schema == dag.params.get_param(key).schema


@pytest.mark.parametrize("schedule", ["@daily", None])
def test_pgops_dag_refuses_bad_param_defaults_where_airflow_does(schedule):
    from airflow.sdk import DAG, Param

    from pgops.airflow.dags.common import pgops_dag

    params = {"ok": Param(3, type="integer"), "rounds": Param("ten", type="integer", minimum=2)}
    kwargs = {"dag_id": "bad_defaults", "schedule": schedule}
    if schedule is None:  # a manual-only DAG may carry defaults the trigger form must replace, in both
        DAG(**kwargs, params=dict(params))
        with pgops_dag(**kwargs, params=dict(params)) as dag:
            pass
        assert dag.params.get_param("rounds").value == "ten"
        return
    with pytest.raises(ValueError, match="not allowed to define a Schedule"):
        DAG(**kwargs, params=dict(params))
    with pytest.raises(ValueError, match="param rounds: 'ten' is not of type 'integer'"):
        with pgops_dag(**kwargs, params=dict(params)):
            pass
    with pgops_dag(**kwargs, params={"ok": Param(3, type="integer")}) as dag:
        pass
    assert dag.params["ok"] == 3
