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


def wait_for(predicate, timeout_s: float = 60) -> bool:
    """Poll predicate until it is true (True) or timeout_s passes (False)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def pid_in(pid_file: Path) -> int | None:
    """The pid a DB-host helper wrote (a spool's .pusher.pid / .prefetcher.pid), or None."""
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def without_deadlines(dag):
    """dag.test() of Airflow 3.3.2 fails when a run of a DAG with Deadline Alerts succeeds (update_state looks the
    alerts up by id and is handed their serialized form). The scheduler does not: tests/lab/test_scheduler.py
    proves the alerts there. Everything else a dag.test() shows is unchanged."""
    dag.deadline = None
    return dag
