"""WAL continuity: can every retained backup be recovered to the newest archived WAL?

For each finished backup, every segment from its begin WAL to the newest archived segment must be
in the archive, following timeline switches the way PostgreSQL's recovery does: a segment number
is read from the newest timeline of the chain that has begun by then, so after a switch at LSN X
the new timeline supplies the segment containing X (PostgreSQL copies its first part there) and
the old timeline is needed only for the segments before it. Every timeline after the backup's
needs its .history file, or recovery cannot follow the switch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgops.core import findings as F
from pgops.core import wal
from pgops.core.layouts import BackupRef, WalIndex


@dataclass(frozen=True, kw_only=True)
class Gap:
    timeline: int
    first_segment: str
    last_segment: str
    count: int
    backup_ids: tuple[str, ...]  # backups whose recovery to the newest WAL crosses the gap
    inconsistent_backup_ids: tuple[str, ...]  # gap between begin and end WAL: not restorable at all

    def to_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "first_segment": self.first_segment, "last_segment": self.last_segment,
                "count": self.count, "backup_ids": list(self.backup_ids),
                "inconsistent_backup_ids": list(self.inconsistent_backup_ids)}


@dataclass(frozen=True, kw_only=True)
class RecoveryWindow:
    earliest_backup_id: str
    earliest_time: datetime | None  # end of that backup: the first consistent point
    earliest_lsn: int | None
    latest_segment: str
    latest_lsn: int  # end of the last contiguous archived segment
    latest_time: datetime | None  # its last_modified: an upper bound of the last replayable commit
    newest_backup_id: str | None = None  # the newest backup that can be restored (to its end at least)

    def to_dict(self) -> dict[str, Any]:
        return {
            "newest_backup_id": self.newest_backup_id,
            "earliest_backup_id": self.earliest_backup_id,
            "earliest_time": self.earliest_time.isoformat() if self.earliest_time else None,
            "earliest_lsn": wal.format_lsn(self.earliest_lsn) if self.earliest_lsn is not None else None,
            "latest_segment": self.latest_segment,
            "latest_lsn": wal.format_lsn(self.latest_lsn),
            "latest_time": self.latest_time.isoformat() if self.latest_time else None,
        }


@dataclass(kw_only=True)
class ContinuityReport:
    newest_segment: str | None
    gaps: list[Gap] = field(default_factory=list)
    missing_history: dict[int, tuple[str, ...]] = field(default_factory=dict)  # timeline -> backup ids
    inferred_switch_timelines: list[int] = field(default_factory=list)
    complete_backup_ids: list[str] = field(default_factory=list)
    broken_backup_ids: list[str] = field(default_factory=list)
    # backup id -> the later timelines whose .history file its recovery to the newest WAL follows
    history_needed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    window: RecoveryWindow | None = None
    findings: list[F.Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        return F.overall_status(self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "newest_segment": self.newest_segment,
            "gaps": [gap.to_dict() for gap in self.gaps],
            "missing_history": {str(tli): list(ids) for tli, ids in self.missing_history.items()},
            "inferred_switch_timelines": self.inferred_switch_timelines,
            "complete_backup_ids": self.complete_backup_ids,
            "broken_backup_ids": self.broken_backup_ids,
            "window": self.window.to_dict() if self.window else None,
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass(frozen=True)
class _Need:
    """Segments [first, last] of one timeline that a backup's recovery reads."""

    timeline: int
    first: int
    last: int


class _Chains:
    """Timeline chains from the parsed histories; a missing history is inferred from the listing."""

    def __init__(self, index: WalIndex, histories: Mapping[int, list[wal.HistoryEntry]]) -> None:
        self.index = index
        self.histories = histories
        self.inferred: set[int] = set()
        self._cache: dict[int, list[wal.TimelineSpan]] = {}
        self._known = sorted(set(index.timelines) | set(histories) | set(index.history))

    def chain(self, timeline: int) -> list[wal.TimelineSpan]:
        cached = self._cache.get(timeline)
        if cached is not None:
            return cached
        if timeline in self.histories or timeline == 1:
            spans = wal.timeline_chain(timeline, self.histories.get(timeline, []))
        else:
            # without the .history file: assume the next lower timeline ended where this one's WAL begins
            self.inferred.add(timeline)
            parents = [tli for tli in self._known if tli < timeline]
            runs = self.index.timelines.get(timeline)
            first_segno = runs.runs()[0][0] if runs is not None and runs.count else None
            if not parents or first_segno is None:
                spans = [wal.TimelineSpan(timeline=timeline, start_lsn=0, end_lsn=None)]
            else:
                switch_lsn = first_segno * self.index.wal_segment_size_bytes
                parent = self.chain(parents[-1])
                spans = [*parent[:-1],
                         wal.TimelineSpan(timeline=parent[-1].timeline, start_lsn=parent[-1].start_lsn,
                                          end_lsn=max(switch_lsn, parent[-1].start_lsn)),
                         wal.TimelineSpan(timeline=timeline, start_lsn=max(switch_lsn, parent[-1].start_lsn),
                                          end_lsn=None)]
        self._cache[timeline] = spans
        return spans


def _begin_lsn(backup: BackupRef, size: int) -> int:
    if backup.begin_lsn is not None:
        return backup.begin_lsn
    return wal.segment_start_lsn(backup.begin_segment, size)


def _end_segno(backup: BackupRef, size: int, begin_segno: int) -> int:
    if backup.end_lsn is not None:
        # the end LSN points just past the last record; at a boundary it is still the previous segment
        return max((backup.end_lsn - 1) // size, begin_segno)
    if backup.end_segment:
        return wal.segment_to_segno(backup.end_segment, size)[1]
    return begin_segno


def _needs(spans: list[wal.TimelineSpan], begin_lsn: int, final_last: int, size: int) -> list[_Need]:
    needs: list[_Need] = []
    for span in spans:
        start = max(begin_lsn, span.start_lsn)
        first = start // size
        last = final_last if span.end_lsn is None else span.end_lsn // size - 1
        if last >= first:
            needs.append(_Need(span.timeline, first, last))
    return needs


def _merge(needs: Iterable[_Need]) -> dict[int, list[tuple[int, int]]]:
    by_tli: dict[int, list[tuple[int, int]]] = {}
    for need in needs:
        by_tli.setdefault(need.timeline, []).append((need.first, need.last))
    merged: dict[int, list[tuple[int, int]]] = {}
    for tli, ranges in by_tli.items():
        ranges.sort()
        out: list[list[int]] = []
        for first, last in ranges:
            if out and first <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], last)
            else:
                out.append([first, last])
        merged[tli] = [(a, b) for a, b in out]
    return merged


def check_continuity(
    backups: Iterable[BackupRef],
    index: WalIndex,
    histories: Mapping[int, list[wal.HistoryEntry]] | None = None,
) -> ContinuityReport:
    """Check that every finished backup can be recovered to the newest archived segment."""
    histories = histories or {}
    size = index.wal_segment_size_bytes
    done = sorted((b for b in backups if b.done and b.begin_segment),
                  key=lambda b: (wal.segment_to_segno(b.begin_segment, size)[1], b.backup_id))
    live = {tli: runs for tli, runs in index.timelines.items() if runs.count}
    if not live:
        report = ContinuityReport(newest_segment=None)
        report.findings.append(F.Finding(
            id=F.NO_WAL, severity=F.CRITICAL,
            message="no archived WAL segment found: no backup can be made consistent or rolled forward",
            evidence={"backups": len(done)},
            fix="check archive_mode=on and archive_command (barman-cloud-wal-archive) on the primary and "
                "pg_stat_archiver.failed_count",
        ))
        return report
    target_tli = max(live)
    newest_segno = live[target_tli].max_segno()
    report = ContinuityReport(newest_segment=index.segment_name(target_tli, newest_segno))
    if not done:
        report.findings.append(F.Finding(
            id=F.NO_BACKUPS, severity=F.CRITICAL,
            message=f"no finished base backup found; WAL up to {report.newest_segment} is archived but "
                    f"cannot be restored without one",
            evidence={"newest_segment": report.newest_segment},
            fix="run a base backup now (barman-cloud-backup) and check the backup DAG's recent runs",
        ))
        return report

    chains = _Chains(index, histories)
    target_chain = chains.chain(target_tli)
    needs_by_backup: dict[str, list[_Need]] = {}
    consistency: dict[str, tuple[int, int]] = {}
    for backup in done:
        if backup.wal_segment_size_bytes and backup.wal_segment_size_bytes != size:
            report.findings.append(F.Finding(
                id=F.WAL_SEGMENT_SIZE_MISMATCH, severity=F.CRITICAL,
                message=f"backup {backup.backup_id} was taken with {backup.wal_segment_size_bytes}-byte WAL segments "
                        f"(xlog_segment_size in its metadata), the archive's WAL is read with {size}-byte segments: "
                        f"this backup cannot be rolled forward with that WAL",
                evidence={"backup_id": backup.backup_id, "backup_bytes": backup.wal_segment_size_bytes,
                          "audit_bytes": size},
                fix="if the prefix holds another server's backups, correct storage.prefix and storage.server_name in "
                    "the inventory; if the server's wal_segment_size changed (pg_resetwal --wal-segsize), take a new "
                    "base backup now and delete this one (barman-cloud-backup-delete) once retention allows",
            ))
            continue
        begin_lsn = _begin_lsn(backup, size)
        btli = backup.timeline or wal.parse_segment_name(backup.begin_segment)[0]
        begin_segno = begin_lsn // size
        spans = target_chain
        own = [i for i, s in enumerate(spans) if s.timeline == btli and (s.end_lsn is None or begin_lsn < s.end_lsn)]
        final_last = newest_segno
        if not own:
            spans = chains.chain(btli)
            own = [len(spans) - 1]
            runs = live.get(btli)
            final_last = runs.max_segno() if runs is not None else begin_segno
            report.findings.append(F.Finding(
                id=F.BACKUP_OFF_TIMELINE, severity=F.WARNING,
                message=f"backup {backup.backup_id} (timeline {btli}, {backup.begin_segment}) is not on the history "
                        f"of the newest timeline {target_tli}: it can only restore timeline {btli}",
                evidence={"backup_id": backup.backup_id, "timeline": btli, "newest_timeline": target_tli},
                fix=f"take a new base backup on timeline {target_tli}; delete this one once retention allows",
            ))
        spans = spans[own[0]:]
        end_segno = _end_segno(backup, size, begin_segno)
        needs_by_backup[backup.backup_id] = _needs(spans, begin_lsn, max(final_last, end_segno), size)
        consistency[backup.backup_id] = (begin_segno, end_segno)
        report.history_needed[backup.backup_id] = tuple(span.timeline for span in spans[1:])
        for span in spans[1:]:
            if span.timeline not in index.history:
                ids = report.missing_history.get(span.timeline, ())
                report.missing_history[span.timeline] = (*ids, backup.backup_id)

    broken: set[str] = set(id_ for ids in report.missing_history.values() for id_ in ids)
    for tli, ranges in sorted(_merge(n for needs in needs_by_backup.values() for n in needs).items()):
        runs = index.timelines.get(tli)
        for first, last in ranges:
            missing = runs.missing(first, last) if runs is not None else [(first, last)]
            for gap_first, gap_last in missing:
                hit = tuple(bid for bid, needs in needs_by_backup.items()
                            if any(n.timeline == tli and n.first <= gap_last and gap_first <= n.last for n in needs))
                inconsistent = tuple(bid for bid in hit
                                     if consistency[bid][0] <= gap_last and gap_first <= consistency[bid][1])
                broken.update(hit)
                report.gaps.append(Gap(timeline=tli, first_segment=index.segment_name(tli, gap_first),
                                       last_segment=index.segment_name(tli, gap_last),
                                       count=gap_last - gap_first + 1, backup_ids=hit,
                                       inconsistent_backup_ids=inconsistent))
    report.inferred_switch_timelines = sorted(chains.inferred)
    report.complete_backup_ids = [b for b in needs_by_backup if b not in broken]
    report.broken_backup_ids = [b for b in needs_by_backup if b in broken]
    report.window = _window(done, needs_by_backup, consistency, report, index)
    report.findings.extend(_gap_findings(report, index))
    return report


def _window(done: list[BackupRef], needs_by_backup: dict[str, list[_Need]],
            consistency: dict[str, tuple[int, int]], report: ContinuityReport,
            index: WalIndex) -> RecoveryWindow | None:
    inconsistent = {bid for gap in report.gaps for bid in gap.inconsistent_backup_ids}
    usable = [b for b in done if b.backup_id in needs_by_backup and b.backup_id not in inconsistent]
    if not usable:
        return None
    newest = usable[-1]
    latest: tuple[int, int] | None = None
    for need in needs_by_backup[newest.backup_id]:
        runs = index.timelines.get(need.timeline)
        missing = runs.missing(need.first, need.last) if runs is not None else [(need.first, need.last)]
        if missing:
            if missing[0][0] > need.first:
                latest = (need.timeline, missing[0][0] - 1)
            break
        latest = (need.timeline, need.last)
    if latest is None:
        return None
    complete = [b for b in usable if b.backup_id in report.complete_backup_ids]
    earliest = complete[0] if complete else newest
    runs = index.timelines[latest[0]]
    return RecoveryWindow(
        earliest_backup_id=earliest.backup_id,
        earliest_time=earliest.end_time,
        earliest_lsn=earliest.end_lsn,
        latest_segment=index.segment_name(*latest),
        latest_lsn=(latest[1] + 1) * index.wal_segment_size_bytes,
        latest_time=runs.last_modified_of(latest[1]),
        newest_backup_id=newest.backup_id,
    )


def _gap_findings(report: ContinuityReport, index: WalIndex) -> list[F.Finding]:
    out: list[F.Finding] = []
    size = index.wal_segment_size_bytes
    for gap in report.gaps:
        lost_from = wal.format_lsn(wal.segment_start_lsn(gap.first_segment, size))
        affected = ", ".join(gap.backup_ids)
        message = (f"WAL archive gap on timeline {gap.timeline}: {gap.count} segment(s) "
                   f"{gap.first_segment}..{gap.last_segment} are missing; backup(s) {affected} cannot be "
                   f"recovered past {lost_from}")
        if gap.inconsistent_backup_ids:
            message += f", and {', '.join(gap.inconsistent_backup_ids)} cannot be restored at all (gap inside the backup)"
        out.append(F.Finding(
            id=F.WAL_GAP, severity=F.CRITICAL, message=message, evidence=gap.to_dict(),
            fix="take a new base backup now so recovery no longer depends on the missing WAL, then find why "
                "the segments were not archived (pg_stat_archiver, the PostgreSQL log, bucket lifecycle rules)",
        ))
    for tli, backup_ids in sorted(report.missing_history.items()):
        name = wal.history_file_name(tli)
        out.append(F.Finding(
            id=F.HISTORY_MISSING, severity=F.CRITICAL,
            message=(f"timeline history file {name} is not in the archive: recovery of backup(s) "
                     f"{', '.join(backup_ids)} cannot follow the switch to timeline {tli}"),
            evidence={"timeline": tli, "history_file": name, "backup_ids": list(backup_ids)},
            fix=(f"copy pg_wal/{name} from the primary into the archive (barman-cloud-wal-archive), "
                 f"or take a new base backup on timeline {tli}"),
        ))
    if not report.gaps and not report.missing_history and report.window is not None:
        out.append(F.Finding(
            id=F.WAL_CONTINUOUS, severity=F.OK,
            message=(f"WAL is continuous from every backup to {report.newest_segment}; recoverable from "
                     f"{report.window.earliest_backup_id} to {wal.format_lsn(report.window.latest_lsn)}"),
            evidence={"window": report.window.to_dict(), "complete_backup_ids": report.complete_backup_ids},
        ))
    return out
