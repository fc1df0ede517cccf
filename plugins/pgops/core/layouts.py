"""Bucket layouts of WAL archivers: from a key listing to backups and archived WAL, without I/O.

Supported: barman-cloud (ours), pgBackRest (S3 repo), WAL-G and WAL-E. The listing is a stream of
(key, size_bytes, last_modified) tuples; it is read once and only compact per-timeline runs of
segment numbers are kept, so a listing of millions of WAL objects fits in little memory.
Metadata whose content is needed (backup.info, sentinels, .history) is named in the result; the
caller fetches it and hands the bytes to the pure parsers here.
"""

from __future__ import annotations

import bisect
import configparser
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgops.core import findings as F
from pgops.core import wal

BARMAN_CLOUD = "barman-cloud"
PGBACKREST = "pgbackrest"
WAL_G = "wal-g"
WAL_E = "wal-e"
LAYOUTS = (BARMAN_CLOUD, PGBACKREST, WAL_G, WAL_E)

DONE = "DONE"
UNKNOWN_STATUS = "UNKNOWN"  # metadata not fetched or not readable yet

DETECT_SAMPLE_KEYS = 1000
UNRECOGNISED_SAMPLE_KEYS = 20

_COMP = "|".join(wal.COMPRESSION_SUFFIXES)
_SEG = r"(?P<tli>[0-9A-F]{8})(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})"
_SHA1 = r"-[0-9a-f]{40}"

# Fast paths: plain (possibly compressed) segments, the bulk of every listing. Named groups: owner
# (barman server, pgBackRest stanza), stream (pgBackRest archive id), tli/log/seg, base (WAL file name).
_BARMAN_SEGMENT_RE = re.compile(rf"^(?:(?P<owner>[^/]+)/)?wals/[0-9A-F]{{16}}/{_SEG}(?:\.(?:{_COMP}))?$")
_PGBR_SEGMENT_RE = re.compile(
    rf"^archive/(?P<owner>[^/]+)/(?P<stream>[^/]+-\d+)/[0-9A-F]{{16}}/{_SEG}{_SHA1}(?:\.(?:{_COMP}))?$")
_WALG_SEGMENT_RE = re.compile(rf"^wal_005/{_SEG}(?:\.(?:{_COMP}))?$")

_BARMAN_WAL_RE = re.compile(r"^(?:(?P<owner>[^/]+)/)?wals/(?:[0-9A-F]{16}/)?(?P<base>[^/]+)$")
_BARMAN_BASE_RE = re.compile(r"^(?:([^/]+)/)?base/([^/]+)/(.+)$")
_PGBR_WAL_RE = re.compile(r"^archive/(?P<owner>[^/]+)/(?P<stream>[^/]+-\d+)/(?:[0-9A-F]{16}/)?(?P<base>[^/]+)$")
_PGBR_ARCHIVE_INFO_RE = re.compile(r"^archive/([^/]+)/archive\.info(?:\.copy)?$")
_PGBR_BACKUP_INFO_RE = re.compile(r"^backup/([^/]+)/backup\.info$")
_PGBR_BACKUP_OTHER_RE = re.compile(r"^backup/([^/]+)/(.+)$")
_XLOG_WAL_RE = re.compile(r"^wal_005/(?P<base>[^/]+)$")
_WALG_SENTINEL_RE = re.compile(r"^basebackups_005/(base_([0-9A-F]{24})(?:_D_[0-9A-F]{24})?)_backup_stop_sentinel\.json$")
_WALE_SENTINEL_RE = re.compile(r"^basebackups_005/(base_([0-9A-F]{24})_([0-9A-F]{8}))_backup_stop_sentinel\.json$")
_WALG_BASE_RE = re.compile(r"^basebackups_005/base_[0-9A-F]{24}(?:_D_[0-9A-F]{24})?/")
_WALE_BASE_RE = re.compile(r"^basebackups_005/base_[0-9A-F]{24}_[0-9A-F]{8}/")
_BASEBACKUPS_RE = re.compile(r"^basebackups_005/")


# --- model ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BackupRef:
    """One base backup, whatever the tool. Fields the metadata did not give are None."""

    backup_id: str
    status: str = UNKNOWN_STATUS
    timeline: int | None = None
    begin_segment: str | None = None
    begin_lsn: int | None = None
    end_segment: str | None = None
    end_lsn: int | None = None
    begin_time: datetime | None = None
    end_time: datetime | None = None
    size_bytes: int | None = None
    wal_segment_size_bytes: int | None = None
    stream: str = ""  # pgBackRest archive id ("15-1"); backups and WAL of other ids do not mix
    metadata_keys: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.status == DONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "status": self.status,
            "timeline": self.timeline,
            "begin_segment": self.begin_segment,
            "begin_lsn": wal.format_lsn(self.begin_lsn) if self.begin_lsn is not None else None,
            "end_segment": self.end_segment,
            "end_lsn": wal.format_lsn(self.end_lsn) if self.end_lsn is not None else None,
            "begin_time": self.begin_time.isoformat() if self.begin_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "size_bytes": self.size_bytes,
            "metadata_keys": list(self.metadata_keys),
        }


@dataclass(frozen=True, kw_only=True)
class WalObject:
    """One archived WAL-related object that is not a plain segment (history, partial, label)."""

    kind: str  # wal.HISTORY, wal.PARTIAL or wal.BACKUP_LABEL
    timeline: int
    segment: str | None
    key: str
    size_bytes: int
    last_modified: datetime | None


class SegmentRuns:
    """Archived segment numbers of one timeline as sorted runs [first, last].

    S3 lists keys in order, so segments usually arrive ascending and extend the last run in O(1);
    anything out of order is parked and merged once, so any order gives the same runs.
    Only the last_modified of each run's last segment is kept: that is where recovery can stop.
    """

    __slots__ = ("_firsts", "_lasts", "_last_modified", "_pending", "count")

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        self._last_modified: list[datetime | None] = []
        self._pending: dict[int, datetime | None] = {}
        self.count = 0  # objects seen, duplicates (e.g. .gz next to plain) included

    def add(self, segno: int, last_modified: datetime | None = None) -> None:
        self.count += 1
        lasts = self._lasts
        if lasts and segno == lasts[-1] + 1:
            lasts[-1] = segno
            self._last_modified[-1] = last_modified
        elif not lasts or segno > lasts[-1] + 1:
            self._firsts.append(segno)
            lasts.append(segno)
            self._last_modified.append(last_modified)
        elif segno == lasts[-1]:
            if last_modified is not None and (self._last_modified[-1] is None or last_modified > self._last_modified[-1]):
                self._last_modified[-1] = last_modified
        else:
            previous = self._pending.get(segno)
            if previous is None or (last_modified is not None and last_modified > previous):
                self._pending[segno] = last_modified

    def _settle(self) -> None:
        if not self._pending:
            return
        merged: list[list[Any]] = [[f, la, lm] for f, la, lm in zip(self._firsts, self._lasts, self._last_modified,
                                                                     strict=True)]
        merged.extend([s, s, lm] for s, lm in self._pending.items())
        merged.sort(key=lambda run: (run[0], run[1]))
        out: list[list[Any]] = []
        for first, last, lm in merged:
            if out and first <= out[-1][1] + 1:
                top = out[-1]
                if last > top[1]:
                    top[1], top[2] = last, lm
                elif last == top[1] and lm is not None and (top[2] is None or lm > top[2]):
                    top[2] = lm
            else:
                out.append([first, last, lm])
        self._firsts = [r[0] for r in out]
        self._lasts = [r[1] for r in out]
        self._last_modified = [r[2] for r in out]
        self._pending = {}

    def append_run(self, first: int, last: int, last_modified: datetime | None, count: int) -> None:
        """Add a run above every run so far (a re-keyed index): merged with the last one when adjacent."""
        self._settle()
        if self._lasts and first <= self._lasts[-1] + 1:
            if last > self._lasts[-1]:
                self._lasts[-1], self._last_modified[-1] = last, last_modified
        else:
            self._firsts.append(first)
            self._lasts.append(last)
            self._last_modified.append(last_modified)
        self.count += count

    def runs(self) -> list[tuple[int, int, datetime | None]]:
        self._settle()
        return list(zip(self._firsts, self._lasts, self._last_modified, strict=True))

    def __contains__(self, segno: int) -> bool:
        self._settle()
        i = bisect.bisect_right(self._firsts, segno) - 1
        return i >= 0 and segno <= self._lasts[i]

    def max_segno(self) -> int | None:
        self._settle()
        return self._lasts[-1] if self._lasts else None

    def last_modified_of(self, segno: int) -> datetime | None:
        """last_modified of segno when it ends a run (the only ones kept), else None."""
        self._settle()
        i = bisect.bisect_right(self._firsts, segno) - 1
        return self._last_modified[i] if i >= 0 and self._lasts[i] == segno else None

    def missing(self, first: int, last: int) -> list[tuple[int, int]]:
        """Missing ranges (inclusive) within [first, last]."""
        self._settle()
        gaps: list[tuple[int, int]] = []
        cursor = first
        i = max(bisect.bisect_right(self._firsts, first) - 1, 0)
        while cursor <= last and i < len(self._firsts):
            run_first, run_last = self._firsts[i], self._lasts[i]
            if run_last < cursor:
                i += 1
                continue
            if run_first > cursor:
                gaps.append((cursor, min(run_first - 1, last)))
            cursor = run_last + 1
            i += 1
        if cursor <= last:
            gaps.append((cursor, last))
        return gaps


@dataclass(kw_only=True)
class WalIndex:
    """Archived WAL of one stream: segment runs per timeline, history and other WAL objects."""

    wal_segment_size_bytes: int = wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES
    timelines: dict[int, SegmentRuns] = field(default_factory=dict)
    history: dict[int, WalObject] = field(default_factory=dict)
    partial: list[WalObject] = field(default_factory=list)
    backup_label_count: int = 0
    segment_count: int = 0
    total_size_bytes: int = 0
    newest_last_modified: datetime | None = None

    def __post_init__(self) -> None:
        wal.validate_segment_size(self.wal_segment_size_bytes)
        self._per_xlogid = wal.XLOGID_BYTES // self.wal_segment_size_bytes

    def add_segment(self, timeline: int, log: int, seg: int, size_bytes: int = 0,
                    last_modified: datetime | None = None) -> bool:
        """Record a segment; False when seg does not fit the segment size (wrong size configured)."""
        if seg >= self._per_xlogid:
            return False
        runs = self.timelines.get(timeline)
        if runs is None:
            runs = self.timelines[timeline] = SegmentRuns()
        runs.add(log * self._per_xlogid + seg, last_modified)
        self.segment_count += 1
        self.total_size_bytes += size_bytes
        if last_modified is not None and (self.newest_last_modified is None or last_modified > self.newest_last_modified):
            self.newest_last_modified = last_modified
        return True

    def add_object(self, obj: WalObject) -> None:
        if obj.kind == wal.HISTORY:
            self.history[obj.timeline] = obj
        elif obj.kind == wal.PARTIAL:
            self.partial.append(obj)
        else:
            self.backup_label_count += 1

    def segno(self, segment: str) -> tuple[int, int]:
        return wal.segment_to_segno(segment, self.wal_segment_size_bytes)

    def segment_name(self, timeline: int, segno: int) -> str:
        return wal.segno_to_segment(timeline, segno, self.wal_segment_size_bytes)

    def resized(self, wal_segment_size_bytes: int) -> tuple[WalIndex, int, list[str]]:
        """This index re-read with a larger (or the same) segment size: (index, misfit count, misfit sample).

        A listing parsed at the smallest size (1 MiB: every valid name fits) is re-keyed once the real size is
        known (from the backups' metadata): segment (log, seg) keeps its name, only its number changes. Names
        whose seg part cannot exist with the new size are counted as misfits, as the parser would have.
        """
        wal.validate_segment_size(wal_segment_size_bytes)
        if wal_segment_size_bytes < self.wal_segment_size_bytes:
            raise ValueError(f"cannot re-key WAL parsed with {self.wal_segment_size_bytes}-byte segments to a smaller "
                             f"size {wal_segment_size_bytes}: parse the listing again")
        out = WalIndex(wal_segment_size_bytes=wal_segment_size_bytes, history=dict(self.history),
                       partial=list(self.partial), backup_label_count=self.backup_label_count,
                       total_size_bytes=self.total_size_bytes, newest_last_modified=self.newest_last_modified)
        old_per, new_per = self._per_xlogid, out._per_xlogid
        misfits, sample = 0, []
        for tli, runs in sorted(self.timelines.items()):
            target = SegmentRuns()
            kept = 0
            for first, last, last_modified in runs.runs():
                segno = first
                while segno <= last:
                    log, seg = divmod(segno, old_per)
                    piece_last = min(last, (log + 1) * old_per - 1)
                    seg_last = piece_last - log * old_per
                    top = min(seg_last, new_per - 1)
                    if seg <= top:
                        target.append_run(log * new_per + seg, log * new_per + top,
                                          last_modified if top == seg_last and piece_last == last else None,
                                          top - seg + 1)
                        kept += top - seg + 1
                    bad = seg_last - max(seg, top + 1) + 1
                    if bad > 0:
                        misfits += bad
                        if len(sample) < UNRECOGNISED_SAMPLE_KEYS:
                            sample.append(f"{tli:08X}{log:08X}{max(seg, top + 1):08X}")
                    segno = piece_last + 1
            target.count = max(runs.count - (sum(b - a + 1 for a, b, _ in runs.runs()) - kept), 0)
            if target.count:
                out.timelines[tli] = target
            out.segment_count += target.count
        return out, misfits, sample

    @classmethod
    def from_segments(cls, segments: Iterable[str], *, history_timelines: Iterable[int] = (),
                      wal_segment_size_bytes: int = wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> WalIndex:
        """Build an index from bare segment names (tests, small tools)."""
        index = cls(wal_segment_size_bytes=wal_segment_size_bytes)
        for name in segments:
            timeline, log, seg = wal.parse_segment_name(name)
            if not index.add_segment(timeline, log, seg):
                raise ValueError(f"WAL segment {name} does not exist with wal_segment_size {wal_segment_size_bytes}")
        for timeline in history_timelines:
            index.add_object(WalObject(kind=wal.HISTORY, timeline=timeline, segment=None,
                                       key=wal.history_file_name(timeline), size_bytes=0, last_modified=None))
        return index


@dataclass(kw_only=True)
class ListingResult:
    """What a listing says: the layout, backup skeletons, WAL and which metadata keys to fetch."""

    layout: str | None
    prefix: str
    backups: list[BackupRef] = field(default_factory=list)
    wal_streams: dict[str, WalIndex] = field(default_factory=dict)
    key_count: int = 0
    unrecognised_count: int = 0
    unrecognised_sample: list[str] = field(default_factory=list)
    misfit_segment_sample: list[str] = field(default_factory=list)
    misfit_segment_count: int = 0
    names: set[str] = field(default_factory=set)  # barman servers / pgBackRest stanzas seen
    extra_metadata_keys: list[str] = field(default_factory=list)  # e.g. pgBackRest backup.info
    wal_segment_size_bytes: int = wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES

    @property
    def current_stream(self) -> str:
        """pgBackRest: the archive id with the highest db-id; other layouts have one stream ""."""
        if not self.wal_streams:
            return ""
        return max(self.wal_streams, key=lambda s: int(s.rsplit("-", 1)[1]) if "-" in s else 0)

    @property
    def wal(self) -> WalIndex:
        stream = self.current_stream
        if stream not in self.wal_streams:
            self.wal_streams[stream] = WalIndex(wal_segment_size_bytes=self.wal_segment_size_bytes)
        return self.wal_streams[stream]

    @property
    def backup_metadata_keys(self) -> list[str]:
        keys = [key for backup in self.backups for key in backup.metadata_keys]
        return keys + self.extra_metadata_keys

    @property
    def history_keys(self) -> dict[int, str]:
        return {tli: obj.key for tli, obj in self.wal.history.items()}

    @property
    def keys_to_fetch(self) -> list[str]:
        return self.backup_metadata_keys + sorted(self.history_keys.values())

    def resize_segments(self, wal_segment_size_bytes: int) -> None:
        """Re-key every WAL stream to the real segment size (see WalIndex.resized); misfits become findings."""
        for stream, index in list(self.wal_streams.items()):
            self.wal_streams[stream], misfits, sample = index.resized(wal_segment_size_bytes)
            self.misfit_segment_count += misfits
            self.misfit_segment_sample.extend(sample[:UNRECOGNISED_SAMPLE_KEYS - len(self.misfit_segment_sample)])
        self.wal_segment_size_bytes = wal_segment_size_bytes

    def findings(self) -> list[F.Finding]:
        out: list[F.Finding] = []
        if self.layout is None:
            out.append(F.Finding(
                id=F.UNKNOWN_LAYOUT, severity=F.CRITICAL,
                message=(f"bucket prefix '{self.prefix}' holds {self.key_count} keys in no known layout "
                         f"({', '.join(LAYOUTS)}): the WAL archive cannot be audited"),
                evidence={"prefix": self.prefix, "key_count": self.key_count,
                          "sample_keys": self.unrecognised_sample},
                fix="check the cluster's storage prefix in the inventory; it must point at the directory "
                    "that holds <server>/base and <server>/wals",
            ))
        elif self.unrecognised_count:
            out.append(F.Finding(
                id=F.UNRECOGNISED_KEYS, severity=F.WARNING,
                message=(f"{self.unrecognised_count} keys under '{self.prefix}' do not belong to the {self.layout} "
                         f"layout, e.g. {self.unrecognised_sample[0]!r}"),
                evidence={"count": self.unrecognised_count, "sample_keys": self.unrecognised_sample},
                fix="move foreign objects out of the archive prefix; a second writer in the prefix can "
                    "overwrite or hide WAL",
            ))
        if self.misfit_segment_count:
            out.append(F.Finding(
                id=F.WAL_SEGMENT_SIZE_MISMATCH, severity=F.CRITICAL,
                message=(f"{self.misfit_segment_count} WAL segment names, e.g. {self.misfit_segment_sample[0]}, cannot "
                         f"exist with wal_segment_size {self.wal_segment_size_bytes}: the audit assumes the wrong size"),
                evidence={"count": self.misfit_segment_count, "sample": self.misfit_segment_sample,
                          "wal_segment_size_bytes": self.wal_segment_size_bytes},
                fix="these segments were written by a server with another wal_segment_size (initdb --wal-segsize): "
                    "check that storage.prefix and storage.server_name in the inventory point at this cluster's "
                    "own archive; after pg_resetwal --wal-segsize, take a new base backup",
            ))
        return out


# --- detection ------------------------------------------------------------------------------------


def _strip(key: str, prefix: str) -> str | None:
    if not prefix:
        return key
    return key[len(prefix):] if key.startswith(prefix) else None


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def _key_votes(rel: str) -> str | None:
    if _BARMAN_SEGMENT_RE.match(rel) or _BARMAN_WAL_RE.match(rel) or _BARMAN_BASE_RE.match(rel):
        return BARMAN_CLOUD
    if (_PGBR_WAL_RE.match(rel) or _PGBR_ARCHIVE_INFO_RE.match(rel) or _PGBR_BACKUP_INFO_RE.match(rel)
            or _PGBR_BACKUP_OTHER_RE.match(rel)):
        return PGBACKREST
    if _WALE_SENTINEL_RE.match(rel) or _WALE_BASE_RE.match(rel) or rel.startswith("wal_005/") and rel.endswith(".lzo"):
        return WAL_E
    if _WALG_SENTINEL_RE.match(rel) or _WALG_BASE_RE.match(rel) or _XLOG_WAL_RE.match(rel):
        return WAL_G
    return None


def detect_layout(sample_keys: Iterable[str], *, prefix: str = "") -> str | None:
    """The layout most sample keys (relative to prefix) belong to; None when none fits."""
    prefix = _normalise_prefix(prefix)
    votes: dict[str, int] = {}
    for key in sample_keys:
        rel = _strip(key, prefix)
        layout = _key_votes(rel) if rel is not None else None
        if layout is not None:
            votes[layout] = votes.get(layout, 0) + 1
    if not votes:
        return None
    # WAL-E and WAL-G share directories; any WAL-E-only shape decides for WAL-E.
    if WAL_E in votes and WAL_G in votes:
        votes[WAL_E] += votes.pop(WAL_G)
    return max(votes, key=lambda name: votes[name])


# --- listing parsers ------------------------------------------------------------------------------


def parse_listing(
    objects: Iterable[tuple[str, int, datetime | None]],
    *,
    prefix: str = "",
    layout: str | None = None,
    wal_segment_size_bytes: int = wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES,
    name: str | None = None,
) -> ListingResult:
    """Read a listing of (key, size_bytes, last_modified) once; detect the layout unless given.

    name: barman-cloud server name or pgBackRest stanza to keep when the prefix holds several.
    """
    wal.validate_segment_size(wal_segment_size_bytes)
    prefix = _normalise_prefix(prefix)
    stream: Iterator[tuple[str, int, datetime | None]] = iter(objects)
    if layout is None:
        head = list(itertools.islice(stream, DETECT_SAMPLE_KEYS))
        layout = detect_layout((obj[0] for obj in head), prefix=prefix)
        stream = itertools.chain(head, stream)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    result = ListingResult(layout=layout, prefix=prefix, wal_segment_size_bytes=wal_segment_size_bytes)
    if layout is None:
        for key, _size, _lm in stream:
            result.key_count += 1
            if len(result.unrecognised_sample) < UNRECOGNISED_SAMPLE_KEYS:
                result.unrecognised_sample.append(key)
        result.unrecognised_count = result.key_count
        return result
    parser = {BARMAN_CLOUD: _parse_barman, PGBACKREST: _parse_pgbackrest, WAL_G: _parse_xlog, WAL_E: _parse_xlog}[layout]
    parser(stream, result, name)
    return result


class _Sink:
    """Shared bookkeeping of the per-layout parsers."""

    def __init__(self, result: ListingResult) -> None:
        self.result = result

    def index(self, stream_id: str) -> WalIndex:
        index = self.result.wal_streams.get(stream_id)
        if index is None:
            index = self.result.wal_streams[stream_id] = WalIndex(
                wal_segment_size_bytes=self.result.wal_segment_size_bytes)
        return index

    def segment(self, stream_id: str, tli_hex: str, log_hex: str, seg_hex: str, key: str, size_bytes: int,
                last_modified: datetime | None) -> None:
        timeline = int(tli_hex, 16)
        if timeline == 0:
            self.unrecognised(key)
            return
        if not self.index(stream_id).add_segment(timeline, int(log_hex, 16), int(seg_hex, 16), size_bytes,
                                                 last_modified):
            self.result.misfit_segment_count += 1
            if len(self.result.misfit_segment_sample) < UNRECOGNISED_SAMPLE_KEYS:
                self.result.misfit_segment_sample.append(key)

    def wal_file(self, stream_id: str, base_name: str, key: str, size_bytes: int,
                 last_modified: datetime | None) -> bool:
        parsed = wal.classify_wal_name(base_name)
        if parsed is None:
            return False
        if parsed.kind == wal.SEGMENT:
            segment = parsed.segment
            self.segment(stream_id, segment[:8], segment[8:16], segment[16:], key, size_bytes, last_modified)
        else:
            self.index(stream_id).add_object(WalObject(kind=parsed.kind, timeline=parsed.timeline,
                                                       segment=parsed.segment, key=key, size_bytes=size_bytes,
                                                       last_modified=last_modified))
        return True

    def unrecognised(self, key: str) -> None:
        self.result.unrecognised_count += 1
        if len(self.result.unrecognised_sample) < UNRECOGNISED_SAMPLE_KEYS:
            self.result.unrecognised_sample.append(key)


_Listing = Iterable[tuple[str, int, datetime | None]]


def _walk_listing(stream: _Listing, result: ListingResult, name: str | None, *, segment_re: re.Pattern[str],
                  wal_re: re.Pattern[str], other: Callable[[str, str], bool]) -> None:
    """The loop every layout shares: count each key, file WAL segments and other WAL files (named groups
    of segment_re and wal_re), and hand the rest to other(key, rel), which says whether it knew the key.

    A key owned by another barman server or pgBackRest stanza than name is counted and skipped.
    """
    sink = _Sink(result)
    prefix = result.prefix
    segment_match, wal_match = segment_re.match, wal_re.match
    owned = "owner" in segment_re.groupindex
    streamed = "stream" in segment_re.groupindex
    for key, size_bytes, last_modified in stream:
        result.key_count += 1
        if not key.startswith(prefix):
            sink.unrecognised(key)
            continue
        rel = key[len(prefix):]
        match = segment_match(rel)
        if match is not None:
            owner = match["owner"] if owned else None
            if not owned or name is None or owner == name:
                if owner:
                    result.names.add(owner)
                sink.segment(match["stream"] if streamed else "", match["tli"], match["log"], match["seg"], key,
                             size_bytes, last_modified)
            continue
        match = wal_match(rel)
        if match is not None:
            if not owned or name is None or match["owner"] == name:
                if not sink.wal_file(match["stream"] if streamed else "", match["base"], key, size_bytes,
                                     last_modified):
                    sink.unrecognised(key)
            continue
        if not other(key, rel):
            sink.unrecognised(key)


def _parse_barman(stream: _Listing, result: ListingResult, name: str | None) -> None:
    backups: dict[str, list[str]] = {}

    def base_backup(key: str, rel: str) -> bool:
        match = _BARMAN_BASE_RE.match(rel)
        if match is None:
            return False
        server, backup_id, rest = match.groups()
        if name is None or server == name:
            if server:
                result.names.add(server)
            keys = backups.setdefault(backup_id, [])
            if rest == "backup.info":
                keys.append(key)
        return True

    _walk_listing(stream, result, name, segment_re=_BARMAN_SEGMENT_RE, wal_re=_BARMAN_WAL_RE, other=base_backup)
    # a backup directory without backup.info is an upload that never finished
    result.backups = [BackupRef(backup_id=backup_id, metadata_keys=tuple(keys),
                                status=UNKNOWN_STATUS if keys else "INCOMPLETE")
                      for backup_id, keys in sorted(backups.items())]


def _parse_pgbackrest(stream: _Listing, result: ListingResult, name: str | None) -> None:
    def backup_or_info(key: str, rel: str) -> bool:
        match = _PGBR_BACKUP_INFO_RE.match(rel)
        if match is not None:
            if name is None or match.group(1) == name:
                result.names.add(match.group(1))
                result.extra_metadata_keys.append(key)
            return True
        return bool(_PGBR_ARCHIVE_INFO_RE.match(rel) or _PGBR_BACKUP_OTHER_RE.match(rel))

    _walk_listing(stream, result, name, segment_re=_PGBR_SEGMENT_RE, wal_re=_PGBR_WAL_RE, other=backup_or_info)


def _parse_xlog(stream: _Listing, result: ListingResult, name: str | None) -> None:
    """WAL-G and WAL-E: wal_005/ and basebackups_005/ (no server level)."""
    backups: dict[str, str] = {}

    def base_backup(key: str, rel: str) -> bool:
        match = _WALE_SENTINEL_RE.match(rel) or _WALG_SENTINEL_RE.match(rel)
        if match is not None:
            backups[match.group(1)] = key
            return True
        return bool(_BASEBACKUPS_RE.match(rel))

    _walk_listing(stream, result, name, segment_re=_WALG_SEGMENT_RE, wal_re=_XLOG_WAL_RE, other=base_backup)
    result.backups = [BackupRef(backup_id=backup_id, metadata_keys=(key,)) for backup_id, key in sorted(backups.items())]


# --- metadata parsers -----------------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    if value in (None, "", "None"):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    text = str(value).strip().replace("Z", "+00:00")
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_int(value: Any) -> int | None:
    if value in (None, "", "None"):
        return None
    return int(value)


def _parse_lsn_value(value: Any) -> int | None:
    if value in (None, "", "None"):
        return None
    if isinstance(value, int):
        return value
    return wal.parse_lsn(str(value))


def parse_barman_backup_info(content: bytes | str) -> dict[str, str]:
    """barman's backup.info: key=value lines."""
    text = content.decode("utf-8", errors="replace") if isinstance(content, bytes) else content
    info: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            info[key.strip()] = value.strip()
    return info


def barman_backup_ref(info: Mapping[str, str], *, backup_id: str, metadata_keys: tuple[str, ...] = ()) -> BackupRef:
    """A BackupRef from a parsed barman backup.info."""
    begin_segment = info.get("begin_wal") or None
    timeline = _parse_int(info.get("timeline"))
    if timeline is None and begin_segment:
        timeline = wal.parse_segment_name(begin_segment)[0]
    return BackupRef(
        backup_id=info.get("backup_id") or backup_id,
        status=info.get("status") or UNKNOWN_STATUS,
        timeline=timeline,
        begin_segment=begin_segment,
        begin_lsn=_parse_lsn_value(info.get("begin_xlog")),
        end_segment=info.get("end_wal") or None,
        end_lsn=_parse_lsn_value(info.get("end_xlog")),
        begin_time=_parse_time(info.get("begin_time")),
        end_time=_parse_time(info.get("end_time")),
        size_bytes=_parse_int(info.get("size")),
        wal_segment_size_bytes=_parse_int(info.get("xlog_segment_size")),
        metadata_keys=metadata_keys,
    )


def parse_pgbackrest_backup_info(content: bytes | str, *, key: str = "backup.info") -> list[BackupRef]:
    """pgBackRest's backup.info (INI, JSON values): one BackupRef per [backup:current] label."""
    text = content.decode("utf-8", errors="replace") if isinstance(content, bytes) else content
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # labels are case-sensitive
    parser.read_string(text, source=key)
    db_versions: dict[str, str] = {}
    if parser.has_section("db:history"):
        for db_id, raw in parser.items("db:history"):
            db_versions[db_id] = str(json.loads(raw).get("db-version", ""))
    if parser.has_section("db") and parser.has_option("db", "db-id"):
        db_versions.setdefault(str(json.loads(parser.get("db", "db-id"))),
                               str(json.loads(parser.get("db", "db-version", fallback='""'))))
    refs: list[BackupRef] = []
    if not parser.has_section("backup:current"):
        return refs
    for label, raw in parser.items("backup:current"):
        entry = json.loads(raw)
        begin_segment = entry.get("backup-archive-start")
        db_id = str(entry.get("db-id", ""))
        refs.append(BackupRef(
            backup_id=label,
            # pgBackRest lists only backups that finished in [backup:current]
            status=DONE if begin_segment and entry.get("backup-archive-stop") else "INCOMPLETE",
            timeline=wal.parse_segment_name(begin_segment)[0] if begin_segment else None,
            begin_segment=begin_segment,
            begin_lsn=_parse_lsn_value(entry.get("backup-lsn-start")),
            end_segment=entry.get("backup-archive-stop"),
            end_lsn=_parse_lsn_value(entry.get("backup-lsn-stop")),
            begin_time=_parse_time(entry.get("backup-timestamp-start")),
            end_time=_parse_time(entry.get("backup-timestamp-stop")),
            size_bytes=_parse_int(entry.get("backup-info-size")),
            stream=f"{db_versions[db_id]}-{db_id}" if db_id in db_versions else "",
            metadata_keys=(key,),
        ))
    return refs


def parse_xlog_sentinel(content: bytes | str, *, backup_id: str, key: str = "") -> BackupRef:
    """A WAL-G or WAL-E *_backup_stop_sentinel.json; the begin segment comes from the backup name."""
    data = json.loads(content)
    begin_segment = backup_id.split("_")[1]
    timeline = wal.parse_segment_name(begin_segment)[0]
    end_segment = data.get("wal_segment_backup_stop")  # WAL-E
    end_lsn = _parse_lsn_value(data.get("FinishLSN"))
    if end_segment is None and end_lsn is not None:
        end_segment = wal.lsn_to_segment(end_lsn, timeline)
    return BackupRef(
        backup_id=backup_id,
        status=DONE,  # the sentinel is written last, only on success
        timeline=timeline,
        begin_segment=begin_segment,
        begin_lsn=_parse_lsn_value(data.get("LSN")),
        end_segment=end_segment,
        end_lsn=end_lsn,
        begin_time=_parse_time(data.get("StartTime")),
        end_time=_parse_time(data.get("FinishTime")),
        size_bytes=_parse_int(data.get("CompressedSize", data.get("expanded_size_bytes"))),
        metadata_keys=(key,) if key else (),
    )


def resolve_backups(result: ListingResult, fetched: Mapping[str, bytes]) -> tuple[list[BackupRef], list[F.Finding]]:
    """Fill the listing's backup skeletons from fetched metadata; unreadable metadata is a finding."""
    backups: list[BackupRef] = []
    problems: list[F.Finding] = []

    def unreadable(key: str, backup_id: str, error: str) -> None:
        problems.append(F.Finding(
            id=F.BACKUP_METADATA_UNREADABLE, severity=F.WARNING,
            message=f"backup metadata {key} of backup {backup_id} cannot be read: {error}",
            evidence={"key": key, "backup_id": backup_id, "error": error},
            fix="check the object exists and is readable with the audit's credentials; the backup is "
                "left out of the continuity check until it is",
        ))

    if result.layout == PGBACKREST:
        for key in result.extra_metadata_keys:
            if key not in fetched:
                unreadable(key, "*", "not fetched")
                continue
            try:
                backups.extend(parse_pgbackrest_backup_info(fetched[key], key=key))
            except (ValueError, configparser.Error) as exc:
                unreadable(key, "*", str(exc))
        return backups, problems
    for skeleton in result.backups:
        if not skeleton.metadata_keys:
            backups.append(skeleton)
            continue
        key = skeleton.metadata_keys[0]
        if key not in fetched:
            unreadable(key, skeleton.backup_id, "not fetched")
            continue
        try:
            if result.layout == BARMAN_CLOUD:
                backups.append(barman_backup_ref(parse_barman_backup_info(fetched[key]),
                                                 backup_id=skeleton.backup_id, metadata_keys=skeleton.metadata_keys))
            else:
                backups.append(parse_xlog_sentinel(fetched[key], backup_id=skeleton.backup_id, key=key))
        except (ValueError, TypeError, AttributeError) as exc:
            unreadable(key, skeleton.backup_id, str(exc))
    return backups, problems


@dataclass(frozen=True, kw_only=True)
class BackupKeys:
    """Where one backup's objects are, relative to the cluster root (None: not known for this layout)."""

    base: str | None  # prefix of its data files
    metadata: str | None  # its (first) metadata key
    begin_wal: str | None  # key (prefix, without compression suffix) of its begin WAL segment


def backup_keys(backup: BackupRef, *, layout: str | None, root: str) -> BackupKeys:
    """The keys of a backup's base files, metadata and begin WAL under the cluster root, per layout."""
    root = _normalise_prefix(root)
    first = backup.metadata_keys[0] if backup.metadata_keys else None
    meta = first[len(root):] if first and first.startswith(root) else None
    seg = backup.begin_segment
    base = wal_key = None
    if layout == BARMAN_CLOUD and meta and meta.endswith("/backup.info"):
        parts = meta.split("/")  # [<server>/]base/<id>/backup.info
        server = "/".join(parts[:-3]) + "/" if len(parts) > 3 else ""
        base = "/".join(parts[:-1]) + "/"
        wal_key = f"{server}wals/{seg[:16]}/{seg}" if seg else None
    elif layout == PGBACKREST and meta and meta.startswith("backup/"):
        stanza = meta.split("/")[1]
        base = f"backup/{stanza}/{backup.backup_id}/"
        wal_key = (f"archive/{stanza}/{backup.stream}/{seg[:16]}/{seg}" if seg and backup.stream
                   else f"archive/{stanza}/")
    elif layout in (WAL_G, WAL_E):
        base = f"basebackups_005/{backup.backup_id}/"
        wal_key = f"wal_005/{seg}" if seg else None
    return BackupKeys(base=base, metadata=meta, begin_wal=wal_key)


_SEGMENT_SIZES = tuple(1 << n for n in range(20, 31))  # what PostgreSQL accepts: 1 MiB .. 1 GiB


def segment_sizes_fitting(segment: str, lsn: int) -> set[int]:
    """The segment sizes with which the WAL file segment contains LSN lsn (its name and the LSN agree)."""
    _, log, seg = wal.parse_segment_name(segment)
    if lsn >> 32 != log:
        return set()
    return {size for size in _SEGMENT_SIZES if (lsn & 0xFFFFFFFF) // size == seg}


@dataclass(frozen=True, kw_only=True)
class SegmentSizeEvidence:
    """A WAL segment size read from the backups' own metadata, and where it was read."""

    wal_segment_size_bytes: int
    backup_id: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"wal_segment_size_bytes": self.wal_segment_size_bytes, "backup_id": self.backup_id,
                "detail": self.detail}


def wal_segment_size_from_backups(backups: Iterable[BackupRef]) -> SegmentSizeEvidence | None:
    """The segment size the finished backups record: barman's backup.info says it (xlog_segment_size); for
    pgBackRest (backup.info) and WAL-G/WAL-E (sentinels) it follows from the begin WAL file name and the begin
    LSN each backup records, when only one size makes them agree. Newest backup first; None when unknown."""
    done = [b for b in backups if b.done]
    done.sort(key=lambda b: (b.end_time or b.begin_time or datetime.min.replace(tzinfo=UTC), b.backup_id),
              reverse=True)
    for b in done:
        if b.wal_segment_size_bytes:
            try:
                size = wal.validate_segment_size(b.wal_segment_size_bytes)
            except ValueError:
                continue
            return SegmentSizeEvidence(wal_segment_size_bytes=size, backup_id=b.backup_id,
                                       detail=f"backup {b.backup_id} records xlog_segment_size={size}")
    fitting: set[int] | None = None
    for b in done:
        if not b.begin_segment or b.begin_lsn is None:
            continue
        try:
            sizes = segment_sizes_fitting(b.begin_segment, b.begin_lsn)
        except ValueError:
            continue
        if not sizes:
            continue  # a name and LSN that agree with no size: no evidence either way
        fitting = sizes if fitting is None else fitting & sizes
        if fitting is not None and len(fitting) == 1:
            size = next(iter(fitting))
            return SegmentSizeEvidence(wal_segment_size_bytes=size, backup_id=b.backup_id,
                                       detail=f"begin WAL {b.begin_segment} holds begin LSN "
                                              f"{wal.format_lsn(b.begin_lsn)} only with {size}-byte segments")
    return None


def resolve_histories(result: ListingResult, fetched: Mapping[str, bytes]) -> dict[int, list[wal.HistoryEntry]]:
    """Parsed .history files by timeline, for the ones fetched (decompressed) and readable."""
    histories: dict[int, list[wal.HistoryEntry]] = {}
    for timeline, key in result.history_keys.items():
        if key in fetched:
            try:
                histories[timeline] = wal.parse_history(fetched[key], source=key)
            except ValueError:
                continue  # treated like an unreadable file: continuity infers the switch point
    return histories
