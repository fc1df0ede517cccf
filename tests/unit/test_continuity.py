from datetime import UTC, datetime, timedelta

import pytest

from pgops.core import findings as F
from pgops.core import wal
from pgops.core.continuity import check_continuity
from pgops.core.layouts import BackupRef, WalIndex

GIB = 1024 * wal.MIB
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def backup(backup_id, begin, end=None, *, size=wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES, day=0):
    return BackupRef(backup_id=backup_id, status="DONE", timeline=int(begin[:8], 16), begin_segment=begin,
                     begin_lsn=wal.segment_start_lsn(begin, size) + 0x28, end_segment=end or begin,
                     end_lsn=wal.segment_start_lsn(end or begin, size) + 0x100,
                     begin_time=T0 + timedelta(days=day), end_time=T0 + timedelta(days=day, minutes=5))


def seg_range(first, last, size=wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES):
    return list(wal.segment_range(first, last, size))


def test_continuous_archive_gives_window():
    index = WalIndex.from_segments(seg_range("000000010000000000000002", "000000010000000100000010"))
    report = check_continuity([backup("b1", "000000010000000000000002", "000000010000000000000003"),
                               backup("b2", "0000000100000000000000F0", day=1)], index)
    assert report.gaps == [] and report.status == F.OK
    assert report.complete_backup_ids == ["b1", "b2"]
    assert report.window.earliest_backup_id == "b1"
    assert report.window.earliest_time == T0 + timedelta(minutes=5)
    assert report.window.latest_segment == "000000010000000100000010"
    assert wal.format_lsn(report.window.latest_lsn) == "1/11000000"


def test_gap_range_and_affected_backups_across_log_boundary():
    present = [s for s in seg_range("000000010000000000000002", "000000010000000100000010")
               if not "0000000100000000000000FE" <= s <= "000000010000000100000001"]
    index = WalIndex.from_segments(present)
    report = check_continuity([backup("old", "000000010000000000000002"),
                               backup("mid", "0000000100000000000000F0", "0000000100000000000000FF"),
                               backup("new", "000000010000000100000005")], index)
    assert len(report.gaps) == 1
    gap = report.gaps[0]
    assert (gap.timeline, gap.first_segment, gap.last_segment, gap.count) == (
        1, "0000000100000000000000FE", "000000010000000100000001", 4)
    assert gap.backup_ids == ("old", "mid")
    assert gap.inconsistent_backup_ids == ("mid",)
    assert report.complete_backup_ids == ["new"]
    assert report.broken_backup_ids == ["old", "mid"]
    assert [f.id for f in report.findings] == [F.WAL_GAP]
    assert "0000000100000000000000FE..000000010000000100000001" in report.findings[0].message
    assert report.window.earliest_backup_id == "new"


def test_gap_after_newest_backup_limits_latest_point():
    present = seg_range("000000010000000000000002", "000000010000000000000010") + \
        seg_range("000000010000000000000013", "000000010000000000000020")
    stamps = {"000000010000000000000010": T0 + timedelta(hours=3)}
    index = WalIndex(wal_segment_size_bytes=wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES)
    for name in present:
        tli, log, seg = wal.parse_segment_name(name)
        index.add_segment(tli, log, seg, 16, stamps.get(name, T0))
    report = check_continuity([backup("b1", "000000010000000000000002")], index)
    assert [(g.first_segment, g.last_segment, g.count) for g in report.gaps] == [
        ("000000010000000000000011", "000000010000000000000012", 2)]
    assert report.window.latest_segment == "000000010000000000000010"
    assert report.window.latest_time == T0 + timedelta(hours=3)


@pytest.mark.parametrize(("size", "before", "after"), [
    (wal.MIB, "000000010000000000000FFF", "000000010000000100000000"),
    (GIB, "000000010000000000000003", "000000010000000100000000"),
    (16 * wal.MIB, "0000000100000000000000FF", "000000010000000100000000"),
])
def test_log_boundary_is_not_a_gap_for_each_segment_size(size, before, after):
    index = WalIndex.from_segments([before, after], wal_segment_size_bytes=size)
    report = check_continuity([backup("b", before, size=size)], index)
    assert report.gaps == []
    missing = WalIndex.from_segments([before, wal.next_segment(after, size)], wal_segment_size_bytes=size)
    report = check_continuity([backup("b", before, size=size)], missing)
    assert [(g.first_segment, g.count) for g in report.gaps] == [(after, 1)]


def switched_archive():
    # timeline 1 up to 0/5000A28, then timeline 2: its first segment is 5 (holds the copy of tli 1 up to X)
    segments = seg_range("000000010000000000000002", "000000010000000000000004") + \
        seg_range("000000020000000000000005", "000000020000000000000009")
    history = {2: wal.parse_history("1\t0/5000A28\tno recovery target specified\n")}
    return segments, history


def test_timeline_switch_with_history_is_not_a_gap():
    segments, history = switched_archive()
    index = WalIndex.from_segments(segments, history_timelines=[2])
    report = check_continuity([backup("b1", "000000010000000000000002")], index, history)
    assert report.gaps == [] and report.missing_history == {}
    assert report.newest_segment == "000000020000000000000009"
    assert report.window.latest_segment == "000000020000000000000009"


def test_old_timeline_needed_only_up_to_the_switch():
    segments, history = switched_archive()
    segments.remove("000000010000000000000004")
    index = WalIndex.from_segments(segments, history_timelines=[2])
    report = check_continuity([backup("b1", "000000010000000000000002")], index, history)
    assert [(g.timeline, g.first_segment, g.count) for g in report.gaps] == [(1, "000000010000000000000004", 1)]
    segments, history = switched_archive()
    segments.remove("000000020000000000000005")
    report = check_continuity([backup("b1", "000000010000000000000002")],
                              WalIndex.from_segments(segments, history_timelines=[2]), history)
    assert [(g.timeline, g.first_segment, g.count) for g in report.gaps] == [(2, "000000020000000000000005", 1)]


def test_missing_history_is_reported_without_false_gap():
    segments, _history = switched_archive()
    index = WalIndex.from_segments(segments)
    report = check_continuity([backup("b1", "000000010000000000000002"),
                               backup("b2", "000000020000000000000007")], index, {})
    assert report.gaps == []
    assert report.missing_history == {2: ("b1",)}
    assert report.inferred_switch_timelines == [2]
    finding = next(f for f in report.findings if f.id == F.HISTORY_MISSING)
    assert finding.severity == F.CRITICAL and "00000002.history" in finding.message
    assert report.complete_backup_ids == ["b2"]


def test_no_backups_and_no_wal():
    index = WalIndex.from_segments(["000000010000000000000002"])
    assert [f.id for f in check_continuity([], index).findings] == [F.NO_BACKUPS]
    empty = WalIndex.from_segments([])
    assert [f.id for f in check_continuity([backup("b", "000000010000000000000002")], empty).findings] == [F.NO_WAL]


def test_unfinished_backups_are_ignored():
    index = WalIndex.from_segments(seg_range("000000010000000000000005", "000000010000000000000008"))
    failed = BackupRef(backup_id="f", status="FAILED", begin_segment="000000010000000000000001")
    report = check_continuity([failed, backup("ok", "000000010000000000000005")], index)
    assert report.gaps == [] and report.complete_backup_ids == ["ok"]
