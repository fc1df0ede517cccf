"""Standby rebuild operators: preflight, restore from the backup as a standby, wait until it streams, repmgr, report.

The target is an inventory replication node that is not the current primary. Commands on its host go through the
cluster's runner; the primary is only read, plus its replication slot created when missing. Any failure after the
preflight stops the target and names its data directory in the error.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pgops import replication as repl_core
from pgops import restore as core
from pgops.engines import barman_cloud
from pgops.hooks import aws_child_env, s3_client, s3_endpoint_url
from pgops.inventory import Cluster, ReplicaNode, Replication
from pgops.operators.restore import RestoreStepOperator, _tail, _truthy, pg_bin
from pgops.reports import envelope, utcnow, write_report
from pgops.runners import CommandFailed

STANDBY_STEPS = ("preflight", "restore", "wait_streaming", "register")


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
    template_fields: Sequence[str] = ("cluster_name",)

    def __init__(self, *, setup_task_id: str = "preflight", **kwargs: Any):
        super().__init__(setup_task_id=setup_task_id, **kwargs)

    def replication(self, cluster: Cluster) -> Replication:
        if cluster.replication is None or not cluster.replication.standbys:
            raise AirflowFailException(f"cluster {cluster.name!r} has no replication section with standbys in the "
                                       "inventory. Fix: add replication.primary and replication.standbys")
        return cluster.replication

    def stop_target(self, cluster: Cluster, data_dir: str) -> int | None:
        """Stop the target's postmaster (pg_ctl -m fast, then its pid); leave the data directory in place."""
        from pgops.procs import pid_alive

        pid = None
        try:
            pid = int(open(f"{data_dir}/postmaster.pid").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        if pid and pid_alive(pid):
            self.log.warning("stopping PostgreSQL (pid %s) in %s", pid, data_dir)
            self.host(cluster, [pg_bin("pg_ctl"), "-D", data_dir, "-m", "fast", "-w", "-t", "60", "stop"], check=False,
                      timeout_s=120)
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                self.host(cluster, ["kill", "-KILL", str(pid)], check=False)
        return pid

    def fail_stopped(self, cluster: Cluster, plan: dict[str, Any], message: str) -> None:
        try:
            self.stop_target(cluster, plan["data_dir"])
        except Exception as exc:  # the error below still names the directory; say the stop failed too
            message += f" (stopping it failed too: {exc})"
        raise AirflowFailException(f"standby rebuild of {plan['node']} failed: {message}. The target is stopped; its "
                                   f"data directory {plan['data_dir']} is left as it is (server log "
                                   f"{plan['log_file']}). Fix the cause and run the rebuild again with force")


class StandbyPreflightOperator(StandbyStepOperator):
    """Refuse a target that is the current primary; pick the backup; check disk; make sure the slot exists."""

    template_fields: Sequence[str] = ("cluster_name", "target", "data_directory", "slot", "force", "backup",
                                      "socket_dir", "required_bytes")

    def __init__(self, *, target: str, data_directory: str = "", slot: str = "", force: bool | str = False,
                 backup: str = "latest", socket_dir: str = "/var/run/postgresql", required_bytes: int | str = 0,
                 db_user: str = "postgres", **kwargs: Any):
        super().__init__(**kwargs)
        self.target, self.data_directory, self.slot, self.force = target, data_directory, slot, force
        self.backup, self.socket_dir, self.required_bytes, self.db_user = backup, socket_dir, required_bytes, db_user

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        repl = self.replication(cluster)
        try:
            node = repl.node(str(self.target))
        except Exception as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: {exc}. Fix: set the 'target' param") from None
        force = _truthy(self.force)
        obs = repl_core.collect(repl)
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
        data_dir = str(self.data_directory or node.data_directory or "").rstrip("/")
        if not data_dir.startswith("/") or data_dir in ("/", ""):
            raise AirflowFailException(f"data directory {data_dir!r} for {node.name} is not an absolute path. Fix: set "
                                       "the 'data_directory' param or replication data_directory in the inventory")
        if prow.get("data_directory") == data_dir and (primary.host or "") == (node.host or ""):
            raise AirflowFailException(f"REFUSED: {data_dir} on {node.host} is the data directory of the current "
                                       f"primary {primary_name}. Fix: give the target's own data directory")
        trow = obs.nodes.get(node.name) or {}
        if not trow.get("error") and trow.get("in_recovery") is False and not force:
            raise AirflowFailException(
                f"REFUSED: {node.name} is running as a primary too (timeline {repl_core.node_timeline(trow)}, "
                f"{primary_name} is on {repl_core.node_timeline(prow)}); its writes since the failover would be lost. "
                "Fix: fence it, save what you need, then run again with force=true")
        paths = standby_paths(data_dir, node.name)
        socket_dir = str(self.socket_dir)
        problem = core.socket_path_problem(socket_dir)
        if problem:
            raise AirflowFailException(problem)
        status = self.host(cluster, [pg_bin("pg_ctl"), "-D", data_dir, "status"], check=False, capture=True)
        running = status.returncode == 0
        listing = self.host(cluster, ["sh", "-c", 'ls -A "$1" 2>/dev/null | head -1', "sh", data_dir], capture=True)
        non_empty = bool(listing.stdout.strip())
        if (running or non_empty) and not force:
            raise AirflowFailException(
                f"data directory {data_dir} of {node.name} is {'in use by a running PostgreSQL' if running else 'not empty'}"
                ". Fix: run again with force=true to stop it and replace its contents")
        try:
            backup = core.choose_backup(self.catalog(cluster), str(self.backup or "latest"))
        except core.RestorePlanError as exc:
            raise AirflowFailException(f"cluster {cluster.name!r}: {exc}") from None
        if backup.systemid and prow.get("system_identifier") and str(backup.systemid) != str(prow["system_identifier"]):
            raise AirflowFailException(f"backup {backup.backup_id} has system identifier {backup.systemid} but the "
                                       f"primary {primary_name} has {prow['system_identifier']}: it is another "
                                       "cluster's backup. Fix: check storage in the inventory")
        parent = posixpath.dirname(data_dir)
        existing = self.host(cluster, ["sh", "-c", 'd="$1"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; '
                                       'echo "$d"', "sh", parent], capture=True).stdout.strip() or "/"
        avail = core.parse_df_avail(self.host(cluster, ["df", "-B1", "--output=avail", existing], capture=True).stdout)
        reclaim = 0
        if non_empty:
            du = self.host(cluster, ["du", "-sb", data_dir], capture=True, check=False).stdout.split()
            reclaim = int(du[0]) if du and du[0].isdigit() else 0
        needed = int(self.required_bytes or 0) or core.required_bytes(backup.cluster_size_bytes)
        short = core.disk_shortfall(avail_bytes=avail + reclaim, needed_bytes=needed, path=existing,
                                    backup_id=backup.backup_id)
        if short:
            raise AirflowFailException(f"cluster {cluster.name!r}: {short}")
        slot = str(self.slot or node.slot or node.name)
        slot_row = [s for s in obs.slots if s.get("slot_name") == slot]
        if slot_row and slot_row[0].get("active"):
            raise AirflowFailException(f"slot {slot} on {primary_name} is active: another standby streams through it. "
                                       "Fix: give this node its own slot (the 'slot' param)")
        created = False
        if not slot_row:
            from pgops.hooks import pg_query

            # reserve now: WAL from here on stays on the primary until the standby streams it
            pg_query(primary.postgres_conn_id, "SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            created = True
            self.log.info("created physical replication slot %s on %s", slot, primary_name)
        self._archive_current_segment(primary.postgres_conn_id, primary_name)
        ptarget = _conn_host_port(primary.postgres_conn_id)
        conninfo = primary_conninfo(repl, primary, application_name=node.name, fallback_host=ptarget[0],
                                    fallback_port=ptarget[1])
        plan = {"node": node.name, "data_dir": data_dir, "socket_dir": socket_dir, "port": node.port or 5432,
                "db_user": self.db_user, **paths, "primary": primary_name, "primary_timeline":
                repl_core.node_timeline(prow), "primary_conninfo": conninfo, "slot": slot, "slot_created": created,
                "force": force, "was_running": running, "was_non_empty": non_empty, "backup_id": backup.backup_id,
                "backup_end_time": backup.end_time, "backup_size_bytes": backup.cluster_size_bytes,
                "needed_bytes": needed, "avail_bytes": avail, "repmgr": repl.repmgr, "repmgr_conf": node.repmgr_conf,
                "started_at": utcnow().isoformat()}
        self.log.info("rebuild plan: %s as a standby of %s (timeline %s) from backup %s into %s (port %s, slot %s); "
                      "%s free, %s needed", node.name, primary_name, plan["primary_timeline"], backup.backup_id,
                      data_dir, plan["port"], slot, core.human_bytes(avail + reclaim), core.human_bytes(needed))
        return plan


    def _archive_current_segment(self, conn_id: str, primary_name: str, timeout_s: float = 300) -> None:
        """Switch WAL on the primary and wait until that segment is in the bucket.

        After a failover the segment holding the timeline switch is still open on the new primary; if recovery
        cannot fetch it, PostgreSQL replays the old timeline's copy of that segment past the switch point and
        the standby can never stream from the new primary.
        """
        from pgops.hooks import pg_query

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


class StandbyRestoreOperator(StandbyStepOperator):
    """Stop and clear the target (force), barman-cloud-restore, standby settings, standby.signal, start."""

    template_fields: Sequence[str] = ("cluster_name", "wal_parallel", "extra_settings")

    def __init__(self, *, wal_parallel: int | str = 4, extra_settings: dict[str, str] | str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.wal_parallel = wal_parallel
        self.extra_settings = extra_settings

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.plan(context)
        try:
            return self._restore(cluster, plan)
        except AirflowFailException as exc:
            if str(exc).startswith("standby rebuild of"):
                raise
            self.fail_stopped(cluster, plan, str(exc))
        except Exception as exc:
            self.fail_stopped(cluster, plan, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    def _restore(self, cluster: Cluster, plan: dict[str, Any]) -> dict[str, Any]:
        data = plan["data_dir"]
        if plan["was_running"] or plan["was_non_empty"]:
            self.stop_target(cluster, data)
            self.host(cluster, ["rm", "-rf", "--one-file-system", data], timeout_s=3600)
            self.log.warning("removed the old contents of %s (force)", data)
        self.host(cluster, ["rm", "-rf", "--one-file-system", plan["spool_dir"]])
        self.host(cluster, ["mkdir", "-p", "-m", "0700", data, plan["spool_dir"]])
        self.host(cluster, ["mkdir", "-p", plan["socket_dir"]])
        endpoint = s3_endpoint_url(cluster.aws_conn_id)
        aws_env = aws_child_env(cluster.aws_conn_id)
        started_at = utcnow()
        t0 = time.monotonic()
        try:
            self.host(cluster, barman_cloud.restore_argv(cluster, endpoint_url=endpoint, backup_id=plan["backup_id"],
                                                         destination_dir=data),
                      env=aws_env, timeout_s=cluster.engine.timeout_s)
        except CommandFailed as exc:
            raise AirflowFailException(f"barman-cloud-restore of backup {plan['backup_id']} into {data} failed: "
                                       f"{exc}") from None
        download_s = time.monotonic() - t0
        wal_argv = barman_cloud.wal_restore_argv(cluster, endpoint_url=endpoint, parallel=int(self.wal_parallel),
                                                 spool_dir=plan["spool_dir"])
        settings = standby_settings(restore_command=core.restore_command(wal_argv), conninfo=plan["primary_conninfo"],
                                    slot=plan["slot"], port=plan["port"], socket_dir=plan["socket_dir"],
                                    extra=_as_dict(self.extra_settings))
        self.host(cluster, ["sh", "-c", '[ -e "$1" ] || : > "$1"', "sh", f"{data}/postgresql.conf"])
        self.host(cluster, ["sh", "-c", 'printf "%s" "$1" >> "$2"', "sh",
                            core.render_conf(settings, header="pgops standby rebuild"), f"{data}/postgresql.auto.conf"])
        self.host(cluster, ["rm", "-f", f"{data}/recovery.signal", f"{data}/postmaster.pid"])
        self.host(cluster, ["touch", f"{data}/standby.signal"])
        self.log.info("standby settings: primary_conninfo %s, slot %s, restore_command %s", plan["primary_conninfo"],
                      plan["slot"], settings["restore_command"])
        # The postmaster inherits the AWS credentials its restore_command needs (environment, not a config file).
        self.host(cluster, [pg_bin("pg_ctl"), "-D", data, "-l", plan["log_file"], "-W", "start"], env=aws_env,
                  timeout_s=60)
        pid = self._wait_pid(plan)
        self.log.info("standby %s started (postmaster pid %s) after %.1f s of download", plan["node"], pid, download_s)
        return {"pid": pid, "download_s": round(download_s, 3), "restore_started_at": started_at.isoformat()}

    def _wait_pid(self, plan: dict[str, Any], timeout_s: float = 60) -> int:
        from pgops.procs import pid_alive

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                pid = int(open(f"{plan['data_dir']}/postmaster.pid").read().split()[0])
                if pid_alive(pid):
                    return pid
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.2)
        raise AirflowFailException(f"PostgreSQL wrote no postmaster.pid within {timeout_s:.0f} s; server log: "
                                   f"{_tail(plan['log_file'])}")


class StandbyStreamingOperator(StandbyStepOperator):
    """Deferrable wait until the standby streams with replay lag under the threshold."""

    template_fields: Sequence[str] = ("cluster_name", "timeout_s", "max_lag_bytes")

    def __init__(self, *, restore_task_id: str = "restore", timeout_s: float | str = 6 * 3600,
                 max_lag_bytes: int | str = 0, poll_interval_s: float = 2.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.restore_task_id, self.timeout_s = restore_task_id, timeout_s
        self.max_lag_bytes, self.poll_interval_s = max_lag_bytes, poll_interval_s

    def run_step(self, context) -> None:
        from pgops.triggers.standby import StandbyStreamingTrigger

        cluster = self.cluster
        plan = self.plan(context)
        started = context["ti"].xcom_pull(task_ids=self.restore_task_id)
        if not started:
            raise AirflowFailException(f"no started standby from task {self.restore_task_id!r}")
        max_lag = int(self.max_lag_bytes or 0) or self.replication(cluster).max_lag_bytes
        timeout_s = float(self.timeout_s)
        self.defer(trigger=StandbyStreamingTrigger(socket_dir=plan["socket_dir"], port=plan["port"],
                                                   user=plan["db_user"], pid=started["pid"], log_file=plan["log_file"],
                                                   max_lag_bytes=max_lag, poll_interval_s=self.poll_interval_s,
                                                   timeout_s=timeout_s),
                   method_name="execute_complete", timeout=timedelta(seconds=timeout_s + 120))

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        return self._guard(context, self._complete, context, event)

    def _complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.plan(context)
        if event.get("status") != "success":
            for line in event.get("log_tail") or []:
                self.log.error("server log: %s", line)
            self.fail_stopped(cluster, plan, str(event.get("message")))
        started = context["ti"].xcom_pull(task_ids=self.restore_task_id)
        ready_at = datetime.fromisoformat(event["ready_at"])
        result = {"ready_at": event["ready_at"], "lag_bytes": event.get("lag_bytes"), "timeline": event.get("timeline"),
                  "replay_lsn": event.get("replay_lsn"),
                  "time_to_ready_s": round((ready_at - datetime.fromisoformat(started["restore_started_at"]))
                                           .total_seconds(), 3)}
        self.log.info("standby %s streams from %s: %s", plan["node"], plan["primary"], result)
        return result


class StandbyRegisterOperator(StandbyStepOperator):
    """repmgr standby register --force on the target, when the cluster uses repmgr."""

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        plan = self.plan(context)
        if not plan.get("repmgr"):
            raise AirflowSkipException(f"cluster {cluster.name!r} does not use repmgr")
        conf = plan.get("repmgr_conf") or "/etc/repmgr.conf"
        try:
            res = self.host(cluster, ["repmgr", "-f", conf, "standby", "register", "--force"], capture=True,
                            timeout_s=300)
        except CommandFailed as exc:
            self.fail_stopped(cluster, plan, f"repmgr -f {conf} standby register --force failed: {exc}")
        self.log.info("%s", res.stdout.strip())
        return {"repmgr_conf": conf}


class StandbyReportOperator(StandbyStepOperator):
    """A durable report (kind "replication", action standby-rebuild) with the time to ready; fails if a step failed."""

    def run_step(self, context) -> dict[str, Any]:
        cluster = self.cluster
        ti = context["ti"]
        errors = {s: ti.xcom_pull(task_ids=s, key="error") for s in STANDBY_STEPS}
        errors = {k: v for k, v in errors.items() if v}
        values = {s: ti.xcom_pull(task_ids=s) for s in STANDBY_STEPS}
        missing = [s for s in STANDBY_STEPS if s != "register" and values.get(s) is None and s not in errors]
        failed = bool(errors or missing)
        plan, restore, wait = values.get("preflight") or {}, values.get("restore") or {}, values.get("wait_streaming") or {}
        body = {"action": "standby-rebuild", "node": plan.get("node"), "primary": plan.get("primary"),
                "data_directory": plan.get("data_dir"), "slot": plan.get("slot"), "slot_created": plan.get("slot_created"),
                "backup_id": plan.get("backup_id"), "backup_end_time": plan.get("backup_end_time"),
                "download_s": restore.get("download_s"), "time_to_ready_s": wait.get("time_to_ready_s"),
                "lag_bytes": wait.get("lag_bytes"), "timeline": wait.get("timeline"),
                "repmgr_registered": values.get("register") is not None, "errors": errors, "steps_not_finished": missing}
        started = plan.get("started_at")
        report = envelope(kind="replication", cluster=cluster.name, run_id=context["run_id"],
                          started_at=datetime.fromisoformat(started) if started else utcnow(),
                          status="failed" if failed else "ok", body=body)
        key = write_report(s3_client(cluster.aws_conn_id), cluster, report)
        self.log.info("standby rebuild of %s: %s | from backup %s | time to ready %s s | report s3://%s/%s",
                      body["node"], report["status"].upper(), body["backup_id"], body["time_to_ready_s"],
                      cluster.storage.bucket, key)
        if failed:
            what = "; ".join(f"{k}: {v}" for k, v in errors.items()) or f"step(s) {', '.join(missing)} did not finish"
            raise AirflowFailException(f"standby rebuild of {body['node']} failed: {what}")
        return {"status": "ok", "key": key, "time_to_ready_s": body["time_to_ready_s"]}


def _conn_host_port(conn_id: str) -> tuple[str, int]:
    from pgops.hooks import pg_target

    t = pg_target(conn_id)
    return t.host, t.port


def _as_dict(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if isinstance(value, str):
        import json

        value = json.loads(value)
    return {str(k): str(v) for k, v in dict(value).items()}

