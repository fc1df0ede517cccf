"""Deferrable wait for the end of recovery of a scratch restore.

Every observation is made on the restore host through its DbHost (the cluster's runner): the postmaster proof,
``pg_is_in_recovery()`` over the host's own socket and the server log's tail come back in one round trip, so the
triggerer needs no access to the restore host's files or processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

FULL_LOG_BYTES = 32 * 1024 * 1024


def node_host(cluster_name: str, node: str | None):
    """The DbHost of an inventory node (None: the cluster's restore host), built in the triggerer."""
    from pgops.dbhost.host import DbHost
    from pgops.inventory import load_inventory

    cluster = load_inventory().get(cluster_name)
    target = cluster.replication.node(node) if node and cluster.replication else None
    return DbHost.for_node(cluster, target)


class RecoveryEndedTrigger(BaseTrigger):
    """Fires when the scratch instance is out of recovery (``pg_is_in_recovery()`` false), or fails fast.

    Failure: a FATAL/PANIC in the server log (e.g. "recovery ended before configured recovery target was
    reached"), the postmaster gone, or the timeout. The event carries the server's own words.

    :param cluster_name: the inventory cluster
    :param data_dir: the instance's data directory
    :param socket_dir: the instance's unix socket directory
    :param port: the instance's port
    :param user: the database user the probe connects as
    :param pid: the postmaster started by the restore step
    :param log_file: the instance's server log
    :param node: a replication node whose host runs the instance (None: the cluster's restore host)
    :param poll_interval_s: seconds between two probes
    :param timeout_s: fail (``timed_out`` in the event) when recovery has not ended after this long
    :param progress: {"run_id", "what", "target"}: publish the replay position as progress records
    :param progress_interval_s: seconds between two progress records
    """

    def __init__(self, *, cluster_name: str, data_dir: str, socket_dir: str, port: int, user: str, pid: int,
                 log_file: str, node: str | None = None, poll_interval_s: float = 2.0, timeout_s: float = 6 * 3600.0,
                 progress: dict[str, Any] | None = None, progress_interval_s: float = 30.0):
        super().__init__()
        self.cluster_name = cluster_name
        self.node = node
        self.data_dir = data_dir
        self.socket_dir = socket_dir
        self.port = int(port)
        self.user = user
        self.pid = int(pid)
        self.log_file = log_file
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        # progress: {"run_id", "what", "target"}: the replay LSN goes to the log and the dashboard's record
        self.progress = progress
        self.progress_interval_s = progress_interval_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"cluster_name": self.cluster_name, "node": self.node, "data_dir": self.data_dir,
                 "socket_dir": self.socket_dir, "port": self.port, "user": self.user, "pid": self.pid,
                 "log_file": self.log_file, "poll_interval_s": self.poll_interval_s, "timeout_s": self.timeout_s,
                 "progress": self.progress, "progress_interval_s": self.progress_interval_s})

    def _error(self, message: str, log_text: str, *, timed_out: bool = False) -> TriggerEvent:
        tail = [line for line in log_text.strip().splitlines() if line.strip()][-15:]
        return TriggerEvent({"status": "error", "message": message, "log_tail": tail, "timed_out": timed_out})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from pgops.core.restore import parse_server_log

        host = await asyncio.to_thread(node_host, self.cluster_name, self.node)
        started = time.monotonic()
        deadline = started + self.timeout_s
        next_report = started + self.progress_interval_s
        restored = 0
        while True:
            try:
                probe = await asyncio.to_thread(
                    host.probe, self.data_dir, socket_dir=self.socket_dir, port=self.port, user=self.user,
                    sql="SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", log_file=self.log_file)
            except Exception as exc:  # the host is briefly unreachable: keep polling until the deadline
                self.log.warning("probing the scratch instance on %s failed: %s", host.where, exc)
                probe = None
            if probe is not None:
                parsed = parse_server_log(probe.log_tail)
                restored = max(restored, len(parsed.restored_segments))
                if parsed.failed:
                    yield self._error(parsed.failure_message(), probe.log_tail)
                    return
                if probe.rows and probe.rows[0][0] == "f":
                    full = await asyncio.to_thread(host.read_tail, self.log_file, FULL_LOG_BYTES)
                    parsed = parse_server_log(full)
                    if self.progress is not None:  # the last word: where replay ended, however short it was
                        await asyncio.to_thread(self._report, probe.rows, len(parsed.restored_segments),
                                                time.monotonic() - started, parsed.replay_lsn)
                    yield TriggerEvent({"status": "success", "ended_at": datetime.now(UTC).isoformat(),
                                        "started_at": parsed.started_at, "ready_at": parsed.ready_at,
                                        "restored_segments": len(parsed.restored_segments),
                                        "last_restored_segment": (parsed.restored_segments or [None])[-1],
                                        "recovery_stop": parsed.recovery_stop})
                    return
                if self.progress is not None and time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.progress_interval_s
                    await asyncio.to_thread(self._report, probe.rows, restored, time.monotonic() - started,
                                            parsed.replay_lsn)
                if not probe.postmaster.running or probe.postmaster.pid != self.pid:
                    reason = parsed.failure_message() or "no FATAL line in its log"
                    yield self._error(f"PostgreSQL (postmaster pid {self.pid}) exited during recovery "
                                      f"(postmaster.pid: {probe.postmaster.state}): {reason}", probe.log_tail)
                    return
            if time.monotonic() >= deadline:
                yield self._error(
                    f"recovery did not end within {self.timeout_s:.0f} s (at least {restored} WAL segments restored "
                    "so far). Fix: raise recovery_timeout_s if the replay is just slow, or read the server log",
                    probe.log_tail if probe else "", timed_out=True)
                return
            await asyncio.sleep(self.poll_interval_s)

    def _report(self, rows: list, restored: int, elapsed_s: float, log_lsn: str | None = None) -> None:
        from pgops.airflow import progress as P

        info = self.progress or {}
        # the server answers SQL only once consistent; until then its log names the replay position
        lsn = (rows[0][1] if rows and len(rows[0]) > 1 else None) or log_lsn
        record = {"kind": "restore", "what": info.get("what", "replay"), "run_id": info.get("run_id"),
                  "state": "running", "lsn": lsn or None, "elapsed_s": round(elapsed_s, 1),
                  "note": f"{restored} WAL segment(s) restored, target {info.get('target', '?')}"}
        P.publish_for_cluster(self.cluster_name, "restore", record, self.log)
