"""WAL arithmetic: segment names, LSNs, segment sizes, timeline histories and WAL file names.

A segment name is 24 hex digits: timeline (8), "log" (8) and "seg" (8). The log/seg pair is the
segment number split at 4 GiB of WAL (one "xlogid"), so how far seg goes before log moves on
depends on wal_segment_size: 00..FF with 16 MiB segments, 0..3 with 1 GiB.
Internally a position in the WAL stream is a plain integer segment number (segno), which is what
the hot paths compare.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

MIB = 1024 * 1024
DEFAULT_WAL_SEGMENT_SIZE_BYTES = 16 * MIB
MIN_WAL_SEGMENT_SIZE_BYTES = 1 * MIB
MAX_WAL_SEGMENT_SIZE_BYTES = 1024 * MIB
XLOGID_BYTES = 0x100000000
MAX_TIMELINE = 0xFFFFFFFF

SEGMENT = "segment"
PARTIAL = "partial"
BACKUP_LABEL = "backup"
HISTORY = "history"

COMPRESSION_SUFFIXES = ("gz", "bz2", "lz4", "zst", "snappy", "xz", "lzo", "br", "lzma")

_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_WAL_FILE_RE = re.compile(
    r"^(?P<tli>[0-9A-F]{8})"
    r"(?:(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})(?:\.(?P<offset>[0-9A-F]{8})\.(?P<backup>backup)|\.(?P<partial>partial))?"
    r"|\.(?P<history>history))"
    r"(?:-(?P<checksum>[0-9a-f]{40}))?"
    r"(?:\.(?P<compression>" + "|".join(COMPRESSION_SUFFIXES) + r"))?$"
)


def validate_segment_size(wal_segment_size_bytes: int) -> int:
    """Return the size if PostgreSQL accepts it (a power of two, 1 MiB to 1 GiB), else ValueError."""
    size = wal_segment_size_bytes
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or size < MIN_WAL_SEGMENT_SIZE_BYTES
        or size > MAX_WAL_SEGMENT_SIZE_BYTES
        or size & (size - 1)
    ):
        raise ValueError(
            f"wal_segment_size {size!r} is not valid: PostgreSQL accepts a power of two between "
            f"{MIN_WAL_SEGMENT_SIZE_BYTES} (1 MiB) and {MAX_WAL_SEGMENT_SIZE_BYTES} (1 GiB) bytes; "
            f"use the value of SHOW wal_segment_size (default 16 MiB = {DEFAULT_WAL_SEGMENT_SIZE_BYTES})"
        )
    return size


def segments_per_xlogid(wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    return XLOGID_BYTES // validate_segment_size(wal_segment_size_bytes)


# --- LSNs -----------------------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer byte position in the WAL stream."""
    match = _LSN_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"LSN {text!r} is not of the form X/Y (two hex numbers of up to 8 digits, e.g. 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    if lsn < 0 or lsn > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"LSN {lsn!r} is outside 0 .. 2^64-1")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# --- segment names and numbers --------------------------------------------------------------------


def parse_segment_name(name: str) -> tuple[int, int, int]:
    """'000000010000000A000000FF' -> (timeline, log, seg)."""
    match = _SEGMENT_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"WAL segment name {name!r} is not 24 upper-case hex digits (timeline, log, seg)")
    timeline = int(match.group(1), 16)
    if timeline == 0:
        raise ValueError(f"WAL segment name {name!r} has timeline 0; timelines start at 1")
    return timeline, int(match.group(2), 16), int(match.group(3), 16)


def format_segment_name(timeline: int, log: int, seg: int) -> str:
    if not 1 <= timeline <= MAX_TIMELINE or not 0 <= log <= 0xFFFFFFFF or not 0 <= seg <= 0xFFFFFFFF:
        raise ValueError(f"WAL segment parts timeline={timeline!r} log={log!r} seg={seg!r} are out of range")
    return f"{timeline:08X}{log:08X}{seg:08X}"


def segno_of(log: int, seg: int, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    """(log, seg) -> segment number; the seg part must fit the segment size."""
    per_xlogid = segments_per_xlogid(wal_segment_size_bytes)
    if seg >= per_xlogid:
        raise ValueError(
            f"WAL segment seg part {seg:08X} does not exist with wal_segment_size {wal_segment_size_bytes}: "
            f"it goes 0..{per_xlogid - 1:X}; check the cluster's wal_segment_size"
        )
    return log * per_xlogid + seg


def segment_to_segno(name: str, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> tuple[int, int]:
    """'000000020000000100000003' -> (timeline, segment number)."""
    timeline, log, seg = parse_segment_name(name)
    return timeline, segno_of(log, seg, wal_segment_size_bytes)


def segno_to_segment(timeline: int, segno: int, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> str:
    per_xlogid = segments_per_xlogid(wal_segment_size_bytes)
    return format_segment_name(timeline, segno // per_xlogid, segno % per_xlogid)


def lsn_to_segno(lsn: int, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    return lsn // validate_segment_size(wal_segment_size_bytes)


def lsn_to_segment(lsn: int | str, timeline: int, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> str:
    """The segment (on the given timeline) that contains the LSN, like pg_walfile_name()."""
    position = parse_lsn(lsn) if isinstance(lsn, str) else lsn
    return segno_to_segment(timeline, lsn_to_segno(position, wal_segment_size_bytes), wal_segment_size_bytes)


def segno_start_lsn(segno: int, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    return segno * validate_segment_size(wal_segment_size_bytes)


def segment_start_lsn(name: str, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    return segno_start_lsn(segment_to_segno(name, wal_segment_size_bytes)[1], wal_segment_size_bytes)


def segment_end_lsn(name: str, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int:
    """First LSN after the segment: where replay stands once the whole segment is applied."""
    return segment_start_lsn(name, wal_segment_size_bytes) + wal_segment_size_bytes


def next_segment(name: str, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> str:
    timeline, segno = segment_to_segno(name, wal_segment_size_bytes)
    return segno_to_segment(timeline, segno + 1, wal_segment_size_bytes)


def segment_range(
    first: str, last: str, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES
) -> Iterator[str]:
    """Segment names from first to last inclusive, on first's timeline, across log boundaries."""
    timeline, first_segno = segment_to_segno(first, wal_segment_size_bytes)
    _, last_segno = segment_to_segno(last, wal_segment_size_bytes)
    for segno in range(first_segno, last_segno + 1):
        yield segno_to_segment(timeline, segno, wal_segment_size_bytes)


# --- timeline history -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HistoryEntry:
    """One line of a .history file: the parent timeline ended (switched away) at switch_lsn."""

    parent_timeline: int
    switch_lsn: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class TimelineSpan:
    """A stretch of WAL to replay on one timeline: [start_lsn, end_lsn), end_lsn None = open."""

    timeline: int
    start_lsn: int
    end_lsn: int | None


def history_file_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_history(content: bytes | str, *, source: str = ".history file") -> list[HistoryEntry]:
    """Parse a timeline history file: 'parent_tli<TAB>switch LSN<TAB>reason' lines, '#' comments."""
    text = content.decode("utf-8", errors="replace") if isinstance(content, bytes) else content
    entries: list[HistoryEntry] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        try:
            parent = int(parts[0])
            switch_lsn = parse_lsn(parts[1])
        except (IndexError, ValueError) as exc:
            raise ValueError(
                f"{source} line {line_no} {raw!r} is not 'timeline<TAB>switch LSN<TAB>reason': {exc}"
            ) from None
        if entries and (parent <= entries[-1].parent_timeline or switch_lsn < entries[-1].switch_lsn):
            raise ValueError(f"{source} line {line_no} {raw!r}: timelines and switch LSNs must increase")
        entries.append(HistoryEntry(parent_timeline=parent, switch_lsn=switch_lsn,
                                    reason=parts[2] if len(parts) > 2 else ""))
    return entries


def timeline_chain(target_timeline: int, history: list[HistoryEntry]) -> list[TimelineSpan]:
    """The timelines recovery to target_timeline replays, oldest first, from target's .history.

    With '1 0/3000000' and '2 0/5000000' in 00000003.history: tli 1 from 0 to 0/3000000, tli 2 to
    0/5000000, tli 3 from there on. An empty history (timeline 1) gives one open span.
    """
    spans: list[TimelineSpan] = []
    start_lsn = 0
    for entry in history:
        if entry.parent_timeline >= target_timeline:
            raise ValueError(
                f"history of timeline {target_timeline} names parent timeline {entry.parent_timeline}, "
                f"which is not older; the .history file belongs to another timeline"
            )
        spans.append(TimelineSpan(timeline=entry.parent_timeline, start_lsn=start_lsn, end_lsn=entry.switch_lsn))
        start_lsn = entry.switch_lsn
    spans.append(TimelineSpan(timeline=target_timeline, start_lsn=start_lsn, end_lsn=None))
    return spans


# --- WAL file names -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WalFileName:
    """A classified WAL archive file name (base name, no directories)."""

    kind: str  # SEGMENT, PARTIAL, BACKUP_LABEL or HISTORY
    timeline: int
    log: int | None = None
    seg: int | None = None
    backup_offset: int | None = None
    compression: str | None = None
    checksum: str | None = None

    @property
    def segment(self) -> str | None:
        if self.log is None or self.seg is None:
            return None
        return f"{self.timeline:08X}{self.log:08X}{self.seg:08X}"

    def segno(self, wal_segment_size_bytes: int = DEFAULT_WAL_SEGMENT_SIZE_BYTES) -> int | None:
        if self.log is None or self.seg is None:
            return None
        return segno_of(self.log, self.seg, wal_segment_size_bytes)


def classify_wal_name(name: str) -> WalFileName | None:
    """Classify a WAL archive base name; None when it is not a WAL file.

    Handles plain segments, .partial, .backup labels (000000010000000000000002.00000028.backup),
    .history (00000002.history), a compression suffix and pgBackRest's '-<sha1>' suffix.
    """
    match = _WAL_FILE_RE.match(name)
    if match is None:
        return None
    timeline = int(match.group("tli"), 16)
    if timeline == 0:
        return None
    compression = match.group("compression")
    checksum = match.group("checksum")
    if match.group("history"):
        return WalFileName(kind=HISTORY, timeline=timeline, compression=compression, checksum=checksum)
    if match.group("backup"):
        kind = BACKUP_LABEL
    elif match.group("partial"):
        kind = PARTIAL
    else:
        kind = SEGMENT
    offset = match.group("offset")
    return WalFileName(
        kind=kind,
        timeline=timeline,
        log=int(match.group("log"), 16),
        seg=int(match.group("seg"), 16),
        backup_offset=int(offset, 16) if offset else None,
        compression=compression,
        checksum=checksum,
    )
