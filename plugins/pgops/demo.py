"""`make demo`: the lab + real Airflow components, one base backup run followed to the end, UI left up."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pgops.airflow_stack import AirflowStack, StackError
from pgops.inventory import load_inventory
from pgops.lab import Lab, LabError


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
    dag_id = f"pgops_base_backup__{cluster.name}"
    audit_id, restore_id = f"pgops_wal_audit__{cluster.name}", f"pgops_restore_verify__{cluster.name}"
    for d in (dag_id, audit_id, restore_id):
        stack.wait_for_dag(d)
    stack.unpause(restore_id)  # scheduled on the backup asset: the backup below starts it
    restores_before = stack.run_ids(restore_id)
    run_id = stack.trigger(dag_id)
    _say(f"triggered {dag_id} run {run_id}; following it ...")
    started = time.monotonic()
    state = _follow(stack, dag_id, run_id)
    if state != "success":
        _say(f"run {run_id} ended {state}: see the task logs in the UI at {ast['url']}")
        _print_access(stack, ast, lab)
        return 1
    summary = stack.xcom(dag_id, run_id, "verify") or {}
    if isinstance(summary, str):
        summary = json.loads(summary)
    _say(f"run {run_id} succeeded in {time.monotonic() - started:.0f} s. Backed up:")
    for key in ("backup_id", "status", "cluster_size_bytes", "stored_bytes", "begin_wal", "end_wal", "begin_time",
                "end_time", "duration_s", "location"):
        print(f"    {key:<19} {summary.get(key)}")
    restore_run = stack.wait_for_new_run(restore_id, after=restores_before, run_type="asset_triggered")
    _say(f"the backup's asset event started {restore_id} ({restore_run}): restore, canary, checks, RTO ...")
    restore_state = _follow(stack, restore_id, restore_run)
    audit_run = stack.trigger(audit_id)
    _say(f"triggered {audit_id} ({audit_run}): WAL continuity, lifecycle, freshness, bucket hardening ...")
    audit_state = _follow(stack, audit_id, audit_run)
    _say(f"restore verification: {restore_state}; WAL audit: {audit_state} (its report is on the dashboard)")
    _print_access(stack, ast, lab)
    return 0


def _follow(stack: AirflowStack, dag_id: str, run_id: str) -> str:
    return stack.wait_for_run(dag_id, run_id, timeout_s=900,
                              on_change=lambda task, s: _say(f"  {dag_id.split('__')[0]}: {task} {s}") if s else None)


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
