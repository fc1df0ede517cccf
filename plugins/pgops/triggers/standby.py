"""Deferrable wait until a rebuilt standby streams from its primary with little lag (runs on the standby's host)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgops.procs import pid_alive
from pgops.triggers.restore import _read_log

STREAMING_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       (SELECT status FROM pg_stat_wal_receiver) AS status,
       (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli,
       (SELECT pg_wal_lsn_diff(latest_end_lsn, pg_last_wal_replay_lsn())::bigint FROM pg_stat_wal_receiver) AS lag_bytes,
       pg_last_wal_replay_lsn()::text AS replay_lsn
"""


class StandbyStreamingTrigger(BaseTrigger):
    """Fires when the standby is in recovery, its WAL receiver streams and replay is within ``max_lag_bytes`` of
    what the primary last reported; fails when the postmaster is gone, the node left recovery, or the timeout."""

    def __init__(self, *, socket_dir: str, port: int, user: str, pid: int, log_file: str, max_lag_bytes: int,
                 poll_interval_s: float = 2.0, timeout_s: float = 6 * 3600.0):
        super().__init__()
        self.socket_dir, self.port, self.user, self.pid = socket_dir, int(port), user, int(pid)
        self.log_file, self.max_lag_bytes = log_file, int(max_lag_bytes)
        self.poll_interval_s, self.timeout_s = poll_interval_s, timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"socket_dir": self.socket_dir, "port": self.port, "user": self.user, "pid": self.pid,
                 "log_file": self.log_file, "max_lag_bytes": self.max_lag_bytes,
                 "poll_interval_s": self.poll_interval_s, "timeout_s": self.timeout_s})

    def _state(self) -> dict[str, Any] | None:
        import psycopg2

        from pgops.hooks import pg_connect_local

        try:
            conn = pg_connect_local(host=self.socket_dir, port=self.port, user=self.user, connect_timeout_s=5)
        except psycopg2.OperationalError:
            return None  # still starting or replaying up to consistency
        try:
            with conn.cursor() as cur:
                cur.execute(STREAMING_SQL)
                cols = [d.name for d in cur.description]
                return dict(zip(cols, cur.fetchone(), strict=True))
        finally:
            conn.close()

    def _error(self, message: str) -> TriggerEvent:
        tail = [line for line in _read_log(self.log_file).strip().splitlines() if line.strip()][-15:]
        return TriggerEvent({"status": "error", "message": message, "log_tail": tail})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + self.timeout_s
        last: dict[str, Any] | None = None
        while True:
            try:
                state = await asyncio.to_thread(self._state)
            except Exception as exc:  # a query failing while the server shuts down: the pid check says why
                self.log.warning("standby on %s:%s: %s", self.socket_dir, self.port, exc)
                state = None
            if state is not None:
                last = state
                if not state["in_recovery"]:
                    yield self._error("the node left recovery: it is a primary now, not a standby (was standby.signal "
                                      "removed, or promote called?)")
                    return
                if state["status"] == "streaming" and state["lag_bytes"] is not None \
                        and state["lag_bytes"] <= self.max_lag_bytes:
                    yield TriggerEvent({"status": "success", "ready_at": datetime.now(UTC).isoformat(),
                                        "lag_bytes": int(state["lag_bytes"]), "timeline": state["received_tli"],
                                        "replay_lsn": state["replay_lsn"]})
                    return
            if not pid_alive(self.pid):
                yield self._error(f"PostgreSQL (postmaster pid {self.pid}) exited before the standby streamed")
                return
            if time.monotonic() >= deadline:
                yield self._error(f"the standby did not stream with lag <= {self.max_lag_bytes} bytes within "
                                  f"{self.timeout_s:.0f} s (last state: {last or 'not accepting connections'})")
                return
            await asyncio.sleep(self.poll_interval_s)
