"""Deployment set-up for docker compose's airflow-init: pools from the inventory, connections checked.

``python -m pgops.airflow.deploy init --pools-file F`` writes the pools file for ``airflow pools import``, checks that
every connection the inventory names resolves (AIRFLOW_CONN_<ID> in the environment, or the metadata DB,
or a secrets backend), and with ``PGOPS_CREATE_BUCKETS=true`` creates missing buckets (for the bundled S3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pgops.inventory import Cluster, Inventory, load_inventory

CREATE_BUCKETS_ENV = "PGOPS_CREATE_BUCKETS"
POOL_SLOTS = 1  # one DB-host job (backup, retention, restore) per cluster at a time


def pools(inventory: Inventory) -> dict[str, dict]:
    return {c.pool: {"slots": POOL_SLOTS, "description": f"pgops: DB-host work of cluster {c.name}",
                     "include_deferred": False} for c in inventory.clusters}


def connection_ids(cluster: Cluster) -> list[str]:
    ids = [cluster.postgres_conn_id, cluster.aws_conn_id, cluster.alerts_conn_id]
    if cluster.runner.kind == "ssh" and cluster.runner.ssh_conn_id:
        ids.append(cluster.runner.ssh_conn_id)
    return list(dict.fromkeys(ids))


def missing_connections(inventory: Inventory) -> list[str]:
    from airflow.sdk import BaseHook

    problems = []
    for cluster in inventory.clusters:
        for conn_id in connection_ids(cluster):
            try:
                BaseHook.get_connection(conn_id)
            except Exception:  # AirflowNotFoundException and friends: the message below says what to do
                problems.append(f"cluster {cluster.name!r}: connection {conn_id!r} is not defined. Fix: set "
                                f"AIRFLOW_CONN_{conn_id.upper()} in docker-compose.yaml/.env (or your secrets backend)")
    return problems


def create_buckets(inventory: Inventory) -> list[str]:
    """Create each cluster's bucket where it is missing (one PgopsS3Hook per AWS connection); the buckets made."""
    from pgops.airflow.hooks import PgopsS3Hook

    made: list[str] = []
    hooks: dict[str, PgopsS3Hook] = {}
    for cluster in inventory.clusters:
        hook = hooks.get(cluster.aws_conn_id)
        if hook is None:
            hook = hooks[cluster.aws_conn_id] = PgopsS3Hook(aws_conn_id=cluster.aws_conn_id)
        if hook.ensure_bucket(cluster.storage.bucket):
            made.append(cluster.storage.bucket)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgops.airflow.deploy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="pools file, connection check, optional bucket creation")
    init.add_argument("--pools-file", required=True)
    args = parser.parse_args(argv)
    inventory = load_inventory()
    Path(args.pools_file).write_text(json.dumps(pools(inventory), indent=2))
    print(f"pgops: {len(inventory.clusters)} cluster(s) in {inventory.path}; pools written to {args.pools_file}")
    problems = missing_connections(inventory)
    for p in problems:
        print(f"pgops: {p}", file=sys.stderr)
    if problems:
        return 1
    if os.environ.get(CREATE_BUCKETS_ENV, "").lower() in ("1", "true", "yes"):
        made = create_buckets(inventory)
        print(f"pgops: created bucket(s) {', '.join(made)}" if made else "pgops: buckets exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
