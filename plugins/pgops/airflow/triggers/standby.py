"""Deferrable wait until a rebuilt standby streams from its primary with little lag.

Observed on the standby's own host through its DbHost (the node's runner): the postmaster proof, the streaming
state over the host's socket and the server log's tail, in one round trip per poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgops.airflow.triggers.restore import node_host

STREAMING_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       (SELECT status FROM pg_stat_wal_receiver) AS status,
       (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli,
       (SELECT pg_wal_lsn_diff(latest_end_lsn, pg_last_wal_replay_lsn())::bigint FROM pg_stat_wal_receiver) AS lag_bytes,
       pg_last_wal_replay_lsn()::text AS replay_lsn
"""
STREAMING_COLUMNS = ("in_recovery", "status", "received_tli", "lag_bytes", "replay_lsn")


def streaming_state(row: list[str]) -> dict[str, Any]:
    """STREAMING_SQL's row as psql's CSV gives it (text; NULL is '')."""
    raw = dict(zip(STREAMING_COLUMNS, row, strict=True))
    return {"in_recovery": raw["in_recovery"] == "t", "status": raw["status"] or None,
            "received_tli": int(raw["received_tli"]) if raw["received_tli"] else None,
            "lag_bytes": int(raw["lag_bytes"]) if raw["lag_bytes"] else None, "replay_lsn": raw["replay_lsn"] or None}


class StandbyStreamingTrigger(BaseTrigger):
    """Fires when the standby is in recovery, its WAL receiver streams and replay is within ``max_lag_bytes`` of
    what the primary last reported; fails when the postmaster is gone, the node left recovery, or the timeout.

    :param cluster_name: the inventory cluster
    :param node: the replication node rebuilt (its DbHost observes it)
    :param data_dir: the standby's data directory
    :param socket_dir: the standby's unix socket directory
    :param port: the standby's port
    :param user: the database user the probe connects as
    :param pid: the postmaster started by the restore step
    :param log_file: the standby's server log
    :param max_lag_bytes: ready when replay lag is at most this
    :param poll_interval_s: seconds between two probes
    :param timeout_s: fail when the standby does not stream after this long
    """

    def __init__(self, *, cluster_name: str, node: str, data_dir: str, socket_dir: str, port: int, user: str,
                 pid: int, log_file: str, max_lag_bytes: int, poll_interval_s: float = 2.0,
                 timeout_s: float = 6 * 3600.0):
        super().__init__()
        self.cluster_name, self.node, self.data_dir = cluster_name, node, data_dir
        self.socket_dir, self.port, self.user, self.pid = socket_dir, int(port), user, int(pid)
        self.log_file, self.max_lag_bytes = log_file, int(max_lag_bytes)
        self.poll_interval_s, self.timeout_s = poll_interval_s, timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"cluster_name": self.cluster_name, "node": self.node, "data_dir": self.data_dir,
                 "socket_dir": self.socket_dir, "port": self.port, "user": self.user, "pid": self.pid,
                 "log_file": self.log_file, "max_lag_bytes": self.max_lag_bytes,
                 "poll_interval_s": self.poll_interval_s, "timeout_s": self.timeout_s})

    def _error(self, message: str, log_text: str) -> TriggerEvent:
        tail = [line for line in log_text.strip().splitlines() if line.strip()][-15:]
        return TriggerEvent({"status": "error", "message": message, "log_tail": tail})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        host = await asyncio.to_thread(node_host, self.cluster_name, self.node)
        deadline = time.monotonic() + self.timeout_s
        last: dict[str, Any] | None = None
        log_tail = ""
        while True:
            try:
                probe = await asyncio.to_thread(
                    host.probe, self.data_dir, socket_dir=self.socket_dir, port=self.port, user=self.user,
                    sql=STREAMING_SQL, log_file=self.log_file, log_bytes=64 * 1024)
            except Exception as exc:  # the host is briefly unreachable: keep polling until the deadline
                self.log.warning("probing standby %s on %s failed: %s", self.node, host.where, exc)
                probe = None
            if probe is not None:
                log_tail = probe.log_tail
                if probe.rows:
                    state = last = streaming_state(probe.rows[0])
                    if not state["in_recovery"]:
                        yield self._error("the node left recovery: it is a primary now, not a standby (was "
                                          "standby.signal removed, or promote called?)", log_tail)
                        return
                    if state["status"] == "streaming" and state["lag_bytes"] is not None \
                            and state["lag_bytes"] <= self.max_lag_bytes:
                        yield TriggerEvent({"status": "success", "ready_at": datetime.now(UTC).isoformat(),
                                            "lag_bytes": state["lag_bytes"], "timeline": state["received_tli"],
                                            "replay_lsn": state["replay_lsn"]})
                        return
                if not probe.postmaster.running or probe.postmaster.pid != self.pid:
                    yield self._error(f"PostgreSQL (postmaster pid {self.pid}) exited before the standby streamed "
                                      f"(postmaster.pid: {probe.postmaster.state})", log_tail)
                    return
            if time.monotonic() >= deadline:
                yield self._error(f"the standby did not stream with lag <= {self.max_lag_bytes} bytes within "
                                  f"{self.timeout_s:.0f} s (last state: {last or 'not accepting connections'})",
                                  log_tail)
                return
            await asyncio.sleep(self.poll_interval_s)
