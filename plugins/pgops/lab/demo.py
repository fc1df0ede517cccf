"""`make demo`: the lab + real Airflow components, one base backup run followed to the end, UI left up."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pgops.inventory import load_inventory
from pgops.lab.airflow_stack import AirflowStack, StackError
from pgops.lab.local import Lab, LabError


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _seed(lab: Lab) -> None:
    """Some data worth backing up, and one archived WAL switch so archiving is visibly working."""
    lab.psql("CREATE SCHEMA IF NOT EXISTS shop; "
             "CREATE TABLE IF NOT EXISTS shop.orders (id bigint primary key, customer text, amount numeric, "
             "created_at timestamptz default now()); "
             "INSERT INTO shop.orders (id, customer, amount) SELECT g, 'customer ' || (g % 997), (g % 1000) / 7.0 "
             "FROM generate_series(1, 200000) g ON CONFLICT DO NOTHING;")
    lab.psql("SELECT pg_switch_wal();")


def demo_up(state_dir: str | None) -> int:
    inventory = load_inventory()
    cluster = inventory.clusters[0]
    lab = Lab(state_dir, cluster)
    _say("starting the lab (SeaweedFS S3, moto, PostgreSQL 15 with WAL archiving to the bucket) ...")
    st = lab.up()
    _seed(lab)
    stack = AirflowStack(lab.state_dir / "airflow", extra_env={**lab.env(st), "PGOPS_INVENTORY": str(inventory.path)})
    _say("starting Airflow: api-server, scheduler, dag-processor, triggerer (about 30 s) ...")
    ast = stack.up()
    stack.ensure_pools({c.pool: 1 for c in inventory.clusters})
    flow = run_flow(stack, cluster.name)
    summary = flow.get("backup_summary") or {}
    if flow["backup"] == "success":
        _say("Backed up:")
        for key in ("backup_id", "status", "cluster_size_bytes", "stored_bytes", "begin_wal", "end_wal",
                    "begin_time", "end_time", "duration_s", "location"):
            print(f"    {key:<19} {summary.get(key)}")
        _say(f"restore verification: {flow.get('restore_verify')}; WAL audit: {flow.get('wal_audit')} "
             "(its report is on the dashboard)")
    else:
        _say(f"the backup run ended {flow['backup']}: see the task logs in the UI at {ast['url']}")
    _print_access(stack, ast, lab)
    return 0 if all(flow.get(k) == "success" for k in FLOW) else 1


FLOW = ("backup", "restore_verify", "wal_audit")


def run_flow(stack: AirflowStack, cluster_name: str) -> dict:
    """The demo's first run, in the order each DAG's input exists, so no run fails for want of one.

    Every DAG starts paused. Unpausing a DAG makes the scheduler start its latest scheduled run at once (catchup
    off): the base backup first; the restore verification only once a backup is DONE (run earlier it would fail:
    "the catalog has no DONE backup"); then the WAL audit. Later backups start the restore verification through
    the backup asset, as in production. Returns each DAG's run state (and the backup's summary); stops at the
    first run that does not succeed."""
    flow: dict = {}
    for kind, prefix in zip(FLOW, ("pgops_base_backup__", "pgops_restore_verify__", "pgops_wal_audit__"),
                            strict=True):
        dag_id = f"{prefix}{cluster_name}"
        stack.wait_for_dag(dag_id)
        before = set(stack.run_ids(dag_id))
        stack.unpause(dag_id)
        run_id = stack.wait_for_new_run(dag_id, after=before)
        _say(f"unpaused {dag_id}: its scheduled run {run_id} started; following it ...")
        started = time.monotonic()
        flow[f"{kind}_states"] = {}
        flow[kind] = _follow(stack, dag_id, run_id, flow[f"{kind}_states"])
        flow[f"{kind}_run_id"] = run_id
        _say(f"{dag_id} run {run_id}: {flow[kind]} in {time.monotonic() - started:.0f} s")
        if kind == "backup" and flow[kind] == "success":
            summary = stack.xcom(dag_id, run_id, "verify") or {}
            flow["backup_summary"] = json.loads(summary) if isinstance(summary, str) else summary
        if flow[kind] != "success":
            break
    return flow


def _follow(stack: AirflowStack, dag_id: str, run_id: str, states: dict[str, list[str]] | None = None) -> str:
    def changed(task: str, state: str | None) -> None:
        if states is not None:
            states.setdefault(task, []).append(state)
        if state:
            _say(f"  {dag_id.split('__')[0]}: {task} {state}")

    return stack.wait_for_run(dag_id, run_id, timeout_s=900, on_change=changed)


def _print_access(stack: AirflowStack, ast: dict, lab: Lab) -> None:
    print(f"\n  Airflow UI:  {ast['url']}   login: admin / {stack.password()}")
    print(f"  Dashboard:   {ast['url']}/plugin/recoverability   (the page itself: {ast['url']}/pgops/)")
    print(f"  Lab state:   {lab.state_dir}   (source <(.venv/bin/pgops lab env) for the endpoints)")
    print("  Stop everything:  make down\n", flush=True)


def demo_down(state_dir: str | None) -> int:
    lab = Lab(state_dir)
    AirflowStack(lab.state_dir / "airflow").down()
    lab.down()
    _say("stopped Airflow and the lab")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return demo_up(args.state_dir) if args.action == "up" else demo_down(args.state_dir)
    except (LabError, StackError) as exc:
        print(f"[demo] failed: {exc}", file=sys.stderr)
        return 2
