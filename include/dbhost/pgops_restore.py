#!/usr/bin/env python3
"""pgops-restore: restore a barman-cloud base backup, its tar parts downloaded and extracted in parallel.

    <dbhost-venv>/bin/pgops-restore --jobs 2 --cloud-provider aws-s3 [--endpoint-url URL] \\
        s3://BUCKET/PREFIX SERVER_NAME BACKUP_ID RECOVERY_DIR [--tablespace NAME:LOCATION ...]

The arguments are barman-cloud-restore's (barman's own parser) plus --jobs. barman-cloud-backup writes a
backup as tar parts per directory (data.tar.lz4, data_0001.tar.lz4, ...; <oid>.tar... for a tablespace),
closing a part once it passes --max-archive-size, always between two files, so every part is a tar of its
own. barman-cloud-restore reads them one after another as one stream; here --jobs threads download and extract
whole parts at once, the biggest first.

barman stays the source of truth: its CloudBackupCatalog reads backup.info (status, tablespaces, backup_label,
WAL directory) and finds the parts (get_backup_files); destinations, tablespace links and pg_wal are made as
barman-cloud-restore makes them, and members are extracted by Python's tarfile as barman's extract_tar does
(modes, owners when run as root, mtimes), so the data directory is the same, file for file. One thing differs
and nothing reads it: directory mtimes are the archive's (barman's change as later parts and links land in
them). A path in two parts ends as barman's sequential order leaves it: the later part's.

Safety:
- the destination and every tablespace directory must be missing or empty; nothing is written otherwise;
- a member with an absolute path, a '..' component, a link leading outside its directory tree, or a device or
  FIFO is refused, and the whole restore fails naming it; symlinks are made after every part is extracted and
  only where no symlink is on the way, so no write goes through one;
- every part is checked whole: its size in the bucket listing against the bytes downloaded, the compression's
  own end and checksums (gzip CRC, bzip2 and snappy block checksums, the lz4 frame end and the lz4 block
  checksums pgops-backup writes: barman's own lz4 frames have none), tar header checksums, the end-of-archive
  marker and nothing but zeros after it; the parts of a directory are numbered without a
  gap; backup_label must equal backup.info's, which catches a lost last part of the data directory (barman
  writes pg_control and backup_label last);
- until all of that passed, the data directory holds pgops_restore.incomplete (with the reason, on failure)
  and global/pg_control stays under another name, so PostgreSQL cannot start it: the caller removes it.
The last stdout line of a restore is "pgops-restore summary: {json}" (parts, bytes, seconds).
"""

from __future__ import annotations

import argparse
import bz2
import copy
import json
import os
import posixpath
import re
import signal
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, BinaryIO

PROG = "pgops-restore"
SUMMARY = "pgops-restore summary: "
INCOMPLETE = "pgops_restore.incomplete"
PG_CONTROL = "global/pg_control"
PG_CONTROL_PENDING = "global/pg_control.pgops-restore-pending"
# Buffer sizes, measured on the lab's 3 GiB restore: with 1 MiB reads and 4 MiB of decompressed output at a time
# the restore spent 6-11 s in the kernel (every big buffer is a fresh mmap, faulted in page by page: 300,000
# minor faults), with these 2-3 s (25,000), for the same user time; tarfile's default 16 KiB copies cost a
# Python loop per 16 KiB.
READ_CHUNK = 256 << 10   # compressed bytes asked of the object at a time
OUT_CHUNK = 256 << 10    # most decompressed bytes held at a time
COPY_BUFSIZE = 64 << 10  # tarfile's reads and file writes
# barman's part names (CloudUploadController._build_dest_name): <name>[_NNNN].tar[.gz|.bz2|.snappy|.lz4]
PART_RE = re.compile(r"^(?P<label>.+?)(?:_(?P<number>[0-9]{4,}))?\.tar(?P<ext>\.gz|\.bz2|\.snappy|\.lz4)?$")
COMPRESSION_OF_EXT = {None: None, ".gz": "gzip", ".bz2": "bzip2", ".snappy": "snappy", ".lz4": "lz4"}

class RestoreError(Exception):
    """The restore cannot go on; the message names what, where, and what to do."""


class Stopped(RestoreError):
    """Another part failed (or the restore was stopped): this one stops at its next read."""


def say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- the plan: parts, destinations, links (from barman's catalog; no I/O) -----------------------------------
@dataclass(frozen=True)
class Part:
    key: str                 # the object's key in the bucket
    label: str               # "data", or the tablespace oid
    number: int              # 0 for <label>.tar..., N for <label>_000N.tar...
    compression: str | None  # barman's name: gzip, bzip2, snappy, lz4, or None
    root: str                # the directory it is extracted into
    size: int | None         # bytes in the bucket listing, when known

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)


@dataclass(frozen=True)
class Plan:
    backup_id: str
    destination: str
    parts: list[Part]
    roots: list[str]                    # the destination first, then each tablespace directory
    links: list[tuple[str, str]]        # (PGDATA/pg_tblspc/<oid>, tablespace directory), as barman makes them
    wal_directory: str                  # pg_wal (or pg_xlog), made when no part has it
    backup_label: str | None            # backup.info's: the restored backup_label must equal it


def parse_part_name(name: str) -> tuple[str, int, str | None] | None:
    """(label, part number, compression) of a barman part object name, None when it is not one."""
    m = PART_RE.match(name)
    if not m:
        return None
    return m["label"], int(m["number"] or 0), COMPRESSION_OF_EXT[m["ext"]]


def part_name(label: str, number: int, compression: str | None) -> str:
    ext = {v: k for k, v in COMPRESSION_OF_EXT.items()}.get(compression) or ""
    return f"{label}{f'_{number:04d}' if number else ''}.tar{ext}"


def make_plan(*, backup_info: Any, backup_files: dict[Any, Any], destination: str,
              relocations: dict[str, str] | None = None, sizes: dict[str, int] | None = None) -> Plan:
    """The parts to extract and where, from barman's catalog: ``backup_info`` (barman.infofile.BackupInfo) and
    ``backup_files`` (CloudBackupCatalog.get_backup_files: oid -> BackupFileInfo, None for PGDATA)."""
    relocations, sizes = relocations or {}, sizes or {}
    backup_id = backup_info.backup_id
    if getattr(backup_info, "snapshots_info", None):
        raise RestoreError(f"backup {backup_id} is a snapshot backup: it has no tar parts to restore. "
                           "Fix: use barman-cloud-restore with --snapshot-recovery-instance")
    status = getattr(backup_info, "status", "DONE")
    if status != "DONE":
        raise RestoreError(f"backup {backup_id} has status {status}, not DONE: its parts may be incomplete. "
                           "Fix: restore a DONE backup")
    destination = os.path.abspath(destination)
    tablespaces = {t.oid: t for t in (backup_info.tablespaces or [])}
    parts: list[Part] = []
    roots = [destination]
    links: list[tuple[str, str]] = []
    for oid, info in backup_files.items():
        label = "data" if oid is None else str(oid)
        if oid is None:
            root = destination
        else:
            tbs = tablespaces.get(oid)
            if tbs is None:
                raise RestoreError(f"backup {backup_id} has parts of tablespace oid {oid}, which backup.info does "
                                   "not list: the catalog is inconsistent")
            root = os.path.realpath(relocations[tbs.name]) if tbs.name in relocations else tbs.location
            links.append((os.path.join(destination, "pg_tblspc", str(oid)), root))
            roots.append(root)
        parts += _numbered_parts(backup_id, label, [info, *info.additional_files], root, sizes)
    seen: set[str] = set()
    for root in roots:
        real = os.path.realpath(root)
        if real in seen:
            raise RestoreError(f"two parts of backup {backup_id} would be extracted into the same directory {root}. "
                               "Fix: give each tablespace its own location (--tablespace NAME:LOCATION)")
        seen.add(real)
    wal_directory = backup_info.wal_directory() if hasattr(backup_info, "wal_directory") else "pg_wal"
    return Plan(backup_id=backup_id, destination=destination, parts=parts, roots=roots, links=links,
                wal_directory=wal_directory, backup_label=getattr(backup_info, "backup_label", None))


def _numbered_parts(backup_id: str, label: str, infos: list[Any], root: str, sizes: dict[str, int]) -> list[Part]:
    found: dict[int, Part] = {}
    compressions = set()
    for info in infos:
        if not info.path:
            continue  # the first part itself is missing: named below
        parsed = parse_part_name(posixpath.basename(info.path))
        if parsed is None or parsed[0] != label:
            raise RestoreError(f"object {info.path} of backup {backup_id} is not named like a part of {label}")
        _, number, compression = parsed
        compressions.add(compression)
        found[number] = Part(key=info.path, label=label, number=number, compression=compression, root=root,
                             size=sizes.get(info.path))
    if len(compressions) > 1:
        raise RestoreError(f"the parts of {label} in backup {backup_id} mix compressions "
                           f"({', '.join(sorted(str(c) for c in compressions))}): they are not one backup's")
    compression = next(iter(compressions), None)
    last = max(found) if found else 0
    missing = [part_name(label, n, compression) for n in range(last + 1) if n not in found]
    if missing:
        listed = ", ".join(p.name for _, p in sorted(found.items())) or "none"
        raise RestoreError(f"part(s) {', '.join(missing)} of backup {backup_id} are missing from the bucket "
                           f"(listed: {listed}). The backup cannot be restored: restore another backup and take "
                           "a new one")
    return [found[n] for n in sorted(found)]


def parse_relocations(rules: list[str]) -> dict[str, str]:
    """--tablespace NAME:LOCATION rules, as barman-cloud-restore reads them."""
    out = {}
    for rule in rules or []:
        name, sep, location = rule.partition(":")
        if not sep or not name or not location:
            raise RestoreError(f"invalid tablespace relocation rule {rule!r}. Fix: use NAME:LOCATION")
        out[name] = location
    return out


# -- one part: a checked stream -----------------------------------------------------------------------------
class _Gzip:
    """gzip as tarfile writes it (one member); zlib checks the trailer's CRC and length at the end."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._full = False

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail and not self._full

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._d.decompress(self._d.unconsumed_tail + data, max_length)
        self._full = len(out) >= max_length
        return out


class _Snappy:
    """barman's snappy stream decompressor (python-snappy's framing format, checksummed per chunk)."""

    def __init__(self) -> None:
        from barman.clients.cloud_compression import get_compressor

        self._c = get_compressor("snappy")
        self.eof = False
        self.needs_input = True
        self.unused_data = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._c.decompress(data)

    def finish(self) -> None:
        self._c.decompressor.flush()  # raises when the stream stops inside a chunk
        self.eof = True


def _decoder(compression: str | None):
    if compression is None:
        return None
    if compression == "gzip":
        return _Gzip()
    if compression == "bzip2":
        return bz2.BZ2Decompressor()
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.LZ4FrameDecompressor()
    if compression == "snappy":
        return _Snappy()
    raise RestoreError(f"unknown compression {compression!r}")


class PartStream:
    """The tar bytes of one part: the object read in READ_CHUNK pieces and decompressed at most OUT_CHUNK at a
    time (barman's DecompressingStreamingIO re-slices its whole buffer on every read); ``finish`` checks the
    ends: the download's length, the compressed stream's own end, nothing after it."""

    def __init__(self, raw: BinaryIO, compression: str | None, *, stop: threading.Event | None = None) -> None:
        self.raw = raw
        self.stop = stop
        self.decoder = _decoder(compression)
        self.raw_bytes = 0
        self.tar_bytes = 0
        self._raw_eof = False
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _read_raw(self) -> bytes:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("stopped: another part failed")
        if self._raw_eof:
            return b""
        data = self.raw.read(READ_CHUNK)  # botocore checks Content-Length when the body ends
        if not data:
            self._raw_eof = True
        self.raw_bytes += len(data)
        return data

    def _more(self) -> bytes:
        d = self.decoder
        if d is None:
            return self._read_raw()
        while True:
            if d.eof:
                return b""
            if d.needs_input:
                data = self._read_raw()
                if not data:
                    if isinstance(d, _Snappy):
                        try:
                            d.finish()
                        except Exception as exc:  # noqa: BLE001
                            raise RestoreError(f"the compressed stream stops inside a chunk ({exc})") from None
                    return b""
            else:
                data = b""
            try:
                out = d.decompress(data, OUT_CHUNK)
            except Exception as exc:  # noqa: BLE001 - zlib.error, OSError (bz2), RuntimeError (lz4), snappy's
                raise RestoreError(f"corrupt compressed data ({type(exc).__name__}: {exc})") from None
            if out:
                return out

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._more(), 0
            if not self._buf:
                return b""
        end = len(self._buf) if n is None or n < 0 else self._pos + n
        out = self._buf[self._pos:end] if self._pos or end < len(self._buf) else self._buf
        self._pos += len(out)
        self.tar_bytes += len(out)
        return out

    def finish(self, expected_size: int | None) -> None:
        """After the tar's end: the object must end with the compressed stream, at the listed size."""
        d = self.decoder
        if d is not None:
            if not d.eof:
                raise RestoreError("the compressed stream stops before its end (truncated part)")
            if d.unused_data:
                raise RestoreError(f"{len(d.unused_data)} bytes follow the end of the compressed stream")
        if self._read_raw():
            raise RestoreError("bytes follow the end of the compressed stream")
        if expected_size is not None and self.raw_bytes != expected_size:
            raise RestoreError(f"{self.raw_bytes} bytes downloaded, the bucket lists {expected_size} "
                               "(size mismatch)")


class _CheckedTarInfo(tarfile.TarInfo):
    """Records why the member list ended: tarfile treats a corrupt header or a cut-off stream past the first
    member as the end of the archive, silently; only the end-of-archive marker (a zero block) is one."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.pgops_end = "marker"
            raise
        except tarfile.EmptyHeaderError:
            tf.pgops_end = "the archive stops after its last member, without the end-of-archive marker (truncated)"
            raise
        except tarfile.TruncatedHeaderError:
            tf.pgops_end = "the archive stops inside a member header (truncated)"
            raise
        except tarfile.InvalidHeaderError as exc:
            tf.pgops_end = f"corrupt member header ({exc})"
            raise


# -- members: what may be extracted -------------------------------------------------------------------------
def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be extracted (path traversal, links leaving the tree, special files), or None."""
    name = member.name
    if not name or "\x00" in name:
        return "has an empty or NUL-containing name"
    if name.startswith("/") or posixpath.isabs(name):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component"
    if member.isdir() or member.isreg():
        return None
    link = member.linkname
    if member.issym():
        if not link or link.startswith("/"):
            return f"is a symlink to an absolute path ({link!r}), outside the restore target"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(posixpath.normpath(name)), link))
        if resolved == ".." or resolved.startswith("../"):
            return f"is a symlink to {link!r}, which leads outside the restore target"
        return None
    if member.islnk():
        if not link or link.startswith("/") or ".." in link.split("/"):
            return f"is a hard link to {link!r}, outside the restore target"
        return None
    kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
    what = kind.get(member.type) or f"special file (type {member.type!r})"
    return f"is a {what}, which a data directory never holds"


def _attrs(member: tarfile.TarInfo) -> tuple:
    return (member.mode, member.mtime, member.uid, member.gid, member.uname, member.gname)


@dataclass
class PartResult:
    key: str
    label: str
    number: int
    raw_bytes: int = 0
    tar_bytes: int = 0
    members: int = 0
    seconds: float = 0.0
    kinds: dict[str, str] = field(default_factory=dict)           # member path -> file | dir | symlink (last wins)
    dirs: dict[str, tuple] = field(default_factory=dict)          # directory -> attributes, applied at the end
    symlinks: dict[str, tuple] = field(default_factory=dict)      # symlink -> (target, attributes), made at the end


def extract_part(open_object: Callable[[str], BinaryIO | None], part: Part, *, only: set[str] | None = None,
                 stop: threading.Event | None = None) -> PartResult:
    """Download one part and extract its files and hard links into part.root; directories' attributes and
    symlinks are returned for the end. ``only``: extract just these paths (a path a later part also holds)."""
    started = time.monotonic()
    res = PartResult(key=part.key, label=part.label, number=part.number)
    raw = open_object(part.key)
    if raw is None:
        raise RestoreError("is not in the bucket (missing part)")
    try:
        return _extract(raw, part, res, only=only, stop=stop, started=started)
    finally:
        close = getattr(raw, "close", None)
        if close:
            close()


def _extract(raw: BinaryIO, part: Part, res: PartResult, *, only: set[str] | None, stop: threading.Event | None,
             started: float) -> PartResult:
    stream = PartStream(raw, part.compression, stop=stop)
    root = part.root
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    made_dirs: set[str] = set()
    last = "the start"
    with tarfile.open(fileobj=stream, mode="r|", bufsize=COPY_BUFSIZE, tarinfo=_CheckedTarInfo,
                      copybufsize=COPY_BUFSIZE, errorlevel=1) as tf:
        tf.pgops_end = None
        for member in tf:
            problem = member_problem(member)
            if problem:
                raise RestoreError(f"member {member.name!r} {problem}: refused, nothing of it was written")
            path = posixpath.normpath(member.name)
            res.members += 1
            last = member.name
            if member.isdir():
                res.kinds[path] = "dir"
                res.symlinks.pop(path, None)
                res.dirs[path] = _attrs(member)
                if only is None:
                    _makedirs(os.path.join(root, path), made_dirs)
                continue
            if member.issym():
                res.kinds[path] = "symlink"
                res.symlinks[path] = (member.linkname, _attrs(member))
                continue
            res.kinds[path] = "file"
            res.symlinks.pop(path, None)
            if only is not None and path not in only:
                continue
            parent = posixpath.dirname(path)
            if parent:
                _makedirs(os.path.join(root, parent), made_dirs)  # tarfile's own makedirs races other workers
            if path == PG_CONTROL and part.label == "data":
                member = copy.copy(member)
                member.name = PG_CONTROL_PENDING  # in place only when the whole restore has passed
            tf.extract(member, root, set_attrs=True, **trusted)
        if tf.pgops_end != "marker":
            raise RestoreError(f"{tf.pgops_end or 'the member list ended early'}, after member {last!r}")
        while True:  # the rest of the archive: the second zero block and the record padding
            rest = tf.fileobj.read(COPY_BUFSIZE)
            if not rest:
                break
            if rest.count(0) != len(rest):
                raise RestoreError(f"data follows the end-of-archive marker (after member {last!r})")
    stream.finish(part.size)
    res.raw_bytes, res.tar_bytes = stream.raw_bytes, stream.tar_bytes
    res.seconds = time.monotonic() - started
    return res


def _makedirs(path: str, made: set[str]) -> None:
    if path not in made:
        os.makedirs(path, mode=0o700, exist_ok=True)
        made.add(path)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RestoreError):
        return str(exc)
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (zlib.error, EOFError)) or type(exc).__module__.startswith(("lz4", "snappy", "bz2")):
        return f"corrupt compressed data ({type(exc).__name__}: {text})"
    if isinstance(exc, tarfile.TarError):
        return f"corrupt or truncated tar ({text})"
    if type(exc).__name__ == "IncompleteReadError":
        return f"the download ended early ({text}: size mismatch)"
    return f"{type(exc).__name__}: {text}"


# -- running the parts --------------------------------------------------------------------------------------
Opener = Callable[[], Callable[[str], BinaryIO | None]]


def run_parts(parts: list[Part], *, jobs: int, opener: Opener,
              on_done: Callable[[PartResult, int], None] | None = None) -> list[PartResult]:
    """Extract every part, ``jobs`` threads at a time, biggest first; each thread opens parts with what
    ``opener`` gives it. Decompression, socket reads and file writes run outside the GIL, and measured in the lab
    threads restored faster than worker processes. The first failure stops the others at their next read and
    raises RestoreError naming the part."""
    order = sorted(range(len(parts)), key=lambda i: (-(parts[i].size or 0), parts[i].label, parts[i].number))
    workers = max(1, min(jobs, len(parts)))
    stop = threading.Event()
    local = threading.local()
    done: dict[int, PartResult] = {}

    def one(i: int) -> PartResult:
        if stop.is_set():
            raise Stopped("not started: the restore stopped")
        if not hasattr(local, "open_object"):
            local.open_object = opener()
        return extract_part(local.open_object, parts[i], stop=stop)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="part")
    futures = {pool.submit(one, i): i for i in order}
    failure: RestoreError | None = None
    try:
        for fut in as_completed(futures):
            i = futures[fut]
            exc = fut.exception()
            if exc is None:
                done[i] = fut.result()
                if on_done:
                    on_done(done[i], len(done))
            elif failure is None and not isinstance(exc, Stopped):
                failure = RestoreError(f"part {parts[i].name} ({parts[i].key}): {_describe(exc)}")
                stop.set()
    finally:
        if failure is not None or len(done) < len(parts):
            stop.set()  # a failure, or the restore itself stopped (SIGTERM): the others stop at their next read
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure
    return [done[i] for i in range(len(parts))]


# -- the whole restore --------------------------------------------------------------------------------------
def check_targets(plan: Plan) -> None:
    """The destination and every tablespace directory: missing or an empty directory, else nothing is done."""
    for root in plan.roots:
        if os.path.lexists(root) and not os.path.isdir(root):
            raise RestoreError(f"restore target {root} exists and is not a directory: nothing was changed")
        if os.path.isdir(root) and os.listdir(root):
            raise RestoreError(f"restore target {root} already exists and is not empty: nothing was changed. "
                               "Fix: restore into a new or empty directory")


def restore(plan: Plan, *, jobs: int, opener: Opener) -> dict[str, Any]:
    """Extract every part of the plan, then make what barman-cloud-restore makes after its extraction."""
    started = time.monotonic()
    check_targets(plan)
    for root in plan.roots:
        os.makedirs(root, mode=0o700, exist_ok=True)
    marker = os.path.join(plan.destination, INCOMPLETE)
    _write(marker, f"restore of backup {plan.backup_id} in progress: not a valid data directory until this file "
                   "is gone\n")
    total = len(plan.parts)
    say(f"backup {plan.backup_id}: {total} part(s), {human(sum(p.size or 0 for p in plan.parts))} in the bucket, "
        f"{min(jobs, total)} at a time")

    def on_done(res: PartResult, n: int) -> None:
        say(f"part {n}/{total} {posixpath.basename(res.key)}: {human(res.raw_bytes)} downloaded, "
            f"{human(res.tar_bytes)} of tar, {res.members} members in {res.seconds:.1f} s")

    try:
        results = run_parts(plan.parts, jobs=jobs, opener=opener, on_done=on_done)
        _finish(plan, results, opener)
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, RestoreError) else _describe(exc)
        _write(marker, f"restore of backup {plan.backup_id} FAILED: {reason}\nnot a valid data directory: "
                       "remove it\n")
        raise
    os.unlink(marker)
    seconds = time.monotonic() - started
    summary = {"restorer": PROG, "backup_id": plan.backup_id, "parts": total, "jobs": min(jobs, total),
               "downloaded_bytes": sum(r.raw_bytes for r in results),
               "extracted_bytes": sum(r.tar_bytes for r in results), "seconds": round(seconds, 3)}
    say(f"restored backup {plan.backup_id} into {plan.destination}: {total} part(s), "
        f"{human(summary['downloaded_bytes'])} downloaded in {seconds:.1f} s")
    print(SUMMARY + json.dumps(summary, sort_keys=True), flush=True)
    return summary


def _finish(plan: Plan, results: list[PartResult], opener: Opener) -> None:
    by_part = {(r.label, r.number): r for r in results}
    roots = {p.label: p.root for p in plan.parts}
    # A path in two parts: the later part wins, as in barman's sequential extraction.
    owners: dict[tuple[str, str], list[PartResult]] = {}
    for r in results:
        for path in r.kinds:
            owners.setdefault((r.label, path), []).append(r)
    again: dict[tuple[str, int], set[str]] = {}
    for (label, path), rs in owners.items():
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r.number)
        kinds = {r.kinds[path] for r in rs}
        if "dir" in kinds and len(kinds) > 1:
            raise RestoreError(f"{path} is a directory in one part of {label} and not in another: the parts are "
                               "not one backup's")
        winner = rs[-1]
        for r in rs[:-1]:
            r.dirs.pop(path, None)
            r.symlinks.pop(path, None)
        if winner.kinds[path] == "file":
            again.setdefault((label, winner.number), set()).add(path)
        elif winner.kinds[path] == "symlink":
            target = os.path.join(roots[label], path)
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)  # an earlier part's file
    if again:
        open_object = opener()
        for (label, number), paths in sorted(again.items()):
            part = next(p for p in plan.parts if p.label == label and p.number == number)
            say(f"part {part.name}: extracting again {len(paths)} path(s) an earlier part also holds")
            try:
                extract_part(open_object, part, only=paths)
            except Exception as exc:  # noqa: BLE001
                raise RestoreError(f"part {part.name} ({part.key}): {_describe(exc)}") from None
    for r in sorted(results, key=lambda r: (r.label, r.number)):
        root = roots[r.label]
        for path, (link, attrs) in sorted(r.symlinks.items()):
            _make_symlink(root, path, link, attrs, part=posixpath.basename(r.key))
    _check_backup_label(plan, by_part)
    pending = os.path.join(plan.destination, PG_CONTROL_PENDING)
    if not os.path.isfile(pending):
        last = max((r for r in results if r.label == "data"), key=lambda r: r.number)
        raise RestoreError(f"global/pg_control is in no part of the data directory: the part after "
                           f"{posixpath.basename(last.key)} is missing")
    os.replace(pending, os.path.join(plan.destination, PG_CONTROL))
    for link, target in plan.links:
        os.symlink(target, link)
    wal = os.path.join(plan.destination, plan.wal_directory)
    if not os.path.exists(wal):
        os.mkdir(wal)
    # Directory attributes last (deepest first, as tarfile's extractall), after every write into them.
    dirs = [(os.path.join(roots[r.label], path), attrs) for r in results for path, attrs in r.dirs.items()]
    for path, attrs in sorted(dirs, key=lambda d: d[0], reverse=True):
        if not os.path.islink(path):
            _set_attrs(path, attrs)


def _check_backup_label(plan: Plan, by_part: dict[tuple[str, int], PartResult]) -> None:
    path = os.path.join(plan.destination, "backup_label")
    last = max((r for (label, _), r in by_part.items() if label == "data"), key=lambda r: r.number)
    if not os.path.isfile(path) or os.path.islink(path):
        raise RestoreError(f"backup_label is in no part of the data directory (barman writes it last): the part "
                           f"after {posixpath.basename(last.key)} is missing")
    if plan.backup_label is None:
        return
    with open(path, "rb") as f:
        restored = f.read()
    if restored != plan.backup_label.encode("utf-8"):
        raise RestoreError(f"the restored backup_label differs from backup.info's for backup {plan.backup_id} "
                           f"(part {posixpath.basename(last.key)} or an earlier one): the parts are not this "
                           "backup's")


def _inside(root_real: str, path: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip("/") + "/")


def _make_symlink(root: str, path: str, link: str, attrs: tuple, *, part: str) -> None:
    root_real = os.path.realpath(root)
    parent = os.path.normpath(os.path.join(root_real, posixpath.dirname(path)))
    if os.path.realpath(parent) != parent:
        raise RestoreError(f"member {path!r} of part {part}: a symlink is on its path: refused")
    target = os.path.realpath(os.path.join(parent, link))
    if not _inside(root_real, target):
        raise RestoreError(f"member {path!r} of part {part} is a symlink to {link!r}, which resolves outside "
                           f"{root}: refused")
    dest = os.path.join(root_real, path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    os.symlink(link, dest)
    _chown(dest, attrs, follow=False)


def _chown(path: str, attrs: tuple, *, follow: bool = True) -> None:
    """As tarfile's chown: only as root, by user and group name when this host knows them, else by number."""
    if os.geteuid() != 0:
        return
    import grp
    import pwd

    _, _, uid, gid, uname, gname = attrs
    try:
        gid = grp.getgrnam(gname)[2] if gname else gid
    except KeyError:
        pass
    try:
        uid = pwd.getpwnam(uname)[2] if uname else uid
    except KeyError:
        pass
    (os.chown if follow else os.lchown)(path, uid, gid)


def _set_attrs(path: str, attrs: tuple) -> None:
    mode, mtime = attrs[0], attrs[1]
    _chown(path, attrs)
    os.utime(path, (mtime, mtime))
    os.chmod(path, mode)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# -- command line -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from barman.clients.cloud_cli import create_argument_parser

    parser, _, _ = create_argument_parser(
        description="Restore a barman-cloud base backup, its tar parts downloaded and extracted in parallel "
                    "(barman-cloud-restore's arguments plus --jobs).")
    parser.prog = PROG
    parser.add_argument("backup_id", help="the backup ID (or name, or latest)")
    parser.add_argument("recovery_dir", help="the directory to restore into (missing or empty)")
    parser.add_argument("--tablespace", help="tablespace relocation rule", metavar="NAME:LOCATION",
                        action="append", default=[])
    parser.add_argument("--jobs", type=_positive, default=2, help="parts downloaded and extracted at a time")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _object_sizes(cloud_interface: Any, prefix: str) -> dict[str, int]:
    """Sizes of the backup's objects from one listing (S3); without them the sizes go unchecked."""
    s3 = getattr(cloud_interface, "s3", None)
    if s3 is None:
        return {}
    sizes = {}
    for page in s3.meta.client.get_paginator("list_objects_v2").paginate(
            Bucket=cloud_interface.bucket_name, Prefix=prefix.lstrip("/")):
        for obj in page.get("Contents", []):
            sizes[obj["Key"]] = obj["Size"]
    return sizes


def _opener(cloud_interface: Any, config: argparse.Namespace) -> Opener:
    """How each thread opens a part. S3: the interface's boto3 client, shared (clients are thread-safe; barman's
    resource is not, and a cloud interface of its own costs a thread 0.5 s to make). Else: barman's remote_open
    of an interface per thread."""
    s3 = getattr(cloud_interface, "s3", None)
    if s3 is None:
        from barman.cloud_providers import get_cloud_interface

        return lambda: get_cloud_interface(config).remote_open
    from botocore.exceptions import ClientError

    client, bucket = s3.meta.client, cloud_interface.bucket_name

    def open_object(key: str) -> BinaryIO | None:
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    return lambda: open_object


def _stop(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    from contextlib import closing

    from barman.cloud import CloudBackupCatalog, configure_logging
    from barman.cloud_providers import get_cloud_interface

    configure_logging(config)
    # A stop (the runner's timeout or a cancelled task: SIGTERM to the group) unwinds here: the threads stop at
    # their next read and the data directory keeps its mark.
    signal.signal(signal.SIGTERM, _stop)
    try:
        cloud_interface = get_cloud_interface(config)
        with closing(cloud_interface):
            if config.test:
                cloud_interface.verify_cloud_connectivity_and_bucket_existence()
                return 0
            catalog = CloudBackupCatalog(cloud_interface, config.server_name)
            try:
                backup_id = catalog.parse_backup_id(config.backup_id)
            except ValueError as exc:
                raise RestoreError(str(exc)) from None
            backup_info = catalog.get_backup_info(backup_id)
            if backup_info is None:
                raise RestoreError(f"backup {backup_id} of server {config.server_name} is not in the catalog "
                                   f"(no {catalog.prefix}/{backup_id}/backup.info)")
            files = catalog.get_backup_files(backup_info, allow_missing=True)
            sizes = _object_sizes(cloud_interface, f"{catalog.prefix}/{backup_id}/")
            plan = make_plan(backup_info=backup_info, backup_files=files, destination=config.recovery_dir,
                             relocations=parse_relocations(config.tablespace), sizes=sizes)
            restore(plan, jobs=config.jobs, opener=_opener(cloud_interface, config))
    except RestoreError as exc:
        print(f"{PROG}: ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{PROG}: ERROR: interrupted ({exc or 'SIGINT'})", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - barman's and boto's errors, named
        print(f"{PROG}: ERROR: {_describe(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
