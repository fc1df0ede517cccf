"""Helpers the test modules import (`from helpers import ...`): one copy for tests/ and tests/lab/."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def task_states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]
