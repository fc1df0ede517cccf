"""WAL segment size from the backups' own metadata: a listing read at 1 MiB and re-keyed to the real size."""

import ast
import dataclasses
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgops import inventory
from pgops.core import findings as F
from pgops.core import layouts, wal
from pgops.core.continuity import check_continuity

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
MIB64 = 64 * wal.MIB
REPO = Path(__file__).resolve().parents[2]


def barman_info(backup_id, begin, end, *, size, day=0, record_size=True):
    b_lsn = wal.segment_start_lsn(begin, size) + 0x28
    e_lsn = wal.segment_start_lsn(end, size) + 0x100
    text = (f"backup_id={backup_id}\nstatus=DONE\ntimeline={int(begin[:8], 16)}\nbegin_wal={begin}\nend_wal={end}\n"
            f"begin_xlog={wal.format_lsn(b_lsn)}\nend_xlog={wal.format_lsn(e_lsn)}\n"
            f"begin_time={(T0 + timedelta(days=day)).isoformat()}\n"
            f"end_time={(T0 + timedelta(days=day, minutes=5)).isoformat()}\n")
    return (text + (f"xlog_segment_size={size}\n" if record_size else "")).encode()


def barman_keys(segments):
    return [(f"pg/main/wals/{s[:16]}/{s}.gz", 100, T0) for s in segments]


# 64 MiB segments: seg goes 00..3F, so ...00003F is followed by ...0100000000
SEGS_64 = list(wal.segment_range("000000010000000000000030", "000000010000000100000004", MIB64))


def test_64mib_segments_are_continuous_once_rekeyed_from_backup_info():
    keys = [("pg/main/base/b1/backup.info", 1, T0), *barman_keys(SEGS_64)]
    listing = layouts.parse_listing(keys, prefix="pg/main", wal_segment_size_bytes=wal.MIN_WAL_SEGMENT_SIZE_BYTES)
    backups, problems = layouts.resolve_backups(listing, {
        "pg/main/base/b1/backup.info": barman_info("b1", SEGS_64[0], SEGS_64[1], size=MIB64)})
    assert problems == []
    evidence = layouts.wal_segment_size_from_backups(backups)
    assert evidence.wal_segment_size_bytes == MIB64 and evidence.backup_id == "b1"
    assert "xlog_segment_size" in evidence.detail
    listing.resize_segments(evidence.wal_segment_size_bytes)
    assert listing.misfit_segment_count == 0 and listing.findings() == []
    report = check_continuity(backups, listing.wal)
    assert report.gaps == [] and report.status == F.OK, [f.message for f in report.findings]
    assert report.window.latest_segment == "000000010000000100000004"
    assert listing.wal.segment_count == len(SEGS_64)


def test_the_same_listing_read_as_16mib_shows_the_false_gap_this_avoids():
    listing = layouts.parse_listing(barman_keys(SEGS_64), prefix="pg/main")
    backup = layouts.barman_backup_ref(layouts.parse_barman_backup_info(
        barman_info("b1", SEGS_64[0], SEGS_64[1], size=wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES, record_size=False)),
        backup_id="b1")
    ids = [f.id for f in check_continuity([backup], listing.wal).findings]
    assert F.WAL_GAP in ids  # ...3F -> ...100000000 skips 192 segment numbers at 16 MiB


def test_rekey_keeps_runs_gaps_and_last_modified():
    present = [s for s in SEGS_64 if s != "00000001000000000000003A"]
    keys = [(f"pg/main/wals/{s[:16]}/{s}", 1, T0 + timedelta(minutes=i)) for i, s in enumerate(present)]
    listing = layouts.parse_listing(keys, prefix="pg/main", wal_segment_size_bytes=wal.MIN_WAL_SEGMENT_SIZE_BYTES)
    listing.resize_segments(MIB64)
    runs = listing.wal.timelines[1].runs()
    first_64 = wal.segment_to_segno("000000010000000000000030", MIB64)[1]
    assert [(a - first_64, b - first_64) for a, b, _ in runs] == [(0, 9), (11, len(SEGS_64) - 1)]
    assert runs[-1][2] == T0 + timedelta(minutes=len(present) - 1)
    assert listing.wal.segment_count == len(present)


def test_rekey_counts_names_that_cannot_exist_as_misfits():
    segs = ["000000010000000000000003", "000000010000000000000004", "0000000100000000000000F0"]
    listing = layouts.parse_listing(barman_keys(segs), prefix="pg/main",
                                    wal_segment_size_bytes=wal.MIN_WAL_SEGMENT_SIZE_BYTES)
    listing.resize_segments(1024 * wal.MIB)  # 1 GiB: seg goes 0..3
    assert listing.misfit_segment_count == 2 and listing.misfit_segment_sample[0] == "000000010000000000000004"
    (finding,) = listing.findings()
    assert finding.id == F.WAL_SEGMENT_SIZE_MISMATCH and "storage.prefix" in finding.fix
    with pytest.raises(ValueError, match="smaller"):
        listing.wal.resized(wal.MIB)


def test_size_follows_from_begin_wal_and_lsn_when_not_recorded():
    # pgBackRest's backup.info and WAL-G's sentinel record the begin WAL and LSN, not the size
    ref = layouts.BackupRef(backup_id="20261125-101010F", status=layouts.DONE, begin_segment="000000010000000500000021",
                            begin_lsn=(5 << 32) + 0x21 * MIB64 + 0x28, end_time=T0)
    evidence = layouts.wal_segment_size_from_backups([ref])
    assert evidence.wal_segment_size_bytes == MIB64 and "000000010000000500000021" in evidence.detail
    # seg 0 fits every size: no evidence, the audit falls back (and says so)
    ambiguous = dataclasses.replace(ref, begin_segment="000000010000000500000000", begin_lsn=(5 << 32) + 0x28)
    assert layouts.wal_segment_size_from_backups([ambiguous]) is None
    # two backups narrow it down together
    second = dataclasses.replace(ref, backup_id="b2", begin_segment="000000010000000600000001",
                                 begin_lsn=(6 << 32) + MIB64 + 5, end_time=T0 - timedelta(days=1))
    assert layouts.wal_segment_size_from_backups([ambiguous, second]).wal_segment_size_bytes == MIB64


def test_mismatching_backup_fix_names_real_settings():
    index = layouts.WalIndex.from_segments(SEGS_64[:4], wal_segment_size_bytes=MIB64)
    ref = layouts.barman_backup_ref(layouts.parse_barman_backup_info(
        barman_info("old", SEGS_64[0], SEGS_64[0], size=MIB64)), backup_id="old")
    odd = dataclasses.replace(ref, backup_id="odd", wal_segment_size_bytes=16 * wal.MIB)
    (finding,) = [f for f in check_continuity([ref, odd], index).findings if f.id == F.WAL_SEGMENT_SIZE_MISMATCH]
    assert finding.evidence["backup_id"] == "odd" and "storage.server_name" in finding.fix


# --- every fix text names a real setting -------------------------------------------------------------------


def _inventory_paths() -> set[str]:
    """Every inventory field as a dotted path (storage.prefix, targets.rto_s, ...) and as a bare name."""
    out: set[str] = set()

    def walk(cls, path: str) -> None:
        for f in dataclasses.fields(cls):
            name = f"{path}.{f.name}" if path else f.name
            out.update({name, f.name})
            for candidate in (inventory.Storage, inventory.Engine, inventory.Runner, inventory.Schedule,
                              inventory.Retention, inventory.Targets, inventory.Alerts, inventory.Replication,
                              inventory.ReplicaNode, inventory.Endpoint):
                if candidate.__name__ in str(f.type) and candidate is not cls and name.count(".") < 2:
                    walk(candidate, name)

    walk(inventory.Cluster, "")
    return out


def _fix_texts() -> list[tuple[str, str]]:
    """(file, text) of every fix= argument and 'Fix:' message in plugins/pgops (f-string parts joined)."""
    texts = []
    for path in sorted((REPO / "plugins" / "pgops").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            value = None
            if isinstance(node, ast.keyword) and node.arg == "fix":
                value = node.value
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "Fix:" in node.value:
                value = node
            if value is None:
                continue
            parts = [n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if parts:
                texts.append((str(path.relative_to(REPO)), "".join(parts)))
    return texts


def test_fix_texts_name_only_inventory_fields_that_exist():
    fields = _inventory_paths()
    sections = "storage|engine|runner|schedule|retention|targets|alerts|replication|endpoint"
    texts = _fix_texts()
    assert len(texts) > 50  # the scan finds the findings' fixes
    bad = []
    for where, text in texts:
        named = set(re.findall(rf"\b((?:{sections})\.[a-z_]+)\b", text))
        named |= {m for m in re.findall(r"\b([a-z][a-z0-9_]*_[a-z0-9_]+)\s+in the inventory", text)}
        named |= {m for m in re.findall(r"the cluster's ([a-z][a-z0-9_]*) in the inventory", text)}
        bad += [(where, name, text) for name in named if name not in fields]
    assert bad == []
