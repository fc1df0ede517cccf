"""Run one pgops DAG through dag.test() and print its timings as one JSON line (used by bench_peers.py).

Run: python bench/peers_dag_run.py DAG_ID '{"conf": "json"}'  (AIRFLOW_HOME and the lab env from the caller)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "PGOPS_BENCH_RESULT "


def main() -> int:
    dag_id, conf = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[dag_id]
    for task in dag.tasks:
        task.retries = 0
    dag.deadline = None  # dag.test() of Airflow 3.3.2 cannot finish a DAG with Deadline Alerts
    started = time.perf_counter()
    dr = dag.test(run_conf=conf)
    run_s = time.perf_counter() - started
    tasks = {}
    for ti in dr.get_task_instances():
        tasks[ti.task_id] = {"state": str(ti.state), "duration_s": ti.duration,
                             "start": ti.start_date.isoformat() if ti.start_date else None,
                             "end": ti.end_date.isoformat() if ti.end_date else None}
    xcoms = {}
    for task_id in ("backup", "verify", "restore", "wait_recovery"):
        if task_id in tasks:
            try:
                xcoms[task_id] = dr.get_task_instance(task_id).xcom_pull(task_ids=task_id)
            except Exception as exc:  # a failed task has no XCom; the state says why
                xcoms[task_id] = f"unavailable: {exc}"
    out = {"dag_id": dag_id, "run_id": dr.run_id, "state": str(dr.state), "run_s": run_s, "tasks": tasks,
           "xcom": xcoms}
    print(MARK + json.dumps(out, default=str), flush=True)
    return 0 if str(dr.state).endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main())
