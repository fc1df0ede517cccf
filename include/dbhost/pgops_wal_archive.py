#!/usr/bin/env python3
"""archive_command wrapper: archive the next ready WAL segments in parallel (pgBackRest's async idea).

    archive_command = '<dbhost-venv>/bin/pgops-wal-archive --parallel 4 --in-process --background --
                       <dbhost-venv>/bin/barman-cloud-wal-archive ... %p'

(the console script scripts/setup.sh installs into the DB-host tools venv from include/dbhost/pyproject.toml);
with engine.wal_archive_parallel: 1 the engine writes `--parallel 1 --in-process --batch 1 --`: each call
archives its own segment (or history/backup file) in its own process, with the same overwrite check.

barman-cloud-wal-archive starts one Python process per segment (about 1 s of CPU, most of it imports),
so a busy primary outruns it. Called for segment N, this script also archives the next ready segments
(pg_wal/archive_status/*.ready, up to --batch in all) and records each success in a spool marker; when
PostgreSQL then calls it for one of those, it returns at once.

Two ways to archive a batch:
- default: the given command once per segment, --parallel processes at a time (any archive command; the
  command itself decides about files already archived);
- --in-process: barman-cloud-wal-archive's own code (argument parser, cloud interface, CloudWalUploader,
  as its main() uses them) imported once, --parallel upload threads sharing one client. Same objects,
  names and compression as the CLI; needs the DB-host venv's python (barman importable).

--background (with --in-process), pgBackRest's asynchronous archive-push: a pusher process started by the
first call keeps uploading every ready segment, --parallel at a time, barman imported once for its whole
life; a call waits for its segment's marker. The pusher stops when archive_command names another
destination (at once), when nothing has been ready or asked for --idle-s seconds, when PostgreSQL stops
(the postmaster.pid of the data directory it started in is gone or names another process) or when its spool
is removed. Whatever it cannot do (an upload failed, a history or backup file, no pusher) the call archives
itself as above, and that exit status is what PostgreSQL gets.

Correctness (PostgreSQL's archive_command contract: exit 0 only when the file is durably archived where the
command says, and never overwrite an archived file):
- the destination is part of every record: a hash of the archive command's arguments (destination, server
  name, endpoint, compression, ...) is in each marker and in the call record (.called). A marker of another
  hash is never trusted, and a pusher started for another hash stops at once; so after ALTER SYSTEM SET
  archive_command every segment is archived again where the new command says before the call returns 0;
- a marker is written (and fsynced) only after the file is in the bucket, with the segment file's inode,
  size and mtime: a marker that does not match the file in pg_wal is ignored and the file archived again;
- no overwrite (--in-process, which the engine's archive_command always uses): before an upload the keys of
  that file (a segment, a timeline .history or a .backup file: its name, any compression suffix) are listed;
  identical content (compared decompressed, by sha256) is success without an upload, different content is a
  failure naming both checksums, the key and the fix. The upload itself is conditional (If-None-Match),
  so a writer that raced the listing is caught the same way;
- every file is handled on its own: an error (an orphan .ready, a vanished file) costs that file only; each
  writer of a marker has its own temporary name.
The spool lives outside the data directory (<parent>/pgops_wal_spool.<data dir name>, or --spool-dir), so no
base backup carries it, and is used only as this user's own directory that nobody else can write (its markers
vouch for archived WAL); the pusher's log is capped (rotated to .pusher.log.1). The exit status is the
archive command's for segment N. Standard library only in the calling process (runs on the DB host with any
Python 3); --in-process needs barman.
"""

from __future__ import annotations

import _thread
import os
import stat
import sys
import time

from pgops_spool import CappedLog, SpoolOwner, held_by_someone, is_segment_name, rotate_log

if False:  # for annotations only (typing.TYPE_CHECKING would import typing): only the paths that archive load it
    from pathlib import Path

# PostgreSQL starts this script once per WAL segment: a call whose segment the pusher has archived imports
# nothing an interpreter start has not loaded already (no re, pathlib, types, argparse, subprocess, shutil or
# hashlib's OpenSSL: together they took as long as the interpreter's own start), and works on str paths; the
# paths that archive in this process, and the pusher, import what they need (`make bench` measures the CPU per
# segment, tests/unit/test_archive_call_imports.py what a call loads).
SimpleNamespace = type(sys.implementation)  # types.SimpleNamespace, as the types module itself gets it
SPOOL_PREFIX = "pgops_wal_spool."  # default spool: <data directory's parent>/pgops_wal_spool.<its name>
LEGACY_SPOOL = "pgops_wal_spool"  # the old default, inside the data directory (so in every base backup)
CALLED = ".called"
LOCK = ".pusher.lock"
PID = ".pusher.pid"
LOG = ".pusher.log"
LOG_CAP_BYTES = 1 << 20
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 600  # a temporary file this old belongs to a writer that died
EXIT_INVALID = 3  # barman-cloud-wal-archive's codes: 3 invalid WAL name, 4 any other error
EXIT_ERROR = 4


# the options as archive_command_argv writes them: (converter, default); None = a flag
_OPTIONS = {"--parallel": (int, 4), "--batch": (int, 0), "--in-process": (None, False), "--spool-dir": (str, None),
            "--background": (None, False), "--wait-s": (float, 120.0), "--idle-s": (float, 60.0),
            "--pusher": (None, False)}


def _quick_options(args: list[str]) -> SimpleNamespace | None:
    """The options in their exact spelling (``--name value``, ``--name=value``, flags), without importing
    argparse; None for anything else (an abbreviation, a bad value, --help): argparse then parses or explains."""
    values = {name[2:].replace("-", "_"): default for name, (_, default) in _OPTIONS.items()}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in _OPTIONS:
            return None
        convert = _OPTIONS[name][0]
        if convert is None:
            if eq:
                return None
            values[name[2:].replace("-", "_")] = True
        else:
            if not eq:
                i += 1
                if i >= len(args):
                    return None
                value = args[i]
            try:
                values[name[2:].replace("-", "_")] = convert(value)
            except ValueError:
                return None
        i += 1
    return SimpleNamespace(**values)


def _parse(argv: list[str]) -> tuple[SimpleNamespace, list[str], str]:
    if "--" not in argv:
        raise SystemExit("usage: pgops_wal_archive.py [--parallel N] [--spool-dir DIR] -- ARCHIVE_COMMAND... %p")
    cut = argv.index("--")
    rest = argv[cut + 1:]
    opts = _quick_options(argv[:cut])
    if opts is not None and len(rest) >= 2:
        return opts, rest[:-1], rest[-1]
    import argparse

    parser = argparse.ArgumentParser(prog="pgops_wal_archive.py")
    parser.add_argument("--parallel", type=int, default=4, help="segments archived at once (this one included)")
    parser.add_argument("--batch", type=int, default=0, help="segments per call (default: 2 x --parallel)")
    parser.add_argument("--in-process", action="store_true",
                        help="archive with barman-cloud-wal-archive's code in this process (one import per batch)")
    parser.add_argument("--spool-dir", default=None,
                        help="where markers of segments archived ahead live (default: next to the data directory, "
                             f"<parent>/{SPOOL_PREFIX}<data directory name>)")
    parser.add_argument("--background", action="store_true",
                        help="a long-lived pusher archives ready segments (with --in-process)")
    parser.add_argument("--wait-s", type=float, default=120, help="longest wait for the pusher (--background)")
    parser.add_argument("--idle-s", type=float, default=60, help="the pusher stops after this long with nothing ready")
    parser.add_argument("--pusher", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv[:cut])
    if len(rest) < 2:
        raise SystemExit("pgops_wal_archive.py: give the archive command and the WAL path (%p) after '--'")
    return opts, rest[:-1], rest[-1]


def destination_hash(command: list[str]) -> str:
    """What markers and the call record are keyed on: every argument of the archive command (destination,
    server name, endpoint, compression, ...), so a record made for one destination never vouches for another."""
    from _sha256 import (
        sha256,  # the built-in one: loading OpenSSL for one short string costs more than it hashes
    )

    return sha256("\0".join(command).encode()).hexdigest()[:16]


def default_spool(data_dir: str | os.PathLike) -> str:
    """Next to the data directory, not in it: a base backup must not carry the spool."""
    data_dir = os.fspath(data_dir).rstrip("/") or "/"
    return os.path.join(os.path.dirname(data_dir), SPOOL_PREFIX + os.path.basename(data_dir))


def _identity(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: str | os.PathLike) -> str:
    """A temporary name of this writer only (process and thread): two writers never share one."""
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f"{TMP_PREFIX}{tail}.{os.getpid()}.{_thread.get_ident()}")


def _write_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    if durable:
        _fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def _read(path: str | os.PathLike) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except (OSError, ValueError):  # ValueError: not UTF-8, as Path.read_text raised it
        return ""


def _write_marker(spool: str | os.PathLike, name: str, identity: str, dest: str) -> None:
    _write_atomic(os.path.join(spool, f"{name}.archived"), f"{identity} {dest}\n", durable=True)


def _marker_matches(spool: str | os.PathLike, name: str, wal: str | os.PathLike, dest: str) -> bool:
    """A marker vouches only for this very file (inode, size, mtime) archived to this destination (hash)."""
    marker = _read(os.path.join(spool, f"{name}.archived"))
    if not marker:
        return False
    try:
        return marker == f"{_identity(wal)} {dest}"
    except OSError:
        return False


def _ready(wal_dir: str | os.PathLike, limit: int, accept) -> list[tuple[str, str]]:
    """(name, identity) of the oldest ready WAL segments that accept(name) takes, up to limit. A .ready
    without its segment file (an orphan) is skipped, never fatal."""
    if limit <= 0:
        return []
    try:
        ready = sorted(n[:-6] for n in os.listdir(os.path.join(wal_dir, "archive_status")) if n.endswith(".ready"))
    except OSError:
        return []
    out = []
    for name in ready:
        if not is_segment_name(name) or not accept(name):
            continue
        try:
            out.append((name, _identity(os.path.join(wal_dir, name))))
        except OSError:
            continue  # an orphan .ready (or recycled meanwhile): PostgreSQL's own call for it gets the answer
        if len(out) == limit:
            break
    return out


def _prune(spool: str | os.PathLike, wal_dir: str | os.PathLike) -> None:
    """Drop markers whose segment is gone from pg_wal (archived and recycled) and temporary files of writers
    that died: they can never be asked for."""
    now = time.time()
    try:
        entries = os.listdir(spool)
    except OSError:
        return
    for entry in entries:
        try:
            if entry.startswith(TMP_PREFIX):
                if now - os.stat(os.path.join(spool, entry)).st_mtime > STALE_TMP_S:
                    _unlink(os.path.join(spool, entry))
            elif entry.endswith(".archived") and not os.path.exists(os.path.join(wal_dir, entry.split(".", 1)[0])):
                _unlink(os.path.join(spool, entry))
        except OSError:
            continue


def _spool_problem(spool: str | os.PathLike) -> str | None:
    """Why the spool cannot be used, or None. Markers in it vouch for archived WAL: it must be a directory of this
    user that nobody else can write (not a symlink someone left in a shared parent directory)."""
    try:
        os.makedirs(spool, mode=0o700, exist_ok=True)
        st = os.lstat(spool)
    except OSError as exc:
        return str(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: others could forge its markers"
    return None


def _drop_legacy_spool(data_dir: str | os.PathLike, spool: str | os.PathLike) -> None:
    """The spool used to live in the data directory, and so in every base backup: remove it once no pusher
    of an older version works in it."""
    old = os.path.join(data_dir, LEGACY_SPOOL)
    try:
        if not os.path.isdir(old) or os.path.realpath(old) == os.path.realpath(spool) or held_by_someone(old, LOCK):
            return
    except OSError:
        return
    import shutil

    shutil.rmtree(old, ignore_errors=True)


class ArchiveConflict(Exception):
    """The destination already holds this file with other content: never overwritten."""


class _Sha256Sink:
    """A write-only file object that hashes what is written to it (decompression target)."""

    def __init__(self) -> None:
        import hashlib

        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Uploader:
    """barman-cloud-wal-archive's own objects (argument parser, cloud interface, CloudWalUploader for the key
    name and compression), built once, and an upload of one file that never overwrites."""

    def __init__(self, command: list[str], sample_path: str):
        from barman.clients import cloud_walarchive as cw
        from barman.cloud import ALLOWED_COMPRESSIONS
        from barman.cloud_providers import ObjectKeyAlreadyExists

        self.cw, self.compressions, self.already_exists = cw, ALLOWED_COMPRESSIONS, ObjectKeyAlreadyExists
        self.config = cw.parse_arguments([*command[1:], sample_path])
        cw.configure_logging(self.config)
        self.interface = cw.get_cloud_interface(self.config)
        self.uploader = cw.CloudWalUploader(cloud_interface=self.interface, server_name=self.config.server_name,
                                            compression=self.config.compression,
                                            compression_level=self.config.compression_level)
        self.conditional_put = True

    def close(self) -> None:
        self.interface.close()

    def key(self, path: Path) -> str:
        from barman.xlog import hash_dir

        return os.path.join(self.interface.path, self.config.server_name, "wals", hash_dir(str(path)),
                            self.uploader.retrieve_wal_name(str(path)))

    def where(self, key: str) -> str:
        bucket = getattr(self.interface, "bucket_name", "")
        return f"s3://{bucket}/{key}" if self.config.cloud_provider == "aws-s3" else key

    def archived_keys(self, name: str, key: str) -> list[str]:
        """Keys of this very file in the archive: its name, plain or with any compression suffix (never
        <name>.partial or <name>.<offset>.backup, which are other files)."""
        directory = os.path.dirname(key)
        out = []
        for k in self.interface.list_bucket(f"{directory}/{name}", delimiter="/"):
            base = os.path.basename(k)
            if base == name or any(base == name + ext for ext in self.compressions):
                out.append(k)
        return out

    def remote_sha256(self, key: str) -> str | None:
        import shutil

        from barman.clients.cloud_compression import decompress_to_file

        compression = next((c for ext, c in self.compressions.items() if key.endswith(ext)), None)
        stream = self.interface.remote_open(key)
        if stream is None:
            return None
        sink = _Sha256Sink()
        try:
            if compression is None:
                shutil.copyfileobj(stream, sink)
            else:
                decompress_to_file(stream, sink, compression)
        finally:
            stream.close()
        return sink.hexdigest()

    def compare(self, path: Path, keys: list[str]) -> None:
        """Return when every key holds this file's bytes; ArchiveConflict naming both checksums otherwise."""
        local = _file_sha256(path)
        for key in keys:
            remote = self.remote_sha256(key)
            if remote is not None and remote != local:
                raise ArchiveConflict(
                    f"WAL file {path.name} is already archived at {self.where(key)} with different content "
                    f"(archived sha256 {remote}, pg_wal sha256 {local}): refusing to overwrite it. Fix: two servers "
                    "archive into one destination (a split brain after a failover, or a shared prefix/server name): "
                    "give this server's archive_command its own destination; keep the archived copy until you know "
                    "which history is the real one, and move it aside only then")

    def push(self, path: Path) -> bool:
        """Archive one file: True when uploaded, False when already there with the same content."""
        name = path.name
        key = self.key(path)
        existing = self.archived_keys(name, key)
        if existing:
            self.compare(path, existing)
            return False
        kwargs = {"override_tags": self.config.history_tags} if self.cw.is_history_file(str(path)) else {}
        try:
            self._upload(path, key, kwargs)
        except self.already_exists:
            self.compare(path, [key])  # another writer put it there after the listing
            return False
        return True

    def _upload(self, path: Path, key: str, kwargs: dict) -> None:
        from contextlib import closing

        with closing(self.uploader.retrieve_file_obj(str(path))) as fileobj:
            if not self.conditional_put:
                self.interface.upload_fileobj(fileobj=fileobj, key=key, **kwargs)
                return
            try:
                self.interface.upload_fileobj(fileobj=fileobj, key=key, fail_if_exists=True, **kwargs)
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code not in ("NotImplemented", "501"):
                    raise
                # a store without conditional writes: the listing above is the check
                self.conditional_put = False
                fileobj.seek(0)
                self.interface.upload_fileobj(fileobj=fileobj, key=key, **kwargs)


def _archive_processes(command: list[str], paths: list[Path], parallel: int) -> list[int]:
    import subprocess

    codes: list[int] = []
    for i in range(0, len(paths), max(1, parallel)):
        procs = [subprocess.Popen([*command, str(p)]) for p in paths[i:i + parallel]]
        codes += [p.wait() for p in procs]
    return codes


def _archive_in_process(command: list[str], paths: list[Path], parallel: int) -> list[int]:
    """barman-cloud-wal-archive's main() for many files: parse once, one cloud interface, upload threads."""
    from concurrent.futures import ThreadPoolExecutor

    uploader = Uploader(command, str(paths[0]))

    def one(path: Path) -> int:
        if not uploader.cw.is_any_xlog_file(str(path)):
            print(f"pgops_wal_archive: {path} is an invalid name for a WAL file", file=sys.stderr)
            return EXIT_INVALID
        try:
            if not uploader.push(path):
                print(f"pgops_wal_archive: {path.name} is already archived with the same content: not uploaded "
                      "again", file=sys.stderr)
        except ArchiveConflict as exc:
            print(f"pgops_wal_archive: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except Exception as exc:  # barman's main() turns every exception into exit 4 (GeneralErrorExit)
            print(f"pgops_wal_archive: Barman cloud WAL archiver exception for {path.name}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        return 0

    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            return list(pool.map(one, paths))
    finally:
        uploader.close()


def _archive(opts: SimpleNamespace, command: list[str], paths: list[Path]) -> list[int] | None:
    """Exit codes per path; None when nothing could start (barman not importable, bad arguments)."""
    from pathlib import Path

    paths = [Path(p) for p in paths]
    archive = _archive_in_process if opts.in_process else _archive_processes
    try:
        return archive(command, paths, opts.parallel)
    except (Exception, SystemExit) as exc:
        print(f"pgops_wal_archive: archiving {paths[0].name} failed before any upload: {exc}", file=sys.stderr)
        return None


def _failed_hint(command: list[str], name: str, code: int, wal: Path) -> None:
    print(f"pgops_wal_archive: archive command failed for WAL segment {name} (exit {code}). "
          f"HINT: run the archive_command by hand as the postgres user: {' '.join(command)} {wal}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts, command, wal = _parse(argv)
    dest = destination_hash(command)
    name = os.path.basename(wal)
    data_dir = os.getcwd()  # PostgreSQL runs archive_command in the data directory
    wal_dir = os.path.dirname(os.path.abspath(wal))  # pg_wal as PostgreSQL names it (a symlink stays one)
    spool = opts.spool_dir or default_spool(data_dir)
    if opts.pusher:
        from pathlib import Path

        return Pusher(opts, command, dest, Path(wal_dir), Path(data_dir), Path(data_dir, spool)).run()
    problem = _spool_problem(spool)
    if problem:
        print(f"pgops_wal_archive: no spool at {spool} ({problem}): archiving {name} alone. Fix: let the PostgreSQL "
              f"user create it (its own directory, mode 0700), or give --spool-dir", file=sys.stderr)
        codes = _archive(opts, command, [wal])
        code = codes[0] if codes is not None else EXIT_ERROR
        if code != 0:
            _failed_hint(command, name, code, wal)
        return code
    if not opts.spool_dir:
        _drop_legacy_spool(data_dir, spool)

    background = opts.background and opts.in_process
    called = os.path.join(spool, CALLED)
    if background:
        try:  # the call record: PostgreSQL archives through this wrapper, to this destination
            _write_atomic(called, dest + "\n")
        except OSError as exc:
            print(f"pgops_wal_archive: cannot write {called} ({exc}); archiving {name} in this call", file=sys.stderr)
            background = False
    marker = os.path.join(spool, f"{name}.archived")
    # (a segment file that is not there, an orphan .ready, is not waited for: this call fails at once)
    if _marker_matches(spool, name, wal, dest) or (background and is_segment_name(name) and os.path.exists(wal)
                                                   and _wait_for_pusher(opts, argv, spool, wal, dest)):
        # Archived ahead, and the file is the one that was archived, where this command archives. The pusher
        # drops the marker once PostgreSQL has marked the segment done (dropping it here would have the
        # pusher archive it again).
        if not background:
            _unlink(marker)
        return 0
    _unlink(marker)

    batch = opts.batch or 2 * opts.parallel
    # the segments ahead, unless a pusher archives them (both would upload, and then compare, each of them)
    ahead = [] if background and _pusher_alive(spool) else _ready(
        wal_dir, batch - 1, lambda n: n != name and not _marker_matches(spool, n, os.path.join(wal_dir, n), dest))
    names = [name, *(n for n, _ in ahead)]
    codes_list = _archive(opts, command, [os.path.join(wal_dir, n) for n in names])
    if codes_list is None:
        return EXIT_ERROR  # nothing recorded as archived
    codes = dict(zip(names, codes_list, strict=True))
    for n, identity in ahead:
        # Only a success is recorded, and only for the file we archived; a failure is retried by its own call.
        if codes[n] != 0:
            print(f"pgops_wal_archive: archiving {n} ahead failed (exit {codes[n]}); PostgreSQL will retry it "
                  "with its own archive_command call", file=sys.stderr)
            continue
        try:
            if _identity(os.path.join(wal_dir, n)) == identity:
                _write_marker(spool, n, identity, dest)
        except OSError as exc:  # the file went, or the spool is full: only a marker less (archived again later)
            print(f"pgops_wal_archive: no marker for {n} ({exc})", file=sys.stderr)
    _prune(spool, wal_dir)
    if codes[name] != 0:
        _failed_hint(command, name, codes[name], wal)
    return codes[name]


def _pusher_alive(spool: str | os.PathLike) -> bool:
    return held_by_someone(spool, LOCK)


def _start_pusher(argv: list[str], spool: str | os.PathLike, wal: str | os.PathLike) -> None:
    import subprocess

    log_path = os.path.join(spool, LOG)
    rotate_log(log_path, LOG_CAP_BYTES)
    cut = argv.index("--")
    with open(log_path, "ab") as log:
        subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv[:cut], "--pusher", "--",
                          *argv[cut + 1:-1], os.path.abspath(wal)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         close_fds=True, cwd=os.getcwd())


def _wait_for_pusher(opts: SimpleNamespace, argv: list[str], spool: str | os.PathLike, wal: str | os.PathLike,
                     dest: str) -> bool:
    """True once a pusher has archived this file to this destination; False: the caller archives it itself.

    A pusher for another destination sees this call's record and stops at once; this call then starts one
    for its own (a few times at most: one that cannot run leaves the work to this call)."""
    name = os.path.basename(wal)
    failed = os.path.join(spool, f"{name}.failed")
    try:
        _unlink(failed)  # this call asks again: the pusher may retry it
    except OSError:
        return False
    deadline = time.monotonic() + opts.wait_s
    starts, last_start, checked = 0, 0.0, 0.0
    while time.monotonic() < deadline:
        if _marker_matches(spool, name, wal, dest):
            return True
        if os.path.exists(failed):
            return False
        now = time.monotonic()
        if now - checked > 0.05:
            checked = now
            if not _pusher_alive(spool):
                if starts == 0 or (starts < 3 and now - last_start > 1):
                    try:
                        _start_pusher(argv, spool, wal)
                    except OSError as exc:
                        print(f"pgops_wal_archive: no pusher ({exc}); archiving {name} in this call",
                              file=sys.stderr)
                        return False
                    starts, last_start = starts + 1, now
                elif now - last_start > 10:
                    return False
        time.sleep(0.005)
    return False


def _postmaster(pid_file: Path) -> str | None:
    """The postmaster's pid from postmaster.pid (first line), None when there is none."""
    try:
        with open(pid_file) as fh:
            return fh.readline().strip() or None
    except OSError:
        return None


class Pusher:
    """Archives every ready WAL segment of one pg_wal to one destination, --parallel at a time, barman imported
    once."""

    def __init__(self, opts: SimpleNamespace, command: list[str], dest: str, wal_dir: Path, data_dir: Path,
                 spool: Path):
        self.opts, self.command, self.dest, self.wal_dir, self.spool = opts, command, dest, wal_dir, spool
        # the data directory (the archiver's working directory), not pg_wal's resolved parent: pg_wal may be
        # a symlink to its own volume
        self.postmaster_pid = data_dir / "postmaster.pid"
        self.owner = SpoolOwner(spool, LOCK, PID)
        self.logfile = CappedLog(spool / LOG, LOG_CAP_BYTES)
        self.done: set[str] = set()  # archived by this pusher (marker written), still ready

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pgops_wal_archive[{os.getpid()}]: {msg}", flush=True)

    def run(self) -> int:
        if not self.owner.acquire():
            return 0  # another pusher runs for this spool
        try:
            self.logfile.attach()
        except OSError:
            pass
        try:
            return self._serve()
        except Exception as exc:  # callers archive for themselves once this lock is gone
            self.log(f"stopped: {exc!r}")
            return 1
        finally:
            self.owner.release()

    def _stop_reason(self) -> str | None:
        if not self.owner.still_ours():
            return "the spool was removed or replaced"
        if _read(self.spool / CALLED) != self.dest:
            return "archive_command now archives to another destination"
        if self.postmaster is not None and _postmaster(self.postmaster_pid) != self.postmaster:
            return "PostgreSQL stopped"
        return None

    def _unasked_s(self) -> float:
        try:
            return time.time() - (self.spool / CALLED).stat().st_mtime
        except OSError:
            return 0.0

    def _one(self, uploader: Uploader, name: str, identity: str) -> None:
        path = self.wal_dir / name
        uploaded = uploader.push(path)
        if _identity(path) != identity:
            raise RuntimeError(f"{name} changed while it was archived")
        _write_marker(self.spool, name, identity, self.dest)
        if not uploaded:
            self.log(f"{name} is already archived with the same content: not uploaded again")

    def _wanted(self, inflight: dict) -> object:
        def accept(name: str) -> bool:
            if name in inflight or name in self.done or (self.spool / f"{name}.failed").exists():
                return False
            if _marker_matches(self.spool, name, self.wal_dir / name, self.dest):
                self.done.add(name)  # archived by an earlier pusher or call, to this destination
                return False
            return True
        return accept

    def _note_failure(self, name: str, exc: BaseException) -> None:
        self.log(f"archiving {name} failed: {exc}" if isinstance(exc, ArchiveConflict)
                 else f"archiving {name} failed: {exc!r}")
        try:  # the waiting call archives it itself, and reports the failure to PostgreSQL
            _write_atomic(self.spool / f"{name}.failed", f"{exc}\n")
        except OSError:
            pass

    def _prune_done(self) -> None:
        """Forget segments PostgreSQL no longer has ready (done, recycled): markers and failure notes."""
        self.done = {n for n in self.done if (self.wal_dir / "archive_status" / f"{n}.ready").exists()}
        try:
            entries = os.listdir(self.spool)
        except OSError:
            return
        for entry in entries:
            if entry.endswith((".archived", ".failed")):
                name = entry.split(".", 1)[0]
                if not (self.wal_dir / "archive_status" / f"{name}.ready").exists():
                    (self.spool / entry).unlink(missing_ok=True)
        _prune(self.spool, self.wal_dir)

    def _serve(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        uploader = Uploader(self.command, str(self.wal_dir / "000000010000000000000001"))
        self.postmaster = _postmaster(self.postmaster_pid)  # None (not watched) without a postmaster.pid
        self.log(f"archiving ready segments of {self.wal_dir} (destination {self.dest}): {self.opts.parallel} "
                 f"uploads at a time{'' if self.postmaster else '; no postmaster.pid to watch'}")
        pool = ThreadPoolExecutor(max_workers=max(1, self.opts.parallel))
        inflight: dict[str, object] = {}
        last_ready = last_prune = time.monotonic()
        reason = None
        try:
            while (reason := self._stop_reason()) is None:
                for name, fut in list(inflight.items()):
                    if fut.done():
                        del inflight[name]
                        if fut.exception() is None:
                            self.done.add(name)
                        else:
                            self._note_failure(name, fut.exception())
                room = 2 * max(1, self.opts.parallel) - len(inflight)
                for name, identity in _ready(self.wal_dir, room, self._wanted(inflight)):
                    inflight[name] = pool.submit(self._one, uploader, name, identity)
                if inflight:
                    last_ready = time.monotonic()
                elif time.monotonic() - last_ready > self.opts.idle_s:
                    reason = "nothing ready for a while"
                    break
                if time.monotonic() - last_prune > 1:
                    last_prune = time.monotonic()
                    self._prune_done()
                    self.logfile.check()
                    if self._unasked_s() > self.opts.idle_s:
                        # archive_command no longer calls this wrapper (changed, or the archiver stopped)
                        reason = "no archive_command call for a while"
                        break
                time.sleep(0.02)
        finally:
            # Let a pusher for the current destination start now; uploads in flight finish (their markers name
            # this destination, which no call for another one trusts).
            self.owner.release()
            pool.shutdown(wait=True, cancel_futures=True)
            uploader.close()
        self.log(f"stopping: {reason}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
