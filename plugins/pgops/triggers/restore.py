"""Deferrable wait for the end of recovery of a scratch restore (runs in the triggerer on the restore host)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgops.procs import pid_alive


def _read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


class RecoveryEndedTrigger(BaseTrigger):
    """Fires when the scratch instance is out of recovery (``pg_is_in_recovery()`` false), or fails fast.

    Failure: a FATAL/PANIC in the server log (e.g. "recovery ended before configured recovery target was
    reached"), the postmaster gone, or the timeout. The event carries the server's own words.
    """

    def __init__(self, *, socket_dir: str, port: int, user: str, pid: int, log_file: str,
                 poll_interval_s: float = 2.0, timeout_s: float = 6 * 3600.0):
        super().__init__()
        self.socket_dir = socket_dir
        self.port = int(port)
        self.user = user
        self.pid = int(pid)
        self.log_file = log_file
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"socket_dir": self.socket_dir, "port": self.port, "user": self.user, "pid": self.pid,
                 "log_file": self.log_file, "poll_interval_s": self.poll_interval_s, "timeout_s": self.timeout_s})

    def _in_recovery(self) -> bool | None:
        """True/False from the server, None when it does not accept connections yet."""
        import psycopg2

        from pgops.hooks import pg_connect_local

        try:
            conn = pg_connect_local(host=self.socket_dir, port=self.port, user=self.user, connect_timeout_s=5)
        except psycopg2.OperationalError:
            return None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                return bool(cur.fetchone()[0])
        finally:
            conn.close()

    def _error(self, message: str, log_text: str, *, timed_out: bool = False) -> TriggerEvent:
        tail = [line for line in log_text.strip().splitlines() if line.strip()][-15:]
        return TriggerEvent({"status": "error", "message": message, "log_tail": tail, "timed_out": timed_out})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from pgops.restore import parse_server_log

        deadline = time.monotonic() + self.timeout_s
        while True:
            text = await asyncio.to_thread(_read_log, self.log_file)
            parsed = parse_server_log(text)
            if parsed.failed:
                yield self._error(parsed.failure_message(), text)
                return
            try:
                in_recovery = await asyncio.to_thread(self._in_recovery)
            except Exception as exc:  # a query failing mid-shutdown: the log or the pid check says why
                self.log.warning("pg_is_in_recovery() on %s:%s failed: %s", self.socket_dir, self.port, exc)
                in_recovery = None
            if in_recovery is False:
                parsed = parse_server_log(await asyncio.to_thread(_read_log, self.log_file))
                yield TriggerEvent({"status": "success", "ended_at": datetime.now(UTC).isoformat(),
                                    "started_at": parsed.started_at, "ready_at": parsed.ready_at,
                                    "restored_segments": len(parsed.restored_segments),
                                    "last_restored_segment": (parsed.restored_segments or [None])[-1],
                                    "recovery_stop": parsed.recovery_stop})
                return
            if not pid_alive(self.pid):
                text = await asyncio.to_thread(_read_log, self.log_file)
                parsed = parse_server_log(text)
                reason = parsed.failure_message() or "no FATAL line in its log"
                yield self._error(f"PostgreSQL (postmaster pid {self.pid}) exited during recovery: {reason}", text)
                return
            if time.monotonic() >= deadline:
                yield self._error(
                    f"recovery did not end within {self.timeout_s:.0f} s ({len(parsed.restored_segments)} WAL segments "
                    f"restored so far, last {(parsed.restored_segments or ['none'])[-1]}). Fix: raise "
                    "recovery_timeout_s if the replay is just slow, or read the server log", text, timed_out=True)
                return
            await asyncio.sleep(self.poll_interval_s)
