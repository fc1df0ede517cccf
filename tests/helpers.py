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


def airflow_stack(home: Path, extra_env: dict[str, str], *, dag_id: str, pools: dict[str, int] | None = None):
    """The body of a module fixture (``yield from``): the real scheduler, triggerer, dag-processor and api-server up
    with dag_id parsed (and pools made); afterwards down, with every process they ran gone."""
    from pgops.lab.airflow_stack import AirflowStack
    from pgops.lab.local import pid_alive

    stack = AirflowStack(home, extra_env=extra_env)
    st = stack.up()
    try:
        if pools:
            stack.ensure_pools(pools)
        stack.wait_for_dag(dag_id)
        yield stack
    finally:
        stack.down()
        assert not any(pid_alive(p) for p in st["pids"].values())


def task_errors(stack, dag_id: str, run_id: str) -> str:
    """The error lines of a run's task logs (the stack's log folder), for a failure message."""
    import json

    lines = []
    for log in sorted((stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}").glob("task_id=*/attempt=*.log")):
        for raw in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("level") == "error":
                detail = "; ".join(f"{d.get('exc_type')}: {d.get('exc_value')}" for d in entry.get("error_detail") or [])
                lines.append(f"{log.parent.name}/{log.name}: {entry.get('event')} {detail}"[:1500])
    return "\n".join(lines) or "no error in the task logs"


class GateRuns:
    """Runs of one DAG with one approval gate, seen and answered through the REST API a person's client uses."""

    def __init__(self, dag_id: str, gate: str, *, run_timeout_s: float, run_poll_s: float):
        self.dag_id, self.gate = dag_id, gate
        self.run_timeout_s, self.run_poll_s = run_timeout_s, run_poll_s

    @staticmethod
    def q(run_id: str) -> str:
        import urllib.parse

        return urllib.parse.quote(run_id, safe="")

    def states(self, stack, run_id: str) -> dict[str, str | None]:
        tis = stack._request("GET", f"/api/v2/dags/{self.dag_id}/dagRuns/{self.q(run_id)}/taskInstances")
        return {t["task_id"]: t["state"] for t in tis["task_instances"]}

    def run_state(self, stack, run_id: str) -> str:
        return stack._request("GET", f"/api/v2/dags/{self.dag_id}/dagRuns/{self.q(run_id)}")["state"]

    def wait_parked(self, stack, run_id: str, timeout_s: float = 240) -> None:
        """The gate waits for an answer and the scheduler has processed the executor's event of the parked process.

        Airflow 3.3.2 fails a gate answered before that: the answer re-queues the task, then the scheduler reads the
        parked process's "success" against a queued task instance and marks it failed. A person takes longer than
        the ~2 s this takes; a client answering at once must wait for it too.
        """
        import time

        import pytest

        gate = self.gate
        ti = stack._request("GET", f"/api/v2/dags/{self.dag_id}/dagRuns/{self.q(run_id)}/taskInstances/{gate}")
        line = f"task_id={gate}, run_id={run_id},"
        log = stack.home / "logs" / "scheduler.out"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(line in x and "state=awaiting_input" in x and f"try_number={ti['try_number']}," in x
                   for x in log.read_text(errors="replace").splitlines() if "TaskInstance Finished" in x):
                return
            time.sleep(0.5)
        pytest.fail(f"the scheduler did not note {gate} (try {ti['try_number']}) of run {run_id} as awaiting input "
                    f"within {timeout_s:.0f} s (no 'TaskInstance Finished ... state=awaiting_input' line in {log})")

    def wait_run(self, stack, run_id: str) -> str:
        import time

        import pytest

        deadline = time.monotonic() + self.run_timeout_s
        while time.monotonic() < deadline:
            state = self.run_state(stack, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(self.run_poll_s)
        pytest.fail(f"run {run_id} did not finish within {self.run_timeout_s:.0f} s; tasks: "
                    f"{self.states(stack, run_id)}\n{task_errors(stack, self.dag_id, run_id)}")

    def answer(self, stack, run_id: str, option: str) -> dict:
        status, body = stack.call("PATCH", f"/api/v2/dags/{self.dag_id}/dagRuns/{self.q(run_id)}/taskInstances/"
                                           f"{self.gate}/-1/hitlDetails", {"chosen_options": [option]},
                                  token=stack.token())
        assert status == 200, (status, body)
        return body


def tree(root: Path, *, owners: bool = False, with_root: bool = False) -> dict[str, tuple]:
    """Every path under root (a restored data directory): kind and mode; links their target; files also size, mtime
    and sha256. ``owners``: uid (links) or uid and gid (dirs, files) after the mode or target. ``with_root``: root's
    own mode as ".". Directory mtimes are left out."""
    import hashlib
    import os
    import stat

    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            own = (st.st_uid, st.st_gid) if owners else ()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), *own[:1])
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), *own)
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), *own, st.st_size, int(st.st_mtime), h.hexdigest())
    if with_root:
        out["."] = ("dir", stat.S_IMODE(root.stat().st_mode))
    return out
