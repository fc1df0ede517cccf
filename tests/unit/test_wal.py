import pytest

from pgops.core import wal

GIB = 1024 * wal.MIB


def test_lsn_round_trip():
    assert wal.parse_lsn("0/3000028") == 0x3000028
    assert wal.parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert wal.format_lsn((0x16 << 32) | 0xB374D848) == "16/B374D848"
    assert wal.format_lsn(0) == "0/0"


@pytest.mark.parametrize("bad", ["", "0/", "/1", "123456789/0", "x/y", "0-3000028"])
def test_parse_lsn_rejects(bad):
    with pytest.raises(ValueError, match="LSN"):
        wal.parse_lsn(bad)


def test_segment_name_round_trip():
    assert wal.parse_segment_name("000000020000000A000000FF") == (2, 0xA, 0xFF)
    assert wal.format_segment_name(2, 0xA, 0xFF) == "000000020000000A000000FF"


@pytest.mark.parametrize("bad", ["00000001000000000000000", "00000001000000000000000g", "000000000000000000000001",
                                 "000000010000000a000000ff"])
def test_parse_segment_name_rejects(bad):
    with pytest.raises(ValueError, match="WAL segment name"):
        wal.parse_segment_name(bad)


@pytest.mark.parametrize("size", [0, 3 * wal.MIB, wal.MIB // 2, 2 * GIB, 16 * wal.MIB + 1, True, "16MB"])
def test_segment_size_validation_names_the_value(size):
    with pytest.raises(ValueError, match=f"wal_segment_size {size!r}"):
        wal.validate_segment_size(size)


@pytest.mark.parametrize(("size", "per_xlogid"), [(wal.MIB, 4096), (16 * wal.MIB, 256), (GIB, 4)])
def test_segments_per_xlogid(size, per_xlogid):
    assert wal.segments_per_xlogid(size) == per_xlogid


def test_16mib_next_segment_crosses_log_boundary():
    assert wal.next_segment("0000000100000000000000FE") == "0000000100000000000000FF"
    assert wal.next_segment("0000000100000000000000FF") == "000000010000000100000000"


def test_1mib_next_segment_crosses_log_boundary():
    size = wal.MIB
    assert wal.next_segment("000000010000000000000FFF", size) == "000000010000000100000000"
    # 0x100 is an ordinary segment with 1 MiB segments
    assert wal.next_segment("0000000100000000000000FF", size) == "000000010000000000000100"


def test_1gib_next_segment_crosses_log_boundary():
    assert wal.next_segment("000000010000000000000002", GIB) == "000000010000000000000003"
    assert wal.next_segment("000000010000000000000003", GIB) == "000000010000000100000000"


def test_seg_part_beyond_segment_size_is_rejected():
    with pytest.raises(ValueError, match="seg part 00000004 does not exist with wal_segment_size 1073741824"):
        wal.segment_to_segno("000000010000000000000004", GIB)


def test_segment_range_across_boundary():
    names = list(wal.segment_range("0000000300000005000000FE", "000000030000000600000001"))
    assert names == ["0000000300000005000000FE", "0000000300000005000000FF",
                     "000000030000000600000000", "000000030000000600000001"]
    assert list(wal.segment_range("000000010000000000000003", "000000010000000100000001", GIB)) == [
        "000000010000000000000003", "000000010000000100000000", "000000010000000100000001"]


def test_lsn_to_segment_like_pg_walfile_name():
    assert wal.lsn_to_segment("0/3000028", 1) == "000000010000000000000003"
    assert wal.lsn_to_segment("1/FF000000", 2) == "0000000200000001000000FF"
    assert wal.lsn_to_segment("0/3000028", 1, wal.MIB) == "000000010000000000000030"
    assert wal.lsn_to_segment("1/C0000001", 1, GIB) == "000000010000000100000003"


def test_segment_start_and_end_lsn():
    assert wal.segment_start_lsn("000000010000000100000002") == (1 << 32) + 2 * 16 * wal.MIB
    assert wal.format_lsn(wal.segment_start_lsn("000000010000000100000002")) == "1/2000000"
    assert wal.format_lsn(wal.segment_end_lsn("0000000100000001000000FF")) == "2/0"
    assert wal.format_lsn(wal.segment_start_lsn("000000010000000100000003", GIB)) == "1/C0000000"


HISTORY_3 = """\
# comment line
1\t0/3000000\tno recovery target specified

2\t0/5000A28\tbefore 2026-11-25 10:00:00+00
"""


def test_parse_history():
    entries = wal.parse_history(HISTORY_3.encode())
    assert [(e.parent_timeline, e.switch_lsn) for e in entries] == [(1, 0x3000000), (2, 0x5000A28)]
    assert entries[0].reason == "no recovery target specified"


def test_parse_history_rejects_garbage_with_line_number():
    with pytest.raises(ValueError, match="00000002.history line 1"):
        wal.parse_history("1 zzz\n", source="00000002.history")


def test_timeline_chain():
    chain = wal.timeline_chain(3, wal.parse_history(HISTORY_3))
    assert chain == [
        wal.TimelineSpan(timeline=1, start_lsn=0, end_lsn=0x3000000),
        wal.TimelineSpan(timeline=2, start_lsn=0x3000000, end_lsn=0x5000A28),
        wal.TimelineSpan(timeline=3, start_lsn=0x5000A28, end_lsn=None),
    ]
    assert wal.timeline_chain(1, []) == [wal.TimelineSpan(timeline=1, start_lsn=0, end_lsn=None)]


def test_timeline_chain_rejects_foreign_history():
    with pytest.raises(ValueError, match="parent timeline 3"):
        wal.timeline_chain(2, wal.parse_history("3\t0/1000000\tx\n"))


@pytest.mark.parametrize(("name", "kind", "segment", "compression", "checksum"), [
    ("000000010000000000000002", wal.SEGMENT, "000000010000000000000002", None, None),
    ("000000010000000000000002.gz", wal.SEGMENT, "000000010000000000000002", "gz", None),
    ("000000010000000000000002.partial", wal.PARTIAL, "000000010000000000000002", None, None),
    ("000000010000000000000002.partial.zst", wal.PARTIAL, "000000010000000000000002", "zst", None),
    ("000000010000000000000002.00000028.backup", wal.BACKUP_LABEL, "000000010000000000000002", None, None),
    ("00000002.history", wal.HISTORY, None, None, None),
    ("00000002.history.br", wal.HISTORY, None, "br", None),
    ("000000010000000000000002-" + "a" * 40 + ".lz4", wal.SEGMENT, "000000010000000000000002", "lz4", "a" * 40),
    ("000000010000000000000002-" + "0f" * 20, wal.SEGMENT, "000000010000000000000002", None, "0f" * 20),
    ("000000010000000000000002.lzo", wal.SEGMENT, "000000010000000000000002", "lzo", None),
])
def test_classify_wal_name(name, kind, segment, compression, checksum):
    parsed = wal.classify_wal_name(name)
    assert parsed is not None
    assert (parsed.kind, parsed.segment, parsed.compression, parsed.checksum) == (kind, segment, compression, checksum)


def test_classify_backup_label_offset_and_history_timeline():
    assert wal.classify_wal_name("000000010000000000000002.00000028.backup").backup_offset == 0x28
    assert wal.classify_wal_name("0000000A.history").timeline == 10


@pytest.mark.parametrize("name", ["backup.info", "000000010000000000000002.tmp", "00000000.history",
                                  "000000010000000000000002.gz.gz", "000000010000000000000002-abc",
                                  "archive.info", "0000000100000000000000020"])
def test_classify_rejects(name):
    assert wal.classify_wal_name(name) is None
