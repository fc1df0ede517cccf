import json
from datetime import UTC, datetime

from pgops.core import findings as F
from pgops.core import layouts, wal

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
SHA = "0123456789abcdef0123456789abcdef01234567"

BARMAN_KEYS = [
    "pg/main/base/20261125T101010/backup.info",
    "pg/main/base/20261125T101010/data.tar.gz",
    "pg/main/base/20261126T101010/data.tar.gz",
    "pg/main/wals/0000000100000000/000000010000000000000001.gz",
    "pg/main/wals/0000000100000000/000000010000000000000002.gz",
    "pg/main/wals/0000000100000000/000000010000000000000002.00000028.backup.gz",
    "pg/main/wals/0000000100000000/000000010000000000000003.partial",
    "pg/main/wals/0000000200000000/000000020000000000000003.zst",
    "pg/main/wals/00000002.history",
]
PGBR_KEYS = [
    "repo/archive/db/archive.info",
    "repo/archive/db/15-1/0000000100000000/000000010000000000000001-" + SHA + ".gz",
    "repo/archive/db/15-1/0000000100000000/000000010000000000000002-" + SHA + ".gz",
    "repo/archive/db/15-1/00000002.history",
    "repo/backup/db/backup.info",
    "repo/backup/db/backup.info.copy",
    "repo/backup/db/20261125-101010F/backup.manifest",
]
WALG_KEYS = [
    "basebackups_005/base_000000010000000000000002/tar_partitions/part_1.tar.lz4",
    "basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json",
    "basebackups_005/base_000000010000000000000009_D_000000010000000000000002_backup_stop_sentinel.json",
    "wal_005/000000010000000000000002.lz4",
    "wal_005/000000010000000000000003.br",
    "wal_005/00000002.history.lz4",
]
WALE_KEYS = [
    "basebackups_005/base_000000010000000000000002_00000028/tar_partitions/part_00000000.tar.lzo",
    "basebackups_005/base_000000010000000000000002_00000028_backup_stop_sentinel.json",
    "wal_005/000000010000000000000002.lzo",
]


def listing(keys):
    return [(key, 100, T0) for key in keys]


def test_detect_layout():
    assert layouts.detect_layout(BARMAN_KEYS, prefix="pg") == layouts.BARMAN_CLOUD
    assert layouts.detect_layout(PGBR_KEYS, prefix="repo/") == layouts.PGBACKREST
    assert layouts.detect_layout(WALG_KEYS) == layouts.WAL_G
    assert layouts.detect_layout(WALE_KEYS) == layouts.WAL_E
    assert layouts.detect_layout(["photos/cat.jpg", "readme.txt"]) is None


def test_barman_listing():
    result = layouts.parse_listing(listing(BARMAN_KEYS), prefix="pg")
    assert result.layout == layouts.BARMAN_CLOUD and result.names == {"main"}
    assert [(b.backup_id, b.status) for b in result.backups] == [("20261125T101010", "UNKNOWN"),
                                                                 ("20261126T101010", "INCOMPLETE")]
    assert result.backup_metadata_keys == ["pg/main/base/20261125T101010/backup.info"]
    assert result.history_keys == {2: "pg/main/wals/00000002.history"}
    assert result.keys_to_fetch[-1] == "pg/main/wals/00000002.history"
    index = result.wal
    assert index.timelines[1].runs() == [(1, 2, T0)]
    assert index.timelines[2].runs() == [(3, 3, T0)]
    assert [p.segment for p in index.partial] == ["000000010000000000000003"]
    assert index.backup_label_count == 1
    assert result.unrecognised_count == 0 and result.findings() == []


BARMAN_INFO = b"""backup_label=None
backup_name=nightly
begin_time=2026-11-25 10:10:10.123456+00:00
begin_wal=000000010000000000000002
begin_xlog=0/2000028
end_time=2026-11-25 10:12:00+00:00
end_wal=000000010000000000000002
end_xlog=0/2000100
size=31457280
status=DONE
timeline=1
xlog_segment_size=16777216
"""


def test_barman_backup_info_resolves_backup():
    result = layouts.parse_listing(listing(BARMAN_KEYS), prefix="pg")
    backups, problems = layouts.resolve_backups(
        result, {"pg/main/base/20261125T101010/backup.info": BARMAN_INFO})
    assert problems == []
    done = backups[0]
    assert (done.backup_id, done.status, done.timeline, done.begin_lsn, done.end_lsn, done.size_bytes) == (
        "20261125T101010", "DONE", 1, 0x2000028, 0x2000100, 31457280)
    assert done.begin_time == datetime(2026, 11, 25, 10, 10, 10, 123456, tzinfo=UTC)
    assert done.wal_segment_size_bytes == 16 * wal.MIB
    assert backups[1].status == "INCOMPLETE"


def test_unreadable_metadata_is_a_finding():
    result = layouts.parse_listing(listing(BARMAN_KEYS), prefix="pg")
    backups, problems = layouts.resolve_backups(result, {"pg/main/base/20261125T101010/backup.info": b"begin_wal=zz"})
    assert [p.id for p in problems] == [F.BACKUP_METADATA_UNREADABLE]
    assert [b.backup_id for b in backups] == ["20261126T101010"]


PGBR_INFO = """[backrest]
backrest-format=5
backrest-version="2.45"

[backup:current]
20261125-101010F={"backrest-format":5,"backrest-version":"2.45","backup-archive-start":"000000010000000000000002","backup-archive-stop":"000000010000000000000002","backup-info-repo-size":2369186,"backup-info-size":31457280,"backup-lsn-start":"0/2000028","backup-lsn-stop":"0/2000100","backup-timestamp-start":1795601410,"backup-timestamp-stop":1795601530,"backup-type":"full","db-id":1}

[db]
db-catalog-version=202209061
db-control-version=1300
db-id=1
db-system-id=7300000000000000000
db-version="15"

[db:history]
1={"db-catalog-version":202209061,"db-control-version":1300,"db-system-id":7300000000000000000,"db-version":"15"}
"""


def test_pgbackrest_listing_and_backup_info():
    result = layouts.parse_listing(listing(PGBR_KEYS), prefix="repo")
    assert result.layout == layouts.PGBACKREST and result.names == {"db"}
    assert result.current_stream == "15-1"
    assert result.wal.timelines[1].runs() == [(1, 2, T0)]
    assert result.history_keys == {2: "repo/archive/db/15-1/00000002.history"}
    assert result.backup_metadata_keys == ["repo/backup/db/backup.info"]
    assert result.unrecognised_count == 0
    backups, problems = layouts.resolve_backups(result, {"repo/backup/db/backup.info": PGBR_INFO.encode()})
    assert problems == []
    (ref,) = backups
    assert (ref.backup_id, ref.status, ref.begin_segment, ref.begin_lsn, ref.size_bytes, ref.stream) == (
        "20261125-101010F", "DONE", "000000010000000000000002", 0x2000028, 31457280, "15-1")
    assert ref.end_time == datetime.fromtimestamp(1795601530, tz=UTC)


def test_walg_listing_and_sentinel():
    result = layouts.parse_listing(listing(WALG_KEYS))
    assert result.layout == layouts.WAL_G
    assert [b.backup_id for b in result.backups] == [
        "base_000000010000000000000002", "base_000000010000000000000009_D_000000010000000000000002"]
    assert result.wal.timelines[1].runs() == [(2, 3, T0)]
    assert result.history_keys == {2: "wal_005/00000002.history.lz4"}
    sentinel = json.dumps({"LSN": 0x2000028, "FinishLSN": 0x3000100, "StartTime": "2026-11-25T10:10:10Z",
                           "FinishTime": "2026-11-25T10:12:00Z", "UncompressedSize": 100,
                           "CompressedSize": 40}).encode()
    ref = layouts.parse_xlog_sentinel(sentinel, backup_id="base_000000010000000000000002")
    assert (ref.begin_segment, ref.end_segment, ref.size_bytes, ref.status) == (
        "000000010000000000000002", "000000010000000000000003", 40, "DONE")
    assert ref.end_time == datetime(2026, 11, 25, 10, 12, tzinfo=UTC)


def test_wale_listing():
    result = layouts.parse_listing(listing(WALE_KEYS))
    assert result.layout == layouts.WAL_E
    assert [b.backup_id for b in result.backups] == ["base_000000010000000000000002_00000028"]
    assert result.wal.timelines[1].runs() == [(2, 2, T0)]
    ref = layouts.parse_xlog_sentinel(b'{"wal_segment_backup_stop": "000000010000000000000004"}',
                                      backup_id="base_000000010000000000000002_00000028")
    assert (ref.begin_segment, ref.end_segment) == ("000000010000000000000002", "000000010000000000000004")


def test_unknown_layout_is_a_finding_not_an_exception():
    result = layouts.parse_listing(listing(["photos/cat.jpg"]))
    assert result.layout is None
    (finding,) = result.findings()
    assert finding.id == F.UNKNOWN_LAYOUT and finding.severity == F.CRITICAL
    assert finding.evidence["sample_keys"] == ["photos/cat.jpg"]


def test_foreign_keys_in_prefix_are_counted():
    result = layouts.parse_listing(listing([*BARMAN_KEYS, "pg/main/wals/0000000100000000/notes.txt"]), prefix="pg")
    assert result.unrecognised_count == 1
    assert [f.id for f in result.findings()] == [F.UNRECOGNISED_KEYS]


def test_segments_that_do_not_fit_the_segment_size():
    keys = ["pg/main/wals/0000000100000000/000000010000000000000004"]
    result = layouts.parse_listing(listing(keys), prefix="pg", wal_segment_size_bytes=1024 * wal.MIB)
    assert [f.id for f in result.findings()] == [F.WAL_SEGMENT_SIZE_MISMATCH]


def test_segment_runs_any_order_gives_same_runs():
    ordered = layouts.SegmentRuns()
    shuffled = layouts.SegmentRuns()
    segnos = [1, 2, 3, 7, 8, 10]
    for s in segnos:
        ordered.add(s, T0)
    for s in [10, 3, 1, 8, 2, 7, 2]:
        shuffled.add(s, T0)
    assert ordered.runs() == shuffled.runs() == [(1, 3, T0), (7, 8, T0), (10, 10, T0)]
    assert shuffled.missing(0, 12) == [(0, 0), (4, 6), (9, 9), (11, 12)]
    assert 8 in shuffled and 9 not in shuffled
