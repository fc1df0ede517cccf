"""pgops-backup's wait for the backup's last WAL (include/dbhost/pgops_backup.py): PostgreSQL's own condition
(XLogArchiveIsBusy) read from the data directory, the backup history file named as pg_backup_stop names it, no
end before both files are archived, and barman's own stop call wherever pgops does not take it over."""

from __future__ import annotations

import itertools
import logging
import sys
from types import SimpleNamespace

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "include" / "dbhost"))
import pgops_backup as pb  # noqa: E402

sys.path.remove(str(REPO / "include" / "dbhost"))

SEG = "000000010000000000000051"
HIST = "00000001000000000000004F.00000028.backup"


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "pg_wal" / "archive_status").mkdir(parents=True)
    return tmp_path


def _status(data_dir, name, kind):
    (data_dir / "pg_wal" / "archive_status" / f"{name}.{kind}").touch()


def test_busy_as_postgresql_decides_it(data_dir):
    wal = data_dir / "pg_wal"
    (wal / SEG).write_bytes(b"")
    assert pb.archive_busy(str(data_dir), SEG)  # the file is there, no status yet: busy
    _status(data_dir, SEG, "ready")
    assert pb.archive_busy(str(data_dir), SEG)  # ready: the archiver has it still
    _status(data_dir, SEG, "done")
    assert not pb.archive_busy(str(data_dir), SEG)  # done wins, even beside a stale .ready
    # neither status file and no WAL file: a checkpoint removed it, so it was archived
    assert not pb.archive_busy(str(data_dir), "000000010000000000000099")
    # a .ready for a file already gone is still busy (PostgreSQL checks .ready before the file)
    _status(data_dir, "000000010000000000000098", "ready")
    assert pb.archive_busy(str(data_dir), "000000010000000000000098")


def test_pg_wal_through_a_symlink(tmp_path):
    data, walvol = tmp_path / "data", tmp_path / "walvol"
    (walvol / "archive_status").mkdir(parents=True)
    data.mkdir()
    (data / "pg_wal").symlink_to(walvol)
    (walvol / "archive_status" / f"{SEG}.ready").touch()
    assert pb.archive_busy(str(data), SEG)
    (walvol / "archive_status" / f"{SEG}.done").touch()
    assert not pb.archive_busy(str(data), SEG)


LABEL = ("START WAL LOCATION: 0/4F000028 (file 00000001000000000000004F)\nCHECKPOINT LOCATION: 0/4F000060\n"
         "BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-29 19:58:46 UTC\nLABEL: x\n"
         "START TIMELINE: 1\n")


@pytest.mark.parametrize("label, segment, size, expected", [
    (LABEL, SEG, 16 << 20, HIST),
    # 1 MiB segments: the offset is the start LSN's within its own segment
    ("START WAL LOCATION: 0/A3400D8 (file 0000000100000000000000A3)\n", "0000000100000000000000A5", 1 << 20,
     "0000000100000000000000A3.000400D8.backup"),
    # the stop timeline names the file (BackupHistoryFileName(stoptli, ...)), as in do_pg_backup_stop
    ("START WAL LOCATION: 1/2000060 (file 000000030000000100000002)\n", "000000030000000100000005", 16 << 20,
     "000000030000000100000002.00000060.backup"),
])
def test_history_file_name(label, segment, size, expected):
    assert pb.history_file_name(label, timeline_segment=segment, wal_segment_size=size) == expected


@pytest.mark.parametrize("label, segment", [
    ("CHECKPOINT LOCATION: 0/4F000060\n", SEG),  # no START WAL LOCATION line
    ("START WAL LOCATION: 0/4F000028 (file ../../etc/passwd)\n", SEG),
    (LABEL, "../../../etc/passwd0000000"),
])
def test_history_file_name_refuses_what_it_cannot_read(label, segment):
    with pytest.raises(ValueError):
        pb.history_file_name(label, timeline_segment=segment, wal_segment_size=16 << 20)


def test_the_wait_ends_only_when_both_files_are_archived(data_dir, caplog):
    _status(data_dir, SEG, "ready")
    _status(data_dir, HIST, "ready")
    now = [0.0]
    polls: list[float] = []

    def sleep(s):  # the archiver finishes the segment at t=1, the history file at t=125
        polls.append(now[0])
        now[0] += s
        if now[0] >= 1:
            _status(data_dir, SEG, "done")
        if now[0] >= 125:
            _status(data_dir, HIST, "done")

    with caplog.at_level(logging.WARNING, logger="pgops.backup"):
        waited = pb.wait_archived(str(data_dir), [SEG, HIST], poll_s=0.5, warn_every_s=60, sleep=sleep,
                                  clock=lambda: now[0])
    assert waited == pytest.approx(125)
    assert all(b - a == pytest.approx(0.5) for a, b in itertools.pairwise(polls))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(HIST in w and SEG not in w for w in warnings)  # at 60 and 120 s


def test_no_wait_when_already_archived(data_dir):
    _status(data_dir, SEG, "done")
    _status(data_dir, HIST, "done")
    assert pb.wait_archived(str(data_dir), [SEG, HIST], sleep=lambda s: pytest.fail("slept")) == pytest.approx(0, abs=1)


@pytest.mark.parametrize("version, in_recovery", [(140000, False), (150000, True), (150000, None), (None, False)])
def test_barmans_own_stop_where_pgops_does_not_take_over(version, in_recovery):
    """Before PostgreSQL 15 (other arguments), on a standby, or when the version or recovery cannot be read:
    barman's call."""
    pg = SimpleNamespace(server_version=version, is_in_recovery=in_recovery,
                         connect=lambda: pytest.fail("pgops' stop ran"))
    assert pb.stop_backup(pg, lambda conn: ("barman's", conn)) == ("barman's", pg)


def test_the_upload_manager_stops_cleanly_before_barman_removes_its_directory(tmp_path, monkeypatch):
    """barman's upload queues live in a multiprocessing manager whose socket is in barman's temporary directory
    (removed at the end of a run): stopped after barman's close and before that removal, it exits by itself
    (exit code 0) instead of being terminated a second later by its exit finalizer."""
    import multiprocessing
    import shutil
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # as barman-cloud-backup sets it
    manager = multiprocessing.Manager()
    interface = SimpleNamespace(queue=manager.JoinableQueue(maxsize=2), closed=False)
    process = manager._process

    def barmans_close(ci):
        assert process.is_alive()  # barman's own close (its workers joined) comes first
        ci.closed = True

    pb.stop_upload_manager(interface, barmans_close)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert interface.closed and interface.queue is None
    assert not process.is_alive() and process.exitcode == 0


def test_an_upload_manager_that_cannot_stop_does_not_fail_a_finished_backup():
    class Manager:
        def shutdown(self):
            raise OSError(2, "No such file or directory")

    closed = []
    interface = SimpleNamespace(queue=SimpleNamespace(_manager=Manager()))
    pb.stop_upload_manager(interface, closed.append)
    assert closed == [interface]
    pb.stop_upload_manager(SimpleNamespace(queue=None), closed.append)  # no async upload ran: barman's close only
    assert len(closed) == 2


_PG15_SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import psycopg2
import pgops_backup as pb
from barman.exceptions import PostgresException

LABEL = "START WAL LOCATION: 0/4F000028 (file 00000001000000000000004F)\n"

class Cursor:
    def __init__(self, pg): self.pg = pg
    def execute(self, sql, args=None):
        self.pg.sql.append(sql)
        if self.pg.fail_on and self.pg.fail_on in sql:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
    def fetchone(self):
        if "pg_backup_stop" in self.pg.sql[-1]:
            return {"location": "0/51000100", "timeline": 1, "backup_label": LABEL, "timestamp": None}
        return ("/srv/pg/data", self.pg.archive_mode, "replica", 16777216, "000000010000000000000051")

class Conn:
    def __init__(self, pg): self.pg = pg
    def rollback(self): pass
    def cursor(self, cursor_factory=None): return Cursor(self.pg)

class Pg:
    server_version, is_in_recovery = 150018, False
    def __init__(self, archive_mode, fail_on=None):
        self.sql, self.archive_mode, self.fail_on = [], archive_mode, fail_on
    def connect(self): return Conn(self)

waited = []
pb.wait_archived = lambda data_dir, names: waited.append([data_dir, names]) or 0.0
out = {}
pg = Pg("on")
pb.stop_backup(pg, lambda p: 1 / 0)
out["on"] = {"stop": [s for s in pg.sql if "pg_backup_stop" in s], "waited": waited[:]}
waited.clear()
pg = Pg("off")
out["off"] = {"location": pb.stop_backup(pg, lambda p: 1 / 0)["location"], "waited": waited[:]}
try:
    pb.stop_backup(Pg("on", fail_on="pg_backup_stop"), lambda p: 1 / 0)
except PostgresException as e:
    out["error"] = str(e)
print(json.dumps(out))
'''


def test_the_stop_on_a_primary_with_barmans_own_modules():
    """In the DB-host venv (barman, psycopg2): pg_backup_stop(wait_for_archive => false), then the wait for the
    last segment and the history file; no wait where archiving is off (as PostgreSQL); a database error is
    barman's PostgresException naming pg_backup_stop (barman marks the backup FAILED)."""
    import json
    import subprocess

    python = "/opt/pgops/dbhost-venv/bin/python"
    res = subprocess.run([python, "-c", _PG15_SCRIPT, str(REPO / "include" / "dbhost")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert len(out["on"]["stop"]) == 1 and "pg_backup_stop(wait_for_archive => false)" in out["on"]["stop"][0]
    assert out["on"]["waited"] == [["/srv/pg/data", ["000000010000000000000051",
                                                     "00000001000000000000004F.00000028.backup"]]]
    assert out["off"] == {"location": "0/51000100", "waited": []}
    assert "pg_backup_stop" in out["error"] and "server closed the connection" in out["error"]
