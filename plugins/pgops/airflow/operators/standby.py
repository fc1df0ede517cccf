"""Standby rebuild operators: preflight, restore from the backup as a standby, wait until it streams, repmgr, report.

The target is an inventory replication node that is not the current primary. Every command and check on its host
goes through that node's DbHost (its own runner in the inventory, else the cluster's). Before anything is stopped
or removed, the preflight proves on the target's host that the data directory is the inventory's, that it is no
other node's data directory or pg_wal (equal, inside or containing, after realpath), that no PostgreSQL running
there is a primary, and that what it holds belongs to this cluster; `force` only allows replacing a stopped
node's or a standby's old contents. The preflight only reads; a person approves its plan (the approve_rebuild
gate, pgops.airflow.operators.approval) before the restore step changes anything. The primary is only read, plus its
replication slot created when missing (by the restore step, dropped again when the rebuild fails) and one WAL
switch. Any failure after the restore step began stops the target and names its data directory in the error.
Each step gets what the steps before it returned as templated arguments from the DAG factory.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pgops.airflow.hooks import aws_child_env, pg_query, s3_endpoint_url
from pgops.airflow.operators.approval import NOT_APPROVED, describe
from pgops.airflow.operators.base import param_checked, pg_bin, stop_proven_postmaster, truthy
from pgops.airflow.operators.restore import (
    RestoreStepOperator,
    as_mapping,
    restore_base_backup,
    step_outcomes,
    wait_started,
)
from pgops.airflow.replication import collect as collect_replication
from pgops.core import replication as repl_core
from pgops.core import restore as core
from pgops.core.params import MAX_STANDBY_TIMEOUT_S, check_abs_dir, check_backup_id, check_duration
from pgops.core.reports import envelope, utcnow
from pgops.dbhost.engines import barman_cloud
from pgops.dbhost.host import DbHost
from pgops.dbhost.runners import CommandFailed
from pgops.inventory import Cluster, ReplicaNode, Replication


def standby_paths(data_dir: str, node: str) -> dict[str, str]:
    """Files next to the data directory (never inside it: a later base backup of this node would carry them)."""
    parent = posixpath.dirname(data_dir.rstrip("/"))
    return {"log_file": f"{parent}/pgops-standby-{node}.log", "spool_dir": f"{parent}/pgops-wal-spool-{node}"}


def primary_conninfo(repl: Replication, primary: ReplicaNode, *, application_name: str, fallback_host: str,
                     fallback_port: int) -> str:
    parts = [f"host={primary.host or fallback_host}", f"port={primary.port or fallback_port}",
             f"user={repl.replication_user}", f"application_name={application_name}"]
    if repl.passfile:
        parts.append(f"passfile={repl.passfile}")
    return " ".join(parts)


def standby_settings(*, restore_command: str, conninfo: str, slot: str, port: int, socket_dir: str,
                     extra: dict[str, str] | None = None) -> dict[str, str]:
    """Appended to the restored postgresql.auto.conf (read last). archive_mode stays as restored: a standby does
    not archive (unless 'always'), and when it is promoted one day it must archive like the primary it replaces."""
    settings = {
        "restore_command": restore_command,
        "primary_conninfo": conninfo,
        "primary_slot_name": slot,
        "recovery_target_timeline": "latest",
        "recovery_target": "", "recovery_target_lsn": "", "recovery_target_name": "", "recovery_target_time": "",
        "recovery_target_xid": "",
        "hot_standby": "on",
        "port": str(port),
        "unix_socket_directories": socket_dir,
    }
    settings.update(extra or {})
    return settings


class StandbyStepOperator(RestoreStepOperator):
    """A step of the standby rebuild; its failure message is kept in XCom (key "error") for the report.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the preflight's plan (templated; None for the preflight itself)
    :param slot_created: whether the restore step created the replication slot, its XCom "slot_created"
        (templated): a failure after it drops the slot again
    """

    template_fields: Sequence[str] = (*RestoreStepOperator.template_fields, "slot_created")

    def __init__(self, *, slot_created: bool | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.slot_created = slot_created

    def planned(self) -> dict[str, Any]:
        """The preflight's plan, plus whether the restore step created the slot (the preflight only reads)."""
        plan = super().planned()
        if truthy(self.slot_created):
            plan = {**plan, "slot_created": True}
        return plan

    def replication(self, cluster: Cluster) -> Replication:
        if cluster.replication is None or not cluster.replication.standbys:
            raise AirflowFailException(f"cluster {cluster.name!r} has no replication section with standbys in the "
                                       "inventory. Fix: add replication.primary and replication.standbys")
        return cluster.replication

    def target_host(self, cluster: Cluster, plan: dict[str, Any]) -> DbHost:
        return self.dbhost(cluster, self.replication(cluster).node(plan["node"]))

    def stop_target(self, cluster: Cluster, plan: dict[str, Any]) -> int | None:
        """Stop the target's proven postmaster (fast, then SIGKILL); leave the data directory in place.

        Refused when the postmaster there is not in recovery: a primary is never stopped by a rebuild.
        """
        return stop_proven_postmaster(self.target_host(cluster, plan), plan["data_dir"], mode="fast",
                                      standby_only=True, log=self.log,
                                      fix="remove its postmaster.pid if no PostgreSQL runs in that directory, and "
                                          "run the rebuild again")

    def fail_stopped(self, cluster: Cluster, plan: dict[str, Any], message: str) -> None:
        try:
            self.stop_target(cluster, plan)
        except Exception as exc:  # the error below still names the directory; say the stop failed too
            message += f" (stopping it failed too: {exc})"
        message += drop_created_slot(cluster, plan, self.log)
        raise AirflowFailException(f"standby rebuild of {plan['node']} failed: {message}. The target is stopped; its "
                                   f"data directory {plan['data_dir']} is left as it is (server log "
                                   f"{plan['log_file']}). Fix the cause and run the rebuild again with force")


def drop_created_slot(cluster: Cluster, plan: dict[str, Any], log) -> str:
    """Drop the slot this rebuild created on the primary (an unused slot holds WAL there until the disk fills)."""
    if not plan.get("slot_created"):
        return ""
    repl = cluster.replication
    try:
        primary = repl.node(plan["primary"])
        dropped = pg_query(primary.postgres_conn_id, "SELECT pg_drop_replication_slot(slot_name) FROM "
                                                     "pg_replication_slots WHERE slot_name = %s AND NOT active",
                           (plan["slot"],))
        if not dropped:
            return ""  # gone already, or a standby streams through it now
        log.warning("dropped replication slot %s on %s (this rebuild created it and failed)", plan["slot"],
                    plan["primary"])
        return f"; slot {plan['slot']} that it created on {plan['primary']} was dropped"
    except Exception as exc:
        return (f"; slot {plan['slot']} that it created on {plan['primary']} could not be dropped ({exc}): drop it "
                f"with SELECT pg_drop_replication_slot('{plan['slot']}') or it keeps WAL on the primary")


@dataclass(frozen=True)
class NodeDir:
    node: str
    what: str  # "data directory" | "pg_wal"
    path: str  # realpath on the target's host


def overlap(a: str, b: str) -> str | None:
    """How two realpaths collide: equal, one inside the other, or None."""
    if a == b:
        return "is"
    if a.startswith(b.rstrip("/") + "/"):
        return "lies inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "contains"
    return None


class StandbyPreflightOperator(StandbyStepOperator):
    """Refuse a target that is the current primary; pick the backup; check disk and the slot. Reads only.

    Returns the rebuild plan the approval shows and the later steps act on.

    :param cluster_name: the inventory cluster (templated)
    :param target: the replication node to rebuild, never the current primary (templated)
    :param data_directory: '' or exactly the node's data directory in the inventory (templated)
    :param slot: '' or exactly the node's slot in the inventory (templated)
    :param force: allow replacing a stopped node's or a running standby's contents (templated)
    :param backup: backup id or name, or latest (templated)
    :param socket_dir: unix_socket_directories of the rebuilt standby (templated)
    :param required_bytes: free bytes needed, 0 for the backup's size plus a margin (templated)
    :param db_user: the database user the checks on the standby use
    :param settings: extra allowlisted settings for the standby (templated: a mapping or its JSON)
    """

    template_fields: Sequence[str] = ("cluster_name", "target", "data_directory", "slot", "force", "backup",
                                      "socket_dir", "required_bytes", "settings")

    def __init__(self, *, target: str, data_directory: str = "", slot: str = "", force: bool | str = False,
                 backup: str = "latest", socket_dir: str = "/var/run/postgresql", required_bytes: int | str = 0,
                 db_user: str = "postgres", settings: dict[str, str] | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.target, self.data_directory, self.slot, self.force = target, data_directory, slot, force
        self.backup, self.socket_dir, self.required_bytes, self.db_user = backup, socket_dir, required_bytes, db_user
        self.settings = settings

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        # The trigger form checked it; a run made another way is checked again before anything is read.
        backup_id = param_checked(check_backup_id, "backup", self.backup or "latest")
        repl = self.replication(cluster)
        try:
            node = repl.node(str(self.target))
        except Exception as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: {exc}. Fix: set the 'target' param") from None
        force = truthy(self.force)
        data_dir = self._data_dir(cluster, node)
        slot = self._slot(node)
        settings = checked_settings(self.settings)
        socket_dir = param_checked(check_abs_dir, "socket_dir", self.socket_dir)
        problem = core.socket_path_problem(socket_dir)
        if problem:
            raise AirflowFailException(problem)
        obs = collect_replication(repl)
        primary_name = repl_core.current_primary(repl, obs.nodes)
        if primary_name is None:
            raise AirflowFailException(f"cluster {cluster.name!r}: no node is a reachable primary, so there is nothing "
                                       "to stream from. Fix: fail over (repmgr standby promote) first")
        primary = repl.node(primary_name)
        prow = obs.nodes[primary_name]
        if node.name == primary_name:
            raise AirflowFailException(
                f"REFUSED: {node.name} is the current primary of {cluster.name} (timeline "
                f"{repl_core.node_timeline(prow)}, accepting writes); rebuilding it would destroy the cluster's data. "
                "Pick a standby or the old primary as the target")
        trow = obs.nodes.get(node.name) or {}
        if not trow.get("error") and trow.get("in_recovery") is False:
            raise AirflowFailException(
                f"REFUSED: {node.name} answers as a primary too (timeline {repl_core.node_timeline(trow)}, "
                f"{primary_name} is on {repl_core.node_timeline(prow)}): it is not stopped or replaced by a rebuild, "
                "force or not. Fix: fence it (stop PostgreSQL there, e.g. pg_ctl -D <data_directory> -m fast stop, "
                "or stop its instance), save what you need, then run again with force=true")
        sysid = str(prow.get("system_identifier") or "")
        host = self.dbhost(cluster, node)
        real = host.realpath(data_dir)
        self._refuse_other_nodes_dirs(cluster, repl, node, host, real, obs.nodes)
        target = self._refuse_unsafe_contents(node, host, data_dir, real, sysid, force)
        running, non_empty = target["running"], target["non_empty"]
        paths = standby_paths(data_dir, node.name)
        try:
            backup = core.choose_backup(self.catalog(cluster), backup_id)
        except core.RestorePlanError as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: {exc}") from None
        if backup.systemid and sysid and str(backup.systemid) != sysid:
            raise AirflowFailException(f"backup {backup.backup_id} has system identifier {backup.systemid} but the "
                                       f"primary {primary_name} has {sysid}: it is another cluster's backup. Fix: "
                                       "check storage in the inventory")
        # The cluster's identity: the primary's answer, else (a role that may not call pg_control_system()) the
        # backup's own, which the restore brings; a cluster in the target must be proven to be this one.
        sysid = sysid or str(backup.systemid or "")
        _refuse_unproven_identity(host, real, target["system_identifier"], sysid, has_control=target["has_control"],
                                  what=f"data_directory of {node.name}")
        existing, avail = host.free_bytes(posixpath.dirname(real))
        reclaim = host.used_bytes(real) if non_empty else 0
        needed = int(self.required_bytes or 0) or core.required_bytes(backup.cluster_size_bytes)
        short = core.disk_shortfall(avail_bytes=avail + reclaim, needed_bytes=needed, path=existing,
                                    backup_id=backup.backup_id)
        if short:
            raise AirflowFailException(f"cluster {cluster.name!r}: {short}")
        slot_row = [s for s in obs.slots if s.get("slot_name") == slot]
        if slot_row and slot_row[0].get("active"):
            raise AirflowFailException(f"slot {slot} on {primary_name} is active: another standby streams through it. "
                                       "Fix: stop that standby, or give this node its own slot in the inventory")
        plan = {"node": node.name, "host": host.where, "data_dir": data_dir, "data_realpath": real,
                "system_identifier": sysid, "socket_dir": socket_dir, "port": node.port or 5432,
                "db_user": self.db_user, **paths, "primary": primary_name, "primary_timeline":
                repl_core.node_timeline(prow), "slot": slot, "slot_created": False, "force": force,
                "was_running": running, "was_non_empty": non_empty, "backup_id": backup.backup_id,
                "backup_end_time": backup.end_time, "backup_size_bytes": backup.cluster_size_bytes,
                "needed_bytes": needed, "avail_bytes": avail, "repmgr": repl.repmgr, "repmgr_conf": node.repmgr_conf,
                "settings": settings, "started_at": utcnow().isoformat(), "slot_exists": bool(slot_row),
                # what the approval shows: what is stopped and removed there
                "target_pid": target["pid"], "target_state": target["state"] or None,
                "target_system_identifier": target["system_identifier"] or None, "target_used_bytes": reclaim}
        ptarget = _conn_host_port(primary.postgres_conn_id)
        plan["primary_conninfo"] = primary_conninfo(repl, primary, application_name=node.name,
                                                    fallback_host=ptarget[0], fallback_port=ptarget[1])
        self.log.info("rebuild plan: %s on %s as a standby of %s (timeline %s) from backup %s into %s (realpath %s, "
                      "port %s, slot %s%s); %s free, %s needed; nothing changed yet", node.name, host.where,
                      primary_name, plan["primary_timeline"], backup.backup_id, data_dir, real, plan["port"], slot,
                      "" if slot_row else ", to be created", core.human_bytes(avail + reclaim),
                      core.human_bytes(needed))
        return plan

    def _data_dir(self, cluster: Cluster, node: ReplicaNode) -> str:
        """The inventory's data directory of the node; the param may only repeat it."""
        inventory_dir = (node.data_directory or "").rstrip("/")
        if not inventory_dir.startswith("/"):
            raise AirflowFailException(
                f"cluster {cluster.name!r}: node {node.name} has no data_directory in the inventory, and a rebuild "
                "never guesses which directory to replace. Fix: set replication data_directory of that node")
        given = str(self.data_directory or "")
        if given and given != inventory_dir:
            raise AirflowFailException(
                f"REFUSED: param data_directory {given!r} is not the inventory's data directory of {node.name} "
                f"({inventory_dir!r}). Fix: leave data_directory empty (or give exactly {inventory_dir!r}); to move "
                "the node, change the inventory")
        return inventory_dir

    def _slot(self, node: ReplicaNode) -> str:
        own = node.slot or node.name
        given = str(self.slot or "")
        if given and given != own:
            raise AirflowFailException(
                f"REFUSED: param slot {given!r} is not {node.name}'s slot in the inventory ({own!r}); a slot named "
                "by a typo would hold WAL on the primary. Fix: leave slot empty, or change the node's slot in the "
                "inventory")
        return own

    def _refuse_other_nodes_dirs(self, cluster: Cluster, repl: Replication, node: ReplicaNode, host: DbHost,
                                 real: str, rows: dict[str, dict[str, Any]]) -> None:
        """Refuse a target directory that is, contains or lies inside another node's data directory or pg_wal on
        the same host (the same runner: one queue or one ssh connection, whatever the inventory's host says), or
        any running postmaster's directory there."""
        others: list[NodeDir] = []
        for other in repl.nodes:
            if other.name == node.name:
                continue
            same = DbHost.for_node(cluster, other).same_host(host) or (
                bool(other.host) and other.host == node.host)
            if not same:
                continue
            dirs = {d for d in (other.data_directory, (rows.get(other.name) or {}).get("data_directory")) if d}
            for d in dirs:
                d_real = host.realpath(d)
                others.append(NodeDir(other.name, "data directory", d_real))
                others.append(NodeDir(other.name, "pg_wal", host.realpath(posixpath.join(d_real, "pg_wal"))))
        for pm_dir in host.postmaster_dirs():
            if pm_dir != real:
                others.append(NodeDir(f"a running PostgreSQL on {host.where}", "data directory", pm_dir))
        for other in others:
            how = overlap(real, other.path)
            if how:
                raise AirflowFailException(
                    f"REFUSED: data directory {real} of {node.name} on {host.where} {how} the {other.what} of "
                    f"{other.node} ({other.path}); the rebuild would stop or delete it. Fix: give {node.name} its "
                    "own data directory in the inventory (or its own runner if it is another host)")

    def _refuse_unsafe_contents(self, node: ReplicaNode, host: DbHost, data_dir: str, real: str, sysid: str,
                                force: bool) -> dict[str, Any]:
        """running, non_empty, pid, state and system_identifier of the target directory, after refusing a primary,
        another cluster's files and, without force, contents that a rebuild would replace."""
        pm = host.postmaster(real)
        control = host.controldata(real)
        state = control.get("Database cluster state", "")
        their = control.get("Database system identifier", "")
        has_control = host.exists(posixpath.join(real, "global", "pg_control"))
        if has_control and not their:
            _refuse_unproven_identity(host, real, their, sysid, has_control=True, what=f"data_directory of {node.name}")
        if their and sysid and their != sysid:
            raise AirflowFailException(
                f"REFUSED: {real} on {host.where} holds a PostgreSQL cluster with system identifier {their}, not "
                f"{sysid} (this cluster's): it is another cluster's data, force or not. Fix: check the inventory's "
                f"data_directory of {node.name}")
        if pm.running and state != "in archive recovery":
            raise AirflowFailException(
                f"REFUSED: PostgreSQL (pid {pm.pid}) runs in {real} on {host.where} with cluster state {state!r}: "
                "it is a primary (or not a standby), and a rebuild never stops one, force or not. Fix: fence it "
                f"(pg_ctl -D {data_dir} -m fast stop), save what you need, then run again with force=true")
        non_empty = not host.is_empty_dir(real)
        if pm.running and not force:
            raise AirflowFailException(f"data directory {data_dir} of {node.name} is in use by a running standby "
                                       f"(pid {pm.pid}). Fix: run again with force=true to stop it and replace its "
                                       "contents")
        if non_empty and not force:
            was = f" (it was a primary: cluster state {state!r}; its writes not on the new timeline are lost)" \
                if state in ("in production", "shut down") else ""
            raise AirflowFailException(f"data directory {data_dir} of {node.name} is not empty{was}. Fix: run again "
                                       "with force=true to replace its contents")
        return {"running": pm.running, "non_empty": non_empty, "pid": pm.pid if pm.running else None,
                "state": state, "system_identifier": their, "has_control": has_control}


def _refuse_unproven_identity(host: DbHost, real: str, their: str, sysid: str, *, has_control: bool,
                              what: str) -> None:
    """Fail closed: a directory holding a PostgreSQL cluster (``has_control``: global/pg_control is there) is
    replaced only when its system identifier ``their`` was read and equals the cluster's own ``sysid``, which
    must be known. A partial restore of an earlier rebuild has no pg_control and stays replaceable with force."""
    if not has_control:
        return
    if not their:
        raise AirflowFailException(
            f"REFUSED: {real} on {host.where} holds a PostgreSQL cluster whose system identifier could not be read "
            "(pg_controldata gave none): it cannot be proven to be this cluster's, so nothing is stopped or removed, "
            f"force or not. Fix: run pg_controldata on {real} as the postgres user and repair or move the directory, "
            f"or check the inventory's {what}")
    if not sysid:
        raise AirflowFailException(
            f"REFUSED: {real} on {host.where} holds a PostgreSQL cluster (system identifier {their}), and this "
            "cluster's own is unknown (the primary did not give it and the backup does not name one), so it cannot "
            "be proven to be this cluster's; nothing is stopped or removed, force or not. Fix: let the monitoring "
            "role call pg_control_system() (GRANT EXECUTE ON FUNCTION pg_control_system() TO <role>)")
    if their != sysid:
        raise AirflowFailException(
            f"REFUSED: {real} on {host.where} holds a PostgreSQL cluster with system identifier {their}, not "
            f"{sysid} (this cluster's): it is another cluster's data, force or not. Fix: check the inventory's {what}")


class StandbyRestoreOperator(StandbyStepOperator):
    """Slot and WAL switch on the primary; stop and clear the target (force), the base backup (restore_base_backup:
    parts in parallel), standby settings, standby.signal, start.

    Pushes XCom "slot_created" when it creates the slot; returns the started standby: pid, download_s,
    restore_started_at, slot_created and the restorer's figures.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the preflight's plan (templated)
    :param wal_parallel: WAL prefetch downloads at a time in restore_command (templated)
    :param extra_settings: extra allowlisted settings for the standby (templated: a mapping or its JSON)
    """

    template_fields: Sequence[str] = ("cluster_name", "plan", "wal_parallel", "extra_settings")

    def __init__(self, *, wal_parallel: int | str = 4, extra_settings: dict[str, str] | str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.wal_parallel = wal_parallel
        self.extra_settings = extra_settings

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.planned()
        self._prepare_primary(context, cluster, plan)  # its failures leave the target as it was
        try:
            return {**self._restore(cluster, plan), "slot_created": bool(plan.get("slot_created"))}
        except AirflowFailException as exc:
            if str(exc).startswith("standby rebuild of"):
                raise
            self.fail_stopped(cluster, plan, str(exc))
        except Exception as exc:
            self.fail_stopped(cluster, plan, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    def _prepare_primary(self, context, cluster: Cluster, plan: dict[str, Any]) -> None:
        """After the approval (which may have taken hours): the primary is still the plan's, the slot is free or
        made, and the current WAL segment is archived. Nothing on the target has been touched yet."""
        repl = self.replication(cluster)
        obs = collect_replication(repl)
        now_primary = repl_core.current_primary(repl, obs.nodes)
        if now_primary != plan["primary"]:
            raise AirflowFailException(f"REFUSED: the primary of {cluster.name} is {now_primary or 'unreachable'} now, "
                                       f"not {plan['primary']} as in the preflight; nothing was changed. Fix: run the "
                                       "rebuild again (its preflight plans against the current primary)")
        trow = obs.nodes.get(plan["node"]) or {}
        if not trow.get("error") and trow.get("in_recovery") is False:
            raise AirflowFailException(f"REFUSED: {plan['node']} answers as a primary now; nothing was changed")
        primary = repl.node(plan["primary"])
        slot = plan["slot"]
        rows = pg_query(primary.postgres_conn_id, "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,))
        if rows and rows[0]["active"]:
            raise AirflowFailException(f"slot {slot} on {plan['primary']} is active: another standby streams through "
                                       "it; nothing was changed. Fix: stop that standby, or give this node its own "
                                       "slot in the inventory")
        if not rows:
            # reserve now: WAL from here on stays on the primary until the standby streams it
            pg_query(primary.postgres_conn_id, "SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            plan["slot_created"] = True
            context["ti"].xcom_push(key="slot_created", value=True)  # later steps and the report drop it on failure
            self.log.info("created physical replication slot %s on %s", slot, plan["primary"])
        try:
            self._archive_current_segment(primary.postgres_conn_id, plan["primary"])
        except Exception as exc:
            raise AirflowFailException(f"{exc}{drop_created_slot(cluster, plan, self.log)}; {plan['node']} was not "
                                       "touched") from None

    def _archive_current_segment(self, conn_id: str, primary_name: str, timeout_s: float = 300) -> None:
        """Switch WAL on the primary and wait until that segment is in the bucket.

        After a failover the segment holding the timeline switch is still open on the new primary; if recovery
        cannot fetch it, PostgreSQL replays the old timeline's copy of that segment past the switch point and
        the standby can never stream from the new primary.
        """
        from pgops.airflow.hooks import pg_query

        wal = pg_query(conn_id, "SELECT pg_walfile_name(pg_current_wal_lsn()) AS wal")[0]["wal"]
        pg_query(conn_id, "SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = pg_query(conn_id, "SELECT last_archived_wal FROM pg_stat_archiver")[0]["last_archived_wal"]
            if last and len(last) >= 24 and last[:24] >= wal:
                self.log.info("WAL segment %s of %s is archived: the restore can follow its timeline", wal, primary_name)
                return
            time.sleep(1)
        raise AirflowFailException(f"WAL segment {wal} of the primary {primary_name} was not archived within "
                                   f"{timeout_s:.0f} s (last archived: {last}); a standby restored now could replay "
                                   "the old timeline. Fix: check archive_command and pg_stat_archiver on the primary")


    def _restore(self, cluster: Cluster, plan: dict[str, Any]) -> dict[str, Any]:
        host = self.target_host(cluster, plan)
        data = plan["data_dir"]
        settings_extra = checked_settings(self.extra_settings)
        # Time passed since the preflight: prove again, on the host, what is about to be replaced.
        if host.realpath(data) != plan["data_realpath"]:
            raise AirflowFailException(f"REFUSED: {data} on {host.where} now resolves to {host.realpath(data)}, not "
                                       f"{plan['data_realpath']} as in the preflight; nothing was changed")
        their = host.controldata(data).get("Database system identifier", "")
        _refuse_unproven_identity(host, data, their, str(plan.get("system_identifier") or ""),
                                  has_control=host.exists(posixpath.join(data, "global", "pg_control")),
                                  what=f"data_directory of {plan['node']}")
        if plan["was_running"] or plan["was_non_empty"] or not host.is_empty_dir(data):
            if not plan.get("force"):
                raise AirflowFailException(f"data directory {data} of {plan['node']} is not empty any more. Fix: run "
                                           "again with force=true to replace its contents")
            self.stop_target(cluster, plan)
            host.remove_tree(data, expect_realpath=plan["data_realpath"])
            self.log.warning("removed the old contents of %s on %s (force)", data, host.where)
        host.remove_tree(plan["spool_dir"], within=posixpath.dirname(plan["data_realpath"]))
        host.run(["mkdir", "-p", "-m", "0700", data, plan["spool_dir"]])
        host.run(["mkdir", "-p", plan["socket_dir"]])
        endpoint = s3_endpoint_url(cluster.engine_aws_conn_id)
        aws_env = aws_child_env(cluster.engine_aws_conn_id)
        started_at = utcnow()
        t0 = time.monotonic()
        try:
            restored = restore_base_backup(host, cluster, backup_id=plan["backup_id"], data_dir=data, env=aws_env,
                                           log=self.log)
        except CommandFailed as exc:
            raise AirflowFailException(f"{getattr(exc, 'restorer', 'restore')} of backup {plan['backup_id']} into "
                                       f"{data} failed: {exc}") from None
        download_s = time.monotonic() - t0
        wal_argv = barman_cloud.wal_restore_argv(cluster, endpoint_url=endpoint, parallel=int(self.wal_parallel),
                                                 spool_dir=plan["spool_dir"])
        settings = standby_settings(restore_command=core.restore_command(wal_argv), conninfo=plan["primary_conninfo"],
                                    slot=plan["slot"], port=plan["port"], socket_dir=plan["socket_dir"],
                                    extra=settings_extra)
        host.run(["sh", "-c", '[ -e "$1" ] || : > "$1"', "sh", f"{data}/postgresql.conf"])
        host.run(["sh", "-c", 'printf "%s" "$1" >> "$2"', "sh",
                  core.render_conf(settings, header="pgops standby rebuild"), f"{data}/postgresql.auto.conf"])
        host.run(["rm", "-f", f"{data}/recovery.signal", f"{data}/postmaster.pid"])
        host.run(["touch", f"{data}/standby.signal"])
        self.log.info("standby settings: primary_conninfo %s, slot %s, restore_command %s", plan["primary_conninfo"],
                      plan["slot"], settings["restore_command"])
        # The postmaster inherits the AWS credentials its restore_command needs (environment, not a config file).
        host.run([pg_bin("pg_ctl"), "-D", data, "-l", plan["log_file"], "-W", "start"], env=aws_env, timeout_s=60)
        pid = wait_started(host, plan, f"standby {plan['node']}")
        self.log.info("standby %s started (postmaster pid %s) after %.1f s of download", plan["node"], pid, download_s)
        return {"pid": pid, "download_s": round(download_s, 3), "restore_started_at": started_at.isoformat(),
                **restored}


class StandbyStreamingOperator(StandbyStepOperator):
    """Deferrable wait until the standby streams with replay lag under the threshold.

    Returns ready_at, lag_bytes, timeline, replay_lsn and time_to_ready_s.

    :param cluster_name: the inventory cluster (templated)
    :param plan: the preflight's plan (templated)
    :param slot_created: the restore step's XCom "slot_created" (templated)
    :param started: the restore step's result, the started standby (templated)
    :param timeout_s: fail when the standby does not stream after this long (templated)
    :param max_lag_bytes: ready when replay lag is at most this, 0 for the inventory's max_lag_bytes (templated)
    :param poll_interval_s: seconds between two looks at the standby
    """

    template_fields: Sequence[str] = (*StandbyStepOperator.template_fields, "started", "timeout_s", "max_lag_bytes")

    def __init__(self, *, started: Mapping[str, Any] | str | None = None, timeout_s: float | str = 6 * 3600,
                 max_lag_bytes: int | str = 0, poll_interval_s: float = 2.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.started, self.timeout_s = started, timeout_s
        self.max_lag_bytes, self.poll_interval_s = max_lag_bytes, poll_interval_s

    def started_standby(self) -> dict[str, Any]:
        started = as_mapping(self.started, "started")
        if not started:
            raise AirflowFailException(f"task {self.task_id}: no started standby: the restore step did not finish")
        return started

    def run_step(self, context) -> None:
        from pgops.airflow.triggers.standby import StandbyStreamingTrigger

        cluster = self.cluster
        plan = self.planned()
        started = self.started_standby()
        max_lag = int(self.max_lag_bytes or 0) or self.replication(cluster).max_lag_bytes
        timeout_s = param_checked(check_duration, "timeout_s", self.timeout_s, MAX_STANDBY_TIMEOUT_S, min_s=60)
        self.defer(trigger=StandbyStreamingTrigger(cluster_name=cluster.name, node=plan["node"],
                                                   data_dir=plan["data_dir"], socket_dir=plan["socket_dir"],
                                                   port=plan["port"],
                                                   user=plan["db_user"], pid=started["pid"], log_file=plan["log_file"],
                                                   max_lag_bytes=max_lag, poll_interval_s=self.poll_interval_s,
                                                   timeout_s=timeout_s),
                   method_name="execute_complete", timeout=timedelta(seconds=timeout_s + 120))

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        return self._guard(context, self._complete, context, event)

    def _complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        # after the deferral this is a fresh operator: its templated arguments are rendered again from the XComs
        cluster = self.cluster
        plan = self.planned()
        if event.get("status") != "success":
            for line in event.get("log_tail") or []:
                self.log.error("server log: %s", line)
            self.fail_stopped(cluster, plan, str(event.get("message")))
        started = self.started_standby()
        ready_at = datetime.fromisoformat(event["ready_at"])
        result = {"ready_at": event["ready_at"], "lag_bytes": event.get("lag_bytes"), "timeline": event.get("timeline"),
                  "replay_lsn": event.get("replay_lsn"),
                  "time_to_ready_s": round((ready_at - datetime.fromisoformat(started["restore_started_at"]))
                                           .total_seconds(), 3)}
        self.log.info("standby %s streams from %s: %s", plan["node"], plan["primary"], result)
        return result


class StandbyRegisterOperator(StandbyStepOperator):
    """repmgr standby register --force on the target, when the cluster uses repmgr (skipped otherwise).

    :param cluster_name: the inventory cluster (templated)
    :param plan: the preflight's plan (templated)
    :param slot_created: the restore step's XCom "slot_created" (templated)
    """

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.planned()
        if not plan.get("repmgr"):
            raise AirflowSkipException(f"cluster {cluster.name!r} does not use repmgr")
        conf = plan.get("repmgr_conf") or "/etc/repmgr.conf"
        try:
            res = self.target_host(cluster, plan).run(["repmgr", "-f", conf, "standby", "register", "--force"],
                                                      capture=True, timeout_s=300)
        except CommandFailed as exc:
            self.fail_stopped(cluster, plan, f"repmgr -f {conf} standby register --force failed: {exc}")
        self.log.info("%s", res.stdout.strip())
        return {"repmgr_conf": conf}


class StandbyReportOperator(StandbyStepOperator):
    """A durable report (kind "replication", action standby-rebuild) with the time to ready and the approval; fails
    if a step failed (a rebuild that was not approved is a warning: nothing was changed).

    :param cluster_name: the inventory cluster (templated)
    :param steps: every step's outcome by task id, ``{task_id: {"value": <return value>, "error": <XCom
        "error">}}`` (templated); a step that returned nothing and recorded no error did not finish
    :param optional_steps: steps that may return nothing (repmgr's register, skipped without repmgr)
    :param gated_steps: steps that do not run when the approval is declined
    :param approval: the approval gate's record (templated)
    :param plan: the preflight's plan (templated)
    :param slot_created: the restore step's XCom "slot_created" (templated)
    :param started: the restore step's result (templated)
    :param streaming: the streaming wait's result (templated)
    :param registered: the register step's result (templated)
    """

    template_fields: Sequence[str] = (*StandbyStepOperator.template_fields, "steps", "approval", "started",
                                      "streaming", "registered")

    def __init__(self, *, steps: Mapping[str, Any] | str | None = None, optional_steps: Sequence[str] = ("register",),
                 gated_steps: Sequence[str] = ("restore", "wait_streaming", "register"),
                 approval: Mapping[str, Any] | str | None = None, started: Mapping[str, Any] | str | None = None,
                 streaming: Mapping[str, Any] | str | None = None, registered: Mapping[str, Any] | str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.steps = steps
        self.optional_steps, self.gated_steps = tuple(optional_steps), tuple(gated_steps)
        self.approval, self.started, self.streaming, self.registered = approval, started, streaming, registered

    def run_step(self, context) -> dict[str, Any]:

        cluster = self.cluster
        approval = as_mapping(self.approval, "approval")
        declined = isinstance(approval, dict) and approval.get("decision") in NOT_APPROVED
        errors, missing = step_outcomes(self.steps, (*self.optional_steps, *(self.gated_steps if declined else ())))
        failed = bool(errors or missing)
        plan = as_mapping(self.plan, "plan") or {}
        restore, wait = as_mapping(self.started, "started") or {}, as_mapping(self.streaming, "streaming") or {}
        if truthy(self.slot_created):
            plan = {**plan, "slot_created": True}
        body = {"action": "standby-rebuild", "node": plan.get("node"), "primary": plan.get("primary"),
                "data_directory": plan.get("data_dir"), "slot": plan.get("slot"), "slot_created": plan.get("slot_created"),
                "backup_id": plan.get("backup_id"), "backup_end_time": plan.get("backup_end_time"),
                "download_s": restore.get("download_s"), "time_to_ready_s": wait.get("time_to_ready_s"),
                "lag_bytes": wait.get("lag_bytes"), "timeline": wait.get("timeline"),
                "repmgr_registered": self.registered is not None, "errors": errors, "steps_not_finished": missing,
                "approval": approval, "approval_text": describe(approval)}
        from pgops.airflow.endpoint import report_state  # the client endpoint next to the replication state
        body["endpoint"] = report_state(cluster, primary=plan.get("primary"),
                                        standby=None if failed or declined else plan.get("node"))
        if failed and plan.get("slot_created"):
            # a step killed before its own failure handling ran: the slot this run created must not stay behind
            body["slot_dropped"] = drop_created_slot(cluster, plan, self.log).lstrip("; ") or None
        started = plan.get("started_at")
        status = "failed" if failed else ("warning" if declined else "ok")
        report = envelope(kind="replication", cluster=cluster.name, run_id=context["run_id"],
                          started_at=datetime.fromisoformat(started) if started else utcnow(), status=status, body=body)
        key = self.s3_hook(cluster.aws_conn_id).write_report(cluster, report)
        self.log.info("standby rebuild of %s: %s | approval: %s | from backup %s | time to ready %s s | report "
                      "s3://%s/%s", body["node"], status.upper(), body["approval_text"], body["backup_id"],
                      body["time_to_ready_s"], cluster.storage.bucket, key)
        if failed:
            what = "; ".join(f"{k}: {v}" for k, v in errors.items()) or f"step(s) {', '.join(missing)} did not finish"
            raise AirflowFailException(f"standby rebuild of {body['node']} failed: {what}")
        if declined:
            self.log.warning("%s was not rebuilt (%s): nothing was stopped, removed or created", body["node"],
                             body["approval_text"])
        return {"status": status, "key": key, "time_to_ready_s": body["time_to_ready_s"], "approval": approval}


def _conn_host_port(conn_id: str) -> tuple[str, int]:
    from pgops.airflow.hooks import pg_target

    t = pg_target(conn_id)
    return t.host, t.port


def checked_settings(value: Any) -> dict[str, str]:
    """The `settings` param, checked at run time as the trigger form checks it (a run made through the API with
    bad conf fails here, before any side effect)."""
    from pgops.core.params import check_settings

    if isinstance(value, str) and value.strip():
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise AirflowFailException(f"param settings={value[:200]!r} is not a JSON object. Fix: give "
                                       '{"name": "value", ...} or {}') from None
    return param_checked(check_settings, value or {})

