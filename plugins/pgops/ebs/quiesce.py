"""Quiesce PostgreSQL for the final snapshot, with a watchdog that always undoes it.

`backup` mode holds ONE session through pg_backup_start .. pg_backup_stop. PostgreSQL aborts a
non-exclusive backup when its session ends, so the session itself is the watchdog: if the task's
process dies, its socket closes and the backend ends the backup. Two more bounds cover a hung (not
dead) task: the session's idle_session_timeout ends it on the server side, and a local timer closes
it after `timeout_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class QuiesceError(RuntimeError):
    pass


@dataclass
class BackupQuiesce:
    label: str
    start_lsn: str | None = None
    stop_lsn: str | None = None
    backup_label: str | None = None
    tablespace_map: str | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    held_s: float | None = None
    backend_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "start_lsn": self.start_lsn, "stop_lsn": self.stop_lsn,
                "backup_label": self.backup_label, "tablespace_map": self.tablespace_map or None,
                "held_s": self.held_s, "backend_pid": self.backend_pid}


@contextmanager
def backup_mode(connect: Callable[[], Any], *, label: str, timeout_s: float = 600.0,
                log: Callable[..., None] = print) -> Iterator[BackupQuiesce]:
    """pg_backup_start in one held session; pg_backup_stop on exit (or the session ends, which aborts it)."""
    conn = connect()
    conn.autocommit = True
    state = BackupQuiesce(label=label)
    timer: threading.Timer | None = None
    try:
        with conn.cursor() as cur:
            # Server-side bound: if this process hangs between statements, PostgreSQL ends the session.
            cur.execute("SET idle_session_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
            cur.execute("SELECT pg_backend_pid()")
            state.backend_pid = cur.fetchone()[0]
            cur.execute("SELECT pg_backup_start(%s, true)::text", (label,))
            state.start_lsn = cur.fetchone()[0]
        log(f"pg_backup_start({label!r}) at {state.start_lsn} (backend pid {state.backend_pid}); the backup ends "
            f"with this session, at the latest after {timeout_s:.0f} s")
        timer = threading.Timer(timeout_s, _close_quietly, args=(conn,))
        timer.daemon = True
        timer.start()
        yield state
        with conn.cursor() as cur:
            cur.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)")
            state.stop_lsn, state.backup_label, state.tablespace_map = cur.fetchone()
        state.held_s = time.monotonic() - state.started_monotonic
        log(f"pg_backup_stop at {state.stop_lsn} after {state.held_s:.1f} s")
    finally:
        if timer is not None:
            timer.cancel()
        if state.stop_lsn is None:
            log("leaving backup mode without pg_backup_stop: closing the session, PostgreSQL aborts the backup")
        _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead connection must not hide the real error
        pass
