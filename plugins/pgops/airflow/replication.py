"""Replication health in the audit: ask the nodes, then judge what they answered (pgops.core.replication).

``collect`` asks every node of the inventory's replication section once (NODE_SQL) and the current primary for
pg_stat_replication, its slots and repmgr.nodes. The WAL audit calls ``check_cluster`` when the cluster has
standbys and adds the findings to its report; with an inventory endpoint, pgops.airflow.endpoint reads it from AWS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pgops.airflow import endpoint as endpoint_io
from pgops.core import endpoint as endpoint_core
from pgops.core import findings as F
from pgops.core.replication import (
    NODE_SQL,
    REPMGR_SQL,
    SLOTS_SQL,
    STAT_REPLICATION_SQL,
    Observed,
    current_primary,
    evaluate,
)
from pgops.inventory import Cluster, ReplicaNode, Replication

SqlFor = Callable[[ReplicaNode, str], list[dict[str, Any]]]


def pg_sql(node: ReplicaNode, statement: str) -> list[dict[str, Any]]:
    from pgops.airflow.hooks import pg_query

    return pg_query(node.postgres_conn_id, statement)


def collect(repl: Replication, *, sql: SqlFor = pg_sql) -> Observed:
    """Ask every node NODE_SQL, then the current primary for pg_stat_replication, its slots and repmgr.nodes."""
    obs = Observed()
    for n in repl.nodes:
        try:
            obs.nodes[n.name] = sql(n, NODE_SQL)[0]
        except Exception as exc:  # unreachable, auth, timeout: the node's finding carries the server's words
            obs.nodes[n.name] = {"error": " ".join(str(exc).split())[:500]}
    primary = current_primary(repl, obs.nodes)
    if primary is None:
        return obs
    node = repl.node(primary)
    obs.stat_replication = sql(node, STAT_REPLICATION_SQL)
    obs.slots = sql(node, SLOTS_SQL)
    if repl.repmgr:
        if obs.nodes[primary].get("has_repmgr"):
            try:
                obs.repmgr_nodes = sql(node, REPMGR_SQL)
            except Exception as exc:
                obs.repmgr_error = " ".join(str(exc).split())[:300]
        else:
            obs.repmgr_error = "the table repmgr.nodes does not exist"
    return obs


def airflow_base_url() -> str:
    try:
        from airflow.configuration import conf

        return conf.get("api", "base_url", fallback="") or ""
    except Exception:  # outside Airflow (the CLI): relative links
        return ""


def check_cluster(cluster: Cluster, *, sql: SqlFor = pg_sql, base_url: str | None = None,
                  aws_client_for: Callable[[str], Any] | None = None) -> tuple[dict[str, Any], list[F.Finding]]:
    """The replication section of the audit report, or ({}, []) when the cluster has no standbys.

    With an inventory endpoint, its section is body["endpoint"] (pgops.core.endpoint: where the Elastic IP or DNS record
    points against the current primary, and whether an old primary is fenced), its findings follow the replication's.
    """
    repl = cluster.replication
    if repl is None or not repl.standbys:
        return {}, []
    obs = collect(repl, sql=sql)
    base_url = airflow_base_url() if base_url is None else base_url
    if cluster.endpoint is None:
        return evaluate(cluster.name, repl, obs, base_url=base_url)
    seen = endpoint_io.observe(cluster, client_for=aws_client_for)
    body, found = evaluate(cluster.name, repl, obs, base_url=base_url,
                           endpoint_reach=endpoint_core.reach(cluster.endpoint, repl, seen))
    body["endpoint"], endpoint_found = endpoint_core.evaluate(cluster.name, cluster.endpoint, repl, body, seen)
    return body, [*found, *endpoint_found]
