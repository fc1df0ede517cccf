"""Quiesce PostgreSQL for the final snapshot, with a watchdog that always undoes it.

`backup` mode holds ONE session through pg_backup_start .. pg_backup_stop. PostgreSQL aborts a
non-exclusive backup when its session ends, so the session itself is the watchdog: if the task's
process dies, its socket closes and the backend ends the backup. Two more bounds cover a hung (not
dead) task: the session's idle_session_timeout ends it on the server side, and a local timer closes
it after `timeout_s`.

`stop-writes` stops the server cleanly through the cluster's runner and starts it again on exit; a
detached watchdog on the DB host starts it after a bounded time if the task dies in between.
"""

from __future__ import annotations

import os
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
                log: Callable[..., None] = print,
                on_stop: Callable[[BackupQuiesce], None] | None = None) -> Iterator[BackupQuiesce]:
    """pg_backup_start in one held session; pg_backup_stop on exit (or the session ends, which aborts it).

    `on_stop` gets the state with the backup_label right after pg_backup_stop, while the session is still held
    (to store the label durably); when it raises, the error propagates after the session is closed.
    """
    conn = connect()
    conn.autocommit = True
    state = BackupQuiesce(label=label)
    timer: threading.Timer | None = None
    try:
        with conn.cursor() as cur:
            # Server-side bound: if this process hangs between statements, PostgreSQL ends the session.
            # set_config, not SET: psycopg 3 (PostgresHook's driver here) binds parameters on the server, and
            # SET takes no bound parameter.
            cur.execute("SELECT set_config('idle_session_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",))
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
        if on_stop is not None:
            on_stop(state)
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


# --- stop-writes: a clean stop, a snapshot, a restart ---------------------------------------------------------
# The watchdog runs on the DB host in its own session (setsid), so it outlives the task, the runner's process
# group and an SSH channel: after `delay` seconds it runs `pg_ctl start` unless the task cancelled it. Its $0
# names it, and the cancel checks that name before killing the process group (a recycled pid is left alone).
WATCHDOG_NAME = "pgops-restart-watchdog"
WATCHDOG_SPAWN = ('setsid sh -c \'sleep "$1"; shift; exec "$@"\' ' + WATCHDOG_NAME
                  + ' "$@" </dev/null >/dev/null 2>&1 & echo "$!"')
WATCHDOG_CANCEL = ('grep -q ' + WATCHDOG_NAME + ' "/proc/$1/cmdline" 2>/dev/null || exit 0; '
                   'kill -TERM -"$1" 2>/dev/null; exit 0')
PG_CTL_NOT_RUNNING = 3  # `pg_ctl status`: no server running


@dataclass
class StoppedServer:
    data_dir: str
    restart_within_s: float
    watchdog_pid: int | None = None
    stopped_at: float | None = None  # time.time()
    started_at: float | None = None
    restarted_by: str | None = None  # "task" | "already running" | None (the watchdog will)
    deadline_monotonic: float = 0.0

    def time_left_s(self) -> float:
        return self.deadline_monotonic - time.monotonic()

    def to_dict(self) -> dict[str, Any]:
        down_s = None if self.stopped_at is None or self.started_at is None else self.started_at - self.stopped_at
        return {"data_dir": self.data_dir, "restart_within_s": self.restart_within_s,
                "watchdog_pid": self.watchdog_pid, "stopped_at": self.stopped_at, "started_at": self.started_at,
                "down_s": down_s, "restarted_by": self.restarted_by}


def pg_ctl_start_argv(pg_ctl: str, data_dir: str, *, log_file: str, config_file: str | None = None,
                      timeout_s: int = 300) -> list[str]:
    """`pg_ctl start`; a config file outside the data dir (Debian's /etc/postgresql/...) is passed to postgres."""
    argv = [pg_ctl, "-D", data_dir, "-l", log_file, "-w", "-t", str(int(timeout_s))]
    if config_file and os.path.dirname(config_file) != data_dir.rstrip("/"):
        argv += ["-o", f"-c config_file={config_file}"]
    return [*argv, "start"]


@contextmanager
def server_stopped(runner: Any, *, pg_ctl: str, data_dir: str, log_file: str, config_file: str | None = None,
                   restart_within_s: float = 600.0, stop_timeout_s: int = 120,
                   log: Callable[..., None] = print) -> Iterator[StoppedServer]:
    """Stop PostgreSQL cleanly (`pg_ctl stop -m fast`) through the runner; ALWAYS start it again on exit.

    Before stopping, a watchdog on the DB host is armed to start the server after `restart_within_s` even if this
    process dies. On exit (success or error) the server is started here unless it runs already; the watchdog is
    cancelled only once the server is up, so a failed start here still leaves the watchdog to try.
    The server is started again with exactly the environment it ran with (read from /proc on the DB host before the
    stop): nothing of the worker's, not even its locale.
    """
    start_argv = pg_ctl_start_argv(pg_ctl, data_dir, log_file=log_file, config_file=config_file)
    state = StoppedServer(data_dir=data_dir, restart_within_s=restart_within_s)
    from pgops.dbhost.host import postmaster_environ, stop_postmaster

    # pgops' children get a minimal environment; the server is started again with the one it runs with now
    server_env = postmaster_environ(runner, data_dir)
    if server_env is None:
        raise QuiesceError(f"no running PostgreSQL in {data_dir} on the DB host (postmaster.pid missing, stale or "
                           "not that directory's): nothing to stop. Fix: check the data directory in the inventory")
    # exact_env: the runner adds nothing (a worker's LANG/LC_*/TZ the server did not have would change its locale)
    spawned = runner.run(["sh", "-c", WATCHDOG_SPAWN, "sh", str(int(restart_within_s)), *start_argv], env=server_env,
                         exact_env=True, capture=True, timeout_s=60)
    state.watchdog_pid = int(spawned.stdout.strip().splitlines()[-1])
    state.deadline_monotonic = time.monotonic() + restart_within_s
    log(f"restart watchdog armed on the DB host (pid {state.watchdog_pid}): it starts PostgreSQL after "
        f"{restart_within_s:.0f} s unless cancelled")
    try:
        # pg_ctl stop would signal whatever pid postmaster.pid holds; this proves it is data_dir's postmaster first
        pm = stop_postmaster(runner, data_dir, mode="fast", timeout_s=stop_timeout_s, kill=False)
        if pm.state != "stopped":
            raise QuiesceError(
                f"PostgreSQL in {data_dir} was not stopped: " + (
                    f"it is still running after {stop_timeout_s} s (pid {pm.pid})" if pm.state == "running" else
                    f"postmaster.pid names pid {pm.pid}, which is not a postmaster of that directory"
                    if pm.state == "other" else f"no running postmaster there (postmaster.pid: {pm.state})")
                + ". Fix: check the data directory in the inventory and the server's state")
        state.stopped_at = time.time()
        log(f"PostgreSQL stopped cleanly ({data_dir})")
        yield state
    finally:
        try:
            status = runner.run([pg_ctl, "-D", data_dir, "status"], check=False, capture=True, timeout_s=60)
            if status.returncode == PG_CTL_NOT_RUNNING:
                runner.run(start_argv, env=server_env, exact_env=True, timeout_s=360)
                state.restarted_by = "task"
            else:
                state.restarted_by = "already running"
            state.started_at = time.time()
            log(f"PostgreSQL running again ({state.restarted_by})")
        except Exception as exc:
            log(f"starting PostgreSQL failed ({exc}); the watchdog (pid {state.watchdog_pid}) tries again "
                f"{max(state.time_left_s(), 0):.0f} s from now")
            raise
        runner.run(["sh", "-c", WATCHDOG_CANCEL, "sh", str(state.watchdog_pid)], timeout_s=60)
        log(f"restart watchdog {state.watchdog_pid} cancelled")
