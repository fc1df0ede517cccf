"""Replication health: which node is the primary, how its standbys stream, what its slots retain, what repmgr thinks.

``evaluate`` holds the rules: plain rows in (what the nodes answered to NODE_SQL, and the current primary to
STAT_REPLICATION_SQL, SLOTS_SQL and REPMGR_SQL), findings out. pgops.airflow.replication asks the nodes and runs
it in the WAL audit. A finding after a failover names the node to rebuild and links the rebuild DAG with its
params filled in.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgops.core import findings as F
from pgops.inventory import ReplicaNode, Replication

REBUILD_DAG_PREFIX = "pgops_standby_rebuild__"

# Finding ids (stable once published)
REPLICATION_OK = "REPLICATION_OK"
REPLICATION_NO_PRIMARY = "REPLICATION_NO_PRIMARY"
REPLICATION_MULTIPLE_PRIMARIES = "REPLICATION_MULTIPLE_PRIMARIES"
REPLICATION_PRIMARY_MOVED = "REPLICATION_PRIMARY_MOVED"
REPLICATION_NODE_UNREACHABLE = "REPLICATION_NODE_UNREACHABLE"
REPLICATION_TIMELINE_MISMATCH = "REPLICATION_TIMELINE_MISMATCH"
REPLICATION_SYSTEM_ID_MISMATCH = "REPLICATION_SYSTEM_ID_MISMATCH"
REPLICATION_NOT_STREAMING = "REPLICATION_NOT_STREAMING"
REPLICATION_STATE = "REPLICATION_STATE"
REPLICATION_LAG = "REPLICATION_LAG"
REPLICATION_REPLAY_BEHIND = "REPLICATION_REPLAY_BEHIND"
REPLICATION_SLOT_INACTIVE = "REPLICATION_SLOT_INACTIVE"
REPLICATION_SLOT_RETAINS_WAL = "REPLICATION_SLOT_RETAINS_WAL"
REPLICATION_SLOT_LOST = "REPLICATION_SLOT_LOST"
REPLICATION_SLOT_MISSING = "REPLICATION_SLOT_MISSING"
REPMGR_METADATA_MISSING = "REPMGR_METADATA_MISSING"
REPMGR_NODE_UNREGISTERED = "REPMGR_NODE_UNREGISTERED"
REPMGR_ROLE_MISMATCH = "REPMGR_ROLE_MISMATCH"
REPMGR_UPSTREAM_MISMATCH = "REPMGR_UPSTREAM_MISMATCH"

# Asked of every node (a primary and a standby answer the same query).
NODE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END AS primary_timeline,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       CASE WHEN pg_is_in_recovery()
            THEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint END AS receive_replay_bytes,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS last_replay_age_s,
       (SELECT timeline_id FROM pg_control_checkpoint()) AS checkpoint_timeline,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver_status,
       (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli,
       (SELECT slot_name FROM pg_stat_wal_receiver) AS receiver_slot,
       (SELECT system_identifier::text FROM pg_control_system()) AS system_identifier,
       CASE WHEN pg_has_role(current_user, 'pg_read_all_settings', 'USAGE')
            THEN current_setting('data_directory') END AS data_directory,
       to_regclass('repmgr.nodes') IS NOT NULL AS has_repmgr
"""
STAT_REPLICATION_SQL = """
SELECT application_name, client_addr::text AS client_addr, state, sync_state,
       pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn)::bigint AS send_lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), write_lsn)::bigint AS write_lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint AS flush_lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_lag_bytes,
       extract(epoch FROM write_lag)::float8 AS write_lag_s,
       extract(epoch FROM flush_lag)::float8 AS flush_lag_s,
       extract(epoch FROM replay_lag)::float8 AS replay_lag_s
FROM pg_stat_replication ORDER BY application_name
"""
SLOTS_SQL = """
SELECT slot_name, slot_type, active, wal_status, safe_wal_size::bigint AS safe_wal_size_bytes,
       restart_lsn::text AS restart_lsn,
       CASE WHEN restart_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END AS retained_bytes
FROM pg_replication_slots ORDER BY slot_name
"""
REPMGR_SQL = "SELECT node_id, node_name, type, active, upstream_node_id FROM repmgr.nodes ORDER BY node_id"

@dataclass
class Observed:
    """What the nodes answered: NODE_SQL per node (or its error) and the current primary's views."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> row, or {"error": ...}
    stat_replication: list[dict[str, Any]] = field(default_factory=list)
    slots: list[dict[str, Any]] = field(default_factory=list)
    repmgr_nodes: list[dict[str, Any]] | None = None
    repmgr_error: str | None = None


def node_timeline(row: Mapping[str, Any]) -> int | None:
    if not row or row.get("error"):
        return None
    if not row.get("in_recovery"):
        return _int(row.get("primary_timeline"))
    return _int(row.get("received_tli")) or _int(row.get("checkpoint_timeline"))


def current_primary(repl: Replication, nodes: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The node that is out of recovery on the newest timeline (the inventory's primary wins a tie)."""
    primaries = [n.name for n in repl.nodes if _is_primary(nodes.get(n.name))]
    if not primaries:
        return None
    return max(primaries, key=lambda name: (node_timeline(nodes[name]) or 0, name == repl.primary.name))


def rebuild_conf(node: ReplicaNode, *, backup: str = "latest") -> dict[str, Any]:
    # never "force": a person decides whether a node's own data may be replaced, in the form
    return {"target": node.name, "data_directory": node.data_directory or "", "slot": node.slot or node.name,
            "backup": backup}


def rebuild_link(cluster_name: str, node: ReplicaNode, *, base_url: str = "") -> dict[str, str]:
    """The rebuild DAG's trigger form URL with the params filled in, and the same as a CLI line."""
    dag_id = f"{REBUILD_DAG_PREFIX}{cluster_name}"
    conf = json.dumps(rebuild_conf(node), sort_keys=True)
    return {"dag_id": dag_id, "conf": conf,
            "url": f"{base_url.rstrip('/')}/dags/{dag_id}/trigger?conf={urllib.parse.quote(conf)}",
            "cli": f"airflow dags trigger {dag_id} --conf '{conf}'"}


def evaluate(cluster_name: str, repl: Replication, obs: Observed, *, base_url: str = "",
             endpoint_reach: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[F.Finding]]:
    """The replication findings of one cluster from what its nodes answered (pure).

    ``endpoint_reach`` (pgops.core.endpoint.reach: the endpoint's label and the nodes it reaches) lets a split-brain
    finding say which of the writable nodes clients write to.
    """
    out: list[F.Finding] = []
    nodes = obs.nodes
    by_name = {n.name: n for n in repl.nodes}
    primary_name = current_primary(repl, nodes)
    body: dict[str, Any] = {"current_primary": primary_name, "inventory_primary": repl.primary.name, "nodes": {}}
    for n in repl.nodes:
        row = nodes.get(n.name) or {"error": "not asked"}
        role = "unreachable" if row.get("error") else ("standby" if row.get("in_recovery") else "primary")
        body["nodes"][n.name] = {"role": role, "timeline": node_timeline(row),
                                 **{k: _plain(v) for k, v in row.items()}}

    def link(node: ReplicaNode) -> dict[str, str]:
        return rebuild_link(cluster_name, node, base_url=base_url)

    for n in repl.nodes:
        row = nodes.get(n.name) or {}
        if row.get("error"):
            out.append(F.Finding(
                id=REPLICATION_NODE_UNREACHABLE, severity=F.CRITICAL if n.name == repl.primary.name and not primary_name
                else F.WARNING,
                message=f"node {n.name} of {cluster_name} is not reachable through connection {n.postgres_conn_id!r}: "
                        f"{row['error']}",
                evidence={"node": n.name, "conn_id": n.postgres_conn_id, "error": row["error"]},
                fix=f"start PostgreSQL on {n.name} or correct the connection; if it is lost for good, rebuild it "
                    f"from the backup ({link(n)['cli']})"))

    if primary_name is None:
        out.append(F.Finding(
            id=REPLICATION_NO_PRIMARY, severity=F.CRITICAL,
            message=f"no node of {cluster_name} is a reachable primary (nodes: "
                    + ", ".join(f"{k}: {v['role']}" for k, v in body["nodes"].items()) + ")",
            evidence={"nodes": {k: v["role"] for k, v in body["nodes"].items()}},
            fix="fail over to the most advanced standby (repmgr standby promote) or start the primary"))
        return body, _with_ok(out, cluster_name, body)

    primary_row = nodes[primary_name]
    primary_tl = node_timeline(primary_row)
    body["primary_timeline"] = primary_tl
    others = [n for n in repl.nodes if n.name != primary_name]

    if primary_name != repl.primary.name:
        old = by_name[repl.primary.name]
        old_row = nodes.get(old.name) or {}
        old_role = body["nodes"][old.name]["role"]
        out.append(F.Finding(
            id=REPLICATION_PRIMARY_MOVED, severity=F.WARNING,
            message=f"{primary_name} is the primary of {cluster_name} now (timeline {primary_tl}), not "
                    f"{old.name} as the inventory's postgres_conn_id {old.postgres_conn_id!r} says ({old.name} is "
                    f"{old_role}{', timeline ' + str(node_timeline(old_row)) if node_timeline(old_row) else ''}): "
                    "a failover happened. Backups and the WAL audit follow postgres_conn_id"
                    + (f"; rebuild {old.name} as a standby of {primary_name}: {link(old)['url']}"
                       if old_role != "standby" or node_timeline(old_row) != primary_tl else ""),
            evidence={"current_primary": primary_name, "timeline": primary_tl, "inventory_primary": old.name,
                      "inventory_primary_role": old_role, "rebuild": link(old)},
            fix=f"point postgres_conn_id (and replication.primary) at {primary_name} in the inventory; rebuild "
                f"{old.name} from the backup with {link(old)['dag_id']} if it is not a healthy standby"))

    split = [n for n in others if _is_primary(nodes.get(n.name))]
    if split:
        writable = [primary_name, *(n.name for n in split)]
        reached = [n for n in (endpoint_reach or {}).get("nodes") or [] if n in writable]
        through = ""
        reach_evidence: dict[str, Any] = {}
        if endpoint_reach is not None:
            label = endpoint_reach.get("endpoint")
            through = (f" Clients reach {' and '.join(reached)} through {label}" if reached else
                       f" Clients reach none of them through {label}")
            through += ("." if reached == [primary_name] else
                        f" (move it to {primary_name}: see ENDPOINT_NOT_ON_PRIMARY).")
            reach_evidence = {"endpoint": label, "endpoint_reaches": reached}
        out.append(F.Finding(
            id=REPLICATION_MULTIPLE_PRIMARIES, severity=F.CRITICAL,
            message=f"{len(split) + 1} nodes of {cluster_name} accept writes: {primary_name} (timeline {primary_tl}) and "
                    + ", ".join(f"{n.name} (timeline {node_timeline(nodes[n.name])})" for n in split)
                    + "." + through
                    + f" Writes to {', '.join(n.name for n in split)} are lost to the cluster; rebuild "
                    + ", ".join(f"{n.name}: {link(n)['url']}" for n in split),
            evidence={"current_primary": primary_name, "others": [n.name for n in split],
                      "timelines": {n.name: node_timeline(nodes[n.name]) for n in [by_name[primary_name], *split]},
                      "rebuild": {n.name: link(n) for n in split}, **reach_evidence},
            fix=f"fence {', '.join(n.name for n in split)} now (stop it, keep clients away), then rebuild it as a "
                f"standby of {primary_name} from the backup"))

    sysid = primary_row.get("system_identifier")
    stat = {r.get("application_name"): r for r in obs.stat_replication}
    slots = {r.get("slot_name"): r for r in obs.slots}
    for n in others:
        row = nodes.get(n.name) or {}
        if row.get("error"):
            out.append(_not_streaming(cluster_name, n, primary_name, slots.get(n.slot or ""), link(n),
                                      reason="it is not reachable"))
            continue
        tl = node_timeline(row)
        if row.get("system_identifier") and sysid and row["system_identifier"] != sysid:
            out.append(F.Finding(
                id=REPLICATION_SYSTEM_ID_MISMATCH, severity=F.CRITICAL,
                message=f"node {n.name} has system identifier {row['system_identifier']}, the primary {primary_name} "
                        f"{sysid}: it is not a copy of this cluster",
                evidence={"node": n.name, "system_identifier": row["system_identifier"], "primary": sysid,
                          "rebuild": link(n)},
                fix=f"check the connection {n.postgres_conn_id!r}; rebuild {n.name}: {link(n)['url']}"))
            continue
        if tl is not None and primary_tl is not None and tl != primary_tl:
            out.append(F.Finding(
                id=REPLICATION_TIMELINE_MISMATCH, severity=F.CRITICAL,
                message=f"node {n.name} is on timeline {tl} but the primary {primary_name} is on timeline {primary_tl}: "
                        f"it cannot stream from it. Rebuild {n.name} from the backup: {link(n)['url']}",
                evidence={"node": n.name, "timeline": tl, "primary": primary_name, "primary_timeline": primary_tl,
                          "in_recovery": bool(row.get("in_recovery")), "rebuild": link(n)},
                fix=f"trigger {link(n)['dag_id']} with {link(n)['conf']} (or: {link(n)['cli']})"))
            continue
        if not row.get("in_recovery"):
            continue  # a second primary on the same timeline: MULTIPLE_PRIMARIES says it
        s = stat.get(n.name)
        if s is None:
            out.append(_not_streaming(cluster_name, n, primary_name, slots.get(n.slot or ""), link(n),
                                      reason=f"its WAL receiver is {row.get('receiver_status') or 'not running'}"))
            continue
        if s.get("state") != "streaming":
            out.append(F.Finding(
                id=REPLICATION_STATE, severity=F.WARNING,
                message=f"standby {n.name} is in state {s.get('state')!r} on {primary_name}, not streaming",
                evidence={"node": n.name, **{k: _plain(v) for k, v in s.items()}},
                fix="wait for catch-up; if it stays there, read the standby's server log"))
        lag_b = _int(s.get("replay_lag_bytes")) or 0
        lag_s = _float(s.get("replay_lag_s")) or 0.0
        if lag_b > repl.max_lag_bytes or lag_s > repl.max_lag_s:
            out.append(F.Finding(
                id=REPLICATION_LAG, severity=F.WARNING,
                message=f"standby {n.name} replays {lag_b} bytes / {lag_s:.1f} s behind {primary_name} "
                        f"(thresholds {repl.max_lag_bytes} bytes, {repl.max_lag_s} s)",
                evidence={"node": n.name, "replay_lag_bytes": lag_b, "replay_lag_s": lag_s,
                          "write_lag_bytes": _int(s.get("write_lag_bytes")),
                          "flush_lag_bytes": _int(s.get("flush_lag_bytes")),
                          "sync_state": s.get("sync_state")},
                fix="check the standby's disk and CPU, network bandwidth, and replay conflicts in its log"))
        gap = _int(row.get("receive_replay_bytes")) or 0
        if gap > repl.max_lag_bytes:
            out.append(F.Finding(
                id=REPLICATION_REPLAY_BEHIND, severity=F.WARNING,
                message=f"standby {n.name} has received {gap} bytes it has not replayed (received "
                        f"{row.get('receive_lsn')}, replayed {row.get('replay_lsn')})",
                evidence={"node": n.name, "receive_lsn": row.get("receive_lsn"), "replay_lsn": row.get("replay_lsn"),
                          "gap_bytes": gap},
                fix="replay is stalled or slow: look for recovery conflicts or a paused replay (pg_is_wal_replay_paused)"))

    out.extend(_slot_findings(cluster_name, repl, primary_name, obs.slots, others, link))
    if repl.repmgr:
        out.extend(_repmgr_findings(cluster_name, repl, obs, body, primary_name))
    return body, _with_ok(out, cluster_name, body)


def _not_streaming(cluster_name: str, n: ReplicaNode, primary: str, slot: Mapping[str, Any] | None,
                   link: dict[str, str], *, reason: str) -> F.Finding:
    lag = _int((slot or {}).get("retained_bytes"))
    return F.Finding(
        id=REPLICATION_NOT_STREAMING, severity=F.CRITICAL,
        message=f"standby {n.name} does not stream from {primary} ({reason})"
                + (f"; it is at least {lag} bytes of WAL behind (slot {n.slot} restart_lsn)" if lag is not None else ""),
        evidence={"node": n.name, "primary": primary, "reason": reason, "lag_bytes": lag, "slot": n.slot,
                  "rebuild": link},
        fix=f"start {n.name} and check primary_conninfo/primary_slot_name; if it cannot catch up, rebuild it: "
            f"{link['url']}")


def _slot_findings(cluster_name: str, repl: Replication, primary: str, slots: Sequence[Mapping[str, Any]],
                   others: Sequence[ReplicaNode], link) -> list[F.Finding]:
    out: list[F.Finding] = []
    owner = {n.slot: n for n in others if n.slot}
    for s in slots:
        name = s.get("slot_name")
        retained = _int(s.get("retained_bytes"))
        status = s.get("wal_status")
        safe = _int(s.get("safe_wal_size_bytes"))
        ev = {"slot": name, "slot_type": s.get("slot_type"), "active": bool(s.get("active")), "wal_status": status,
              "retained_bytes": retained, "safe_wal_size_bytes": safe, "restart_lsn": s.get("restart_lsn"),
              "node": owner[name].name if name in owner else None,
              "thresholds": {"warning_bytes": repl.slot_warning_bytes, "critical_bytes": repl.slot_critical_bytes}}
        if status in ("lost", "unreserved"):
            node = owner.get(name)
            out.append(F.Finding(
                id=REPLICATION_SLOT_LOST, severity=F.CRITICAL,
                message=f"slot {name} on {primary} is {status}: the WAL its consumer needs is (about to be) removed"
                        + (f"; rebuild {node.name}: {link(node)['url']}" if node else ""),
                evidence={**ev, **({"rebuild": link(node)} if node else {})},
                fix="rebuild the standby from the backup (it cannot catch up by streaming), or drop the slot"))
            continue
        over_crit = retained is not None and retained >= repl.slot_critical_bytes
        over_warn = retained is not None and retained >= repl.slot_warning_bytes
        near_loss = safe is not None and safe < repl.slot_warning_bytes
        if not s.get("active"):
            out.append(F.Finding(
                id=REPLICATION_SLOT_INACTIVE, severity=F.CRITICAL if over_crit or near_loss else F.WARNING,
                message=f"slot {name} on {primary} is inactive and retains {retained} bytes of WAL"
                        f"{' (past the critical threshold: pg_wal fills the disk if it goes on)' if over_crit else ''}",
                evidence=ev,
                fix=f"start its standby{' ' + owner[name].name if name in owner else ''}, or drop the slot "
                    f"(SELECT pg_drop_replication_slot('{name}')) if nothing will use it again"))
        elif over_warn or near_loss:
            out.append(F.Finding(
                id=REPLICATION_SLOT_RETAINS_WAL, severity=F.CRITICAL if over_crit or near_loss else F.WARNING,
                message=f"slot {name} on {primary} retains {retained} bytes of WAL (warning at "
                        f"{repl.slot_warning_bytes}, critical at {repl.slot_critical_bytes})"
                        + (f"; {safe} bytes more and it is invalidated" if safe is not None else ""),
                evidence=ev,
                fix="the consumer lags: check it; set max_slot_wal_keep_size so a slot cannot fill the disk"))
    present = {s.get("slot_name") for s in slots}
    for n in others:
        if n.slot and n.slot not in present:
            out.append(F.Finding(
                id=REPLICATION_SLOT_MISSING, severity=F.WARNING,
                message=f"standby {n.name} should stream through slot {n.slot}, which does not exist on {primary}: "
                        "the primary may remove WAL it still needs",
                evidence={"node": n.name, "slot": n.slot, "primary": primary},
                fix=f"on {primary}: SELECT pg_create_physical_replication_slot('{n.slot}', true)"))
    return out


def _repmgr_findings(cluster_name: str, repl: Replication, obs: Observed, body: dict[str, Any],
                     primary: str) -> list[F.Finding]:
    if obs.repmgr_nodes is None:
        return [F.Finding(
            id=REPMGR_METADATA_MISSING, severity=F.WARNING,
            message=f"the inventory says {cluster_name} uses repmgr, but repmgr.nodes cannot be read on {primary}"
                    f"{': ' + obs.repmgr_error if obs.repmgr_error else ''}",
            evidence={"primary": primary, "error": obs.repmgr_error},
            fix="register the primary (repmgr primary register) or set replication.repmgr: false")]
    out: list[F.Finding] = []
    records = {r.get("node_name"): r for r in obs.repmgr_nodes}
    ids = {r.get("node_id"): r.get("node_name") for r in obs.repmgr_nodes}
    body["repmgr_nodes"] = [{k: _plain(v) for k, v in r.items()} for r in obs.repmgr_nodes]
    for n in repl.nodes:
        rec = records.get(n.name)
        role = body["nodes"][n.name]["role"]
        if rec is None:
            out.append(F.Finding(
                id=REPMGR_NODE_UNREGISTERED, severity=F.WARNING,
                message=f"node {n.name} ({role}) is not in repmgr.nodes on {primary}",
                evidence={"node": n.name, "role": role, "registered": sorted(records)},
                fix=f"on {n.name}: repmgr -f {n.repmgr_conf or '/etc/repmgr.conf'} "
                    f"{'primary' if role == 'primary' else 'standby'} register --force"))
            continue
        if role == "unreachable":
            continue
        rtype = rec.get("type")
        believes = "primary" if rtype == "primary" else "standby" if rtype == "standby" else rtype
        really = role if rec.get("active") else "inactive"
        if (believes != role) or (not rec.get("active") and role in ("primary", "standby")) or \
                (rtype == "primary" and n.name != primary):
            out.append(F.Finding(
                id=REPMGR_ROLE_MISMATCH, severity=F.WARNING,
                message=f"repmgr believes {n.name} is {'an active' if rec.get('active') else 'an inactive'} {rtype}, "
                        f"but PostgreSQL reports it is {'the current primary' if n.name == primary else role}",
                evidence={"node": n.name, "repmgr_type": rtype, "repmgr_active": bool(rec.get("active")),
                          "postgres_role": role, "state": really, "current_primary": primary},
                fix=("repmgr's metadata lags a failover done outside repmgr: on the primary run "
                     "'repmgr primary register --force'; on each standby 'repmgr standby register --force'")))
            continue
        if role == "standby":
            upstream = ids.get(rec.get("upstream_node_id"))
            if upstream != primary:
                out.append(F.Finding(
                    id=REPMGR_UPSTREAM_MISMATCH, severity=F.WARNING,
                    message=f"repmgr records {upstream or 'no node'} as the upstream of {n.name}, but the primary is "
                            f"{primary}",
                    evidence={"node": n.name, "repmgr_upstream": upstream, "current_primary": primary},
                    fix=f"on {n.name}: repmgr standby register --force --upstream-node-id <id of {primary}>"))
    return out


def _with_ok(out: list[F.Finding], cluster_name: str, body: dict[str, Any]) -> list[F.Finding]:
    if not any(f.severity != F.OK for f in out):
        standbys = [k for k, v in body["nodes"].items() if v["role"] == "standby"]
        out.append(F.Finding(
            id=REPLICATION_OK, severity=F.OK,
            message=f"{cluster_name}: {body.get('current_primary')} is the primary, {len(standbys)} standby(s) "
                    f"streaming ({', '.join(standbys)})",
            evidence={"primary": body.get("current_primary"), "standbys": standbys}))
    return out


def _is_primary(row: Mapping[str, Any] | None) -> bool:
    return bool(row) and not row.get("error") and row.get("in_recovery") is False


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _plain(v: Any) -> Any:
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)
