#!/usr/bin/env python3
"""pgops-backup: barman-cloud-backup, with the wait for the backup's last WAL made by pgops at a finer grain.

    <dbhost-venv>/bin/pgops-backup <barman-cloud-backup's arguments>

Everything is barman-cloud-backup's (barman's own main, parser and uploader) but one step. barman stops the
backup with pg_backup_stop() and its default wait_for_archive => true, and PostgreSQL then checks once a second
whether the backup's last WAL segment and its backup history file are archived (xlog.c do_pg_backup_stop: a
1-s latch timeout that nothing cuts short), so every backup waited at least a second after its data was
uploaded. pgBackRest calls pg_backup_stop(false) and waits for the segment itself; so does this, on a primary:

- pg_backup_stop(wait_for_archive => false), in barman's own query otherwise;
- then the very condition PostgreSQL waits on (XLogArchiveIsBusy, for the same two files: the segment holding
  the stop point and <start segment>.<offset>.backup), read from the data directory's pg_wal/archive_status
  every POLL_S: a .done file, else no .ready file and no WAL file left;
- with no time limit, as PostgreSQL has none (the task's own timeout bounds it), and a warning naming the
  files every WARN_EVERY_S;
- only if archiving is active (archive_mode not off, wal_level not minimal), as PostgreSQL does.
Until the wait ends, barman has not written backup_label into the backup nor marked the backup DONE: a
backup whose end WAL never reaches the archive is never DONE (interrupted, barman marks it FAILED). On a
standby, or before PostgreSQL 15, barman's own pg_backup_stop call runs unchanged.

Two more changes, neither of them in what is stored but for a checksum: with lz4, each part's frame carries
block checksums (lz4_with_block_checksums: a damaged part fails its restore wherever the damage is); and once
barman's upload workers are done, the multiprocessing manager behind their queues is shut down before barman
removes its temporary directory, where the manager's socket is (stop_upload_manager): left to its exit
finalizer, it cost every run a one-second timeout.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from typing import Any

from pgops_spool import is_segment_name

POLL_S = 0.02
WARN_EVERY_S = 60.0
_START_RE = re.compile(r"^START WAL LOCATION: ([0-9A-F]+)/([0-9A-F]+) \(file ([0-9A-F]{24})\)$", re.MULTILINE)
_log = logging.getLogger("pgops.backup")


def archive_busy(data_dir: str, name: str) -> bool:
    """PostgreSQL's XLogArchiveIsBusy(name) (xlogarchive.c), read from the data directory: False when
    archive_status holds name.done, True when it holds name.ready, else whether pg_wal still holds the file (a
    file a checkpoint removed was archived)."""
    status = os.path.join(data_dir, "pg_wal", "archive_status", name)
    if os.path.exists(status + ".done"):
        return False
    if os.path.exists(status + ".ready"):
        return True
    if os.path.exists(status + ".done"):  # PostgreSQL's own re-check: the archiver may just have finished
        return False
    return os.path.lexists(os.path.join(data_dir, "pg_wal", name))


def history_file_name(backup_label: str, *, timeline_segment: str, wal_segment_size: int) -> str:
    """The backup history file pg_backup_stop wrote: <timeline><start segment's log/seg>.<offset>.backup
    (BackupHistoryFileName with the stop timeline, as do_pg_backup_stop names it), from the backup label."""
    m = _START_RE.search(backup_label)
    if not m or not is_segment_name(timeline_segment):
        raise ValueError("the backup label has no START WAL LOCATION line: cannot name the backup history file")
    lsn = (int(m.group(1), 16) << 32) + int(m.group(2), 16)
    return f"{timeline_segment[:8]}{m.group(3)[8:]}.{lsn % wal_segment_size:08X}.backup"


def wait_archived(data_dir: str, names: list[str], *, poll_s: float = POLL_S, warn_every_s: float = WARN_EVERY_S,
                  sleep=time.sleep, clock=time.monotonic) -> float:
    """Wait until no file of ``names`` is busy archiving (archive_busy); returns the seconds waited."""
    started = clock()
    next_warning = started + warn_every_s
    while True:
        busy = [n for n in names if archive_busy(data_dir, n)]
        if not busy:
            return clock() - started
        now = clock()
        if now >= next_warning:
            _log.warning("still waiting for %s to be archived (%.0f s): check that archive_command succeeds "
                         "(pg_stat_archiver.last_failed_wal, the server log)", ", ".join(busy), now - started)
            next_warning = now + warn_every_s
        sleep(poll_s)


# barman's stop query (postgres.py PostgreSQLConnection.stop_concurrent_backup, barman 3.19.1) but for the
# argument, and the two names the wait needs.
STOP_QUERY = (
    "SELECT end_row.lsn AS location, "
    "(SELECT CASE WHEN pg_is_in_recovery() "
    "THEN min_recovery_end_timeline ELSE timeline_id END "
    "FROM pg_control_checkpoint(), pg_control_recovery()"
    ") AS timeline, "
    "end_row.labelfile AS backup_label, "
    "now() AS timestamp FROM pg_backup_stop(wait_for_archive => false) AS end_row"
)
SETTINGS_QUERY = ("SELECT current_setting('data_directory'), current_setting('archive_mode'), "
                  "current_setting('wal_level'), (SELECT setting::bigint FROM pg_settings "
                  "WHERE name = 'wal_segment_size'), pg_walfile_name(%s::pg_lsn)")


def stop_backup(pg: Any, original) -> Any:
    """The replacement of PostgreSQLConnection.stop_concurrent_backup (``original``: barman's)."""
    version = pg.server_version
    if not version or version < 150000 or pg.is_in_recovery is not False:
        return original(pg)
    import psycopg2
    from barman.exceptions import PostgresConnectionError, PostgresException
    from psycopg2.extras import DictCursor

    try:
        conn = pg.connect()
        conn.rollback()  # as barman: no transaction held open while the archive is waited for
        cur = conn.cursor(cursor_factory=DictCursor)
        cur.execute("RESET idle_session_timeout")  # as barman (set for the backup's duration)
        cur.execute(STOP_QUERY)
        row = cur.fetchone()
        cur.execute(SETTINGS_QUERY, (str(row["location"]),))
        data_dir, archive_mode, wal_level, segment_size, last_segment = cur.fetchone()
    except (PostgresConnectionError, psycopg2.Error) as e:
        raise PostgresException(f"Error issuing pg_backup_stop command: {str(e).strip()}") from e
    if archive_mode == "off" or wal_level == "minimal":
        _log.warning("WAL archiving is not enabled: the backup's WAL (from its start to %s) must be copied "
                     "through other means to complete the backup", last_segment)
        return row
    names = [last_segment, history_file_name(row["backup_label"], timeline_segment=last_segment,
                                             wal_segment_size=int(segment_size))]
    waited = wait_archived(data_dir, names)
    _log.info("the backup's last WAL segment %s and history file %s are archived (waited %.2f s)",
              names[0], names[1], waited)
    return row


def stop_upload_manager(cloud_interface: Any, original_close) -> None:
    """The replacement of CloudInterface.close: barman's (``original_close``: its upload workers finish and are
    joined), then the multiprocessing manager behind its queues is shut down at once.

    barman makes that manager's socket in its temporary directory, which barman-cloud-backup removes when it is
    done; the manager's exit-time finalizer then cannot reach it, waits its one-second timeout and terminates it:
    a second after every backup, for nothing. Shutting it down here, before the directory goes, takes
    milliseconds. The backup is complete by now, so no error of this clean-up may fail the run: barman's exit
    finalizer still stops the manager if this could not."""
    manager = getattr(getattr(cloud_interface, "queue", None), "_manager", None)
    original_close(cloud_interface)
    if manager is None:
        return
    try:
        manager.shutdown()
        cloud_interface.queue = None  # used again, the interface would start new workers and a new manager
    except Exception as e:  # noqa: BLE001  clean-up of a finished backup
        _log.debug("the upload manager did not shut down here (%s): it is stopped at exit", e)


def install() -> None:
    """Put stop_backup in the place of barman's stop_concurrent_backup (standby connections call it too), and
    stop_upload_manager in the place of CloudInterface.close."""
    importlib.import_module("barman.clients.cloud_backup")  # barman's own import order: postgres first is circular
    from barman import cloud, postgres
    from barman.clients import cloud_compression

    original = postgres.PostgreSQLConnection.stop_concurrent_backup
    if getattr(original, "_pgops", False):
        return
    original_close = cloud.CloudInterface.close

    def stop_concurrent_backup(self):
        return stop_backup(self, original)

    def close(self):
        stop_upload_manager(self, original_close)

    stop_concurrent_backup._pgops = True
    postgres.PostgreSQLConnection.stop_concurrent_backup = stop_concurrent_backup
    cloud.CloudInterface.close = close
    cloud_compression.Lz4Compressor.add_chunk = lz4_with_block_checksums(cloud_compression.Lz4Compressor.add_chunk)


def lz4_with_block_checksums(original_add_chunk):
    """barman's lz4 compressor (clients/cloud_compression.py Lz4Compressor), its frame opened with block
    checksums: every compressed block carries the xxHash32 of its bytes, which every lz4 frame decoder checks
    (barman-cloud-restore's and pgops-restore's alike), so damage anywhere in a part's data fails its restore,
    naming the part, where barman's frames (no checksum) were caught only when the damage broke the frame or the
    tar stream. The hash runs over the compressed bytes: a few hundredths of a second for a 1.5 GiB database."""

    def add_chunk(self, data):
        if self._compressor is None:
            self._compressor = self._lz4_frame.LZ4FrameCompressor(auto_flush=True, block_checksum=True)
        return original_add_chunk(self, data)

    return add_chunk


def main(argv: list[str] | None = None) -> None:
    install()
    from barman.clients import cloud_backup

    cloud_backup.main(argv)


if __name__ == "__main__":
    main()
