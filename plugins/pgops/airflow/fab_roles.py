"""The production login's roles (Airflow's FAB auth manager), made from the inventory.

- ``pgops_viewer`` / ``pgops_viewer__<cluster>``: the recoverability dashboard, DAG runs, task instances and logs
  of the pgops DAGs of every cluster / of one cluster. Nothing that starts, stops or changes anything.
- ``pgops_operator`` / ``pgops_operator__<cluster>``: a viewer who may also trigger and clear those DAGs (EBS
  migrations and standby rebuilds included) and answer their approvals (human-in-the-loop tasks).
- ``Admin``: FAB's own role (users, roles, connections, variables, pools, configuration).

DAG access is granted per DAG (``DAG:<dag_id>``, ``DAG Run:<dag_id>``), never on all DAGs, so a per-cluster
role does not see the other clusters' DAGs, nor their rows on the dashboard (which asks the auth manager).

    python -m pgops.airflow.fab_roles sync                      # create/update the roles (run after `airflow db migrate`)
    python -m pgops.airflow.fab_roles user --username alice --role pgops_viewer --password-stdin
    python -m pgops.airflow.fab_roles user --username admin --role Admin --password-env AIRFLOW_ADMIN_PASSWORD

A password comes from stdin or a named environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

from pgops.inventory import Cluster, Inventory, load_inventory

VIEWER, OPERATOR = "pgops_viewer", "pgops_operator"
DAG_PREFIXES = ("pgops_base_backup__", "pgops_wal_audit__", "pgops_restore_verify__", "pgops_ebs_migration__")
REBUILD_PREFIX = "pgops_standby_rebuild__"

READ, EDIT, CREATE = "can_read", "can_edit", "can_create"
# FAB's Viewer permissions without "can_read on DAGs" (every DAG): DAG access comes per DAG below.
_ALL_DAGS = (READ, "DAGs")
# What an operator may do beyond reading, on the DAGs its role names (FAB also requires can_edit on the DAG):
# clear and mark task instances and runs, answer human-in-the-loop approvals.
OPERATOR_EXTRA = [(EDIT, "Task Instances"), (EDIT, "DAG Runs"), (EDIT, "HITL Detail")]

Perm = tuple[str, str]


def cluster_dag_ids(cluster: Cluster) -> list[str]:
    ids = [p + cluster.name for p in DAG_PREFIXES]
    if cluster.replication is not None and cluster.replication.standbys:
        ids.append(REBUILD_PREFIX + cluster.name)
    return ids


def viewer_base() -> list[Perm]:
    from airflow.providers.fab.auth_manager.security_manager.override import FabAirflowSecurityManagerOverride

    return [p for p in FabAirflowSecurityManagerOverride.VIEWER_PERMISSIONS if p != _ALL_DAGS]


def viewer_perms(dag_ids: Iterable[str], base: list[Perm]) -> set[Perm]:
    return set(base) | {(READ, f"DAG:{d}") for d in dag_ids}


def operator_perms(dag_ids: Iterable[str], base: list[Perm]) -> set[Perm]:
    dag_ids = list(dag_ids)
    return (viewer_perms(dag_ids, base) | set(OPERATOR_EXTRA)
            | {(EDIT, f"DAG:{d}") for d in dag_ids} | {(CREATE, f"DAG Run:{d}") for d in dag_ids})


def wanted_roles(inventory: Inventory, base: list[Perm] | None = None) -> dict[str, set[Perm]]:
    """role name -> the exact permissions it must have."""
    base = viewer_base() if base is None else base
    every = [d for c in inventory.clusters for d in cluster_dag_ids(c)]
    roles = {VIEWER: viewer_perms(every, base), OPERATOR: operator_perms(every, base)}
    for c in inventory.clusters:
        roles[f"{VIEWER}__{c.name}"] = viewer_perms(cluster_dag_ids(c), base)
        roles[f"{OPERATOR}__{c.name}"] = operator_perms(cluster_dag_ids(c), base)
    return roles


def sync(inventory: Inventory) -> dict[str, int]:
    """Create or update the pgops roles to exactly wanted_roles(); pgops roles of clusters no longer in the
    inventory keep their name (users may hold them) but lose every permission. Returns role -> permission count."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    wanted = wanted_roles(inventory)
    out = {}
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        sm.sync_roles()  # FAB's own roles (Admin, Op, User, Viewer, Public) and the all-DAG resources
        for role in sm.get_all_roles():
            if role.name.startswith((VIEWER, OPERATOR)) and role.name not in wanted:
                wanted[role.name] = set()
        for name, perms in wanted.items():
            role = sm.find_role(name) or sm.add_role(name)
            have = {(p.action.name, p.resource.name): p for p in role.permissions if p.action and p.resource}
            for action, resource in sorted(perms - set(have)):
                sm.add_permission_to_role(role, sm.create_permission(action, resource))
            for key in sorted(set(have) - perms):
                sm.remove_permission_from_role(role, have[key])
            out[name] = len(perms)
    return out


def ensure_user(username: str, roles: list[str], password: str) -> str:
    """Create the user, or set its roles and password; returns "created" or "updated"."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    if not password:
        raise SystemExit(f"user {username}: empty password. Fix: pass one on stdin or in the named variable")
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        role_objs = []
        for name in roles:
            role = sm.find_role(name)
            if role is None:
                raise SystemExit(f"user {username}: role {name!r} does not exist. Fix: run "
                                 "'python -m pgops.airflow.fab_roles sync' first, or name one of "
                                 f"{sorted(r.name for r in sm.get_all_roles())}")
            role_objs.append(role)
        user = sm.find_user(username=username)
        if user is None:
            sm.add_user(username, username, "pgops", f"{username}@pgops.invalid", role_objs, password)
            return "created"
        user.roles = role_objs
        sm.update_user(user)
        sm.reset_password(user.id, password)
        return "updated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgops.airflow.fab_roles", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sync", help="create/update the pgops roles from the inventory ($PGOPS_INVENTORY)")
    u = sub.add_parser("user", help="create or update a user")
    u.add_argument("--username", required=True)
    u.add_argument("--role", action="append", required=True, help="repeat for several roles")
    src = u.add_mutually_exclusive_group(required=True)
    src.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    src.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    args = parser.parse_args(argv)
    if args.cmd == "sync":
        for name, count in sync(load_inventory()).items():
            print(f"role {name}: {count} permissions")
        return 0
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else os.environ.get(args.password_env, "")
    print(f"user {args.username}: {ensure_user(args.username, args.role, password)} with roles {args.role}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
