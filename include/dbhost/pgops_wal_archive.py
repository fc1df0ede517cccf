#!/usr/bin/env python3
"""archive_command wrapper: archive the next ready WAL segments in parallel (pgBackRest's async idea).

    archive_command = '<dbhost-venv>/bin/python3 pgops_wal_archive.py --parallel 4 --in-process --
                       <dbhost-venv>/bin/barman-cloud-wal-archive ... %p'

barman-cloud-wal-archive starts one Python process per segment (about 1 s of CPU, most of it imports),
so a busy primary outruns it. Called for segment N, this script also archives the next ready segments
(pg_wal/archive_status/*.ready, up to --batch in all) and records each success in a spool marker; when
PostgreSQL then calls it for one of those, it returns at once.

Two ways to archive a batch:
- default: the given command once per segment, --parallel processes at a time (any archive command);
- --in-process: barman-cloud-wal-archive's own code (argument parser, cloud interface, CloudWalUploader,
  as its main() uses them) imported once, --parallel upload threads sharing one client. Same objects,
  names and compression as the CLI; needs the DB-host venv's python (barman importable).

--background (with --in-process), pgBackRest's asynchronous archive-push: a pusher process started by the
first call keeps uploading every ready segment, --parallel at a time, barman imported once for its whole
life; a call waits for its segment's marker. The pusher stops when nothing has been ready for --idle-s
seconds, when PostgreSQL stops (postmaster.pid gone) or its spool is removed. Whatever it cannot do (an
upload failed, a history or backup file, no pusher) the call archives itself as above, and that exit status
is what PostgreSQL gets.

Correctness: a marker is written (and fsynced) only after the archive command exited 0 for that segment,
so nothing is reported archived that is not in the bucket. A marker also holds the segment file's inode,
size and mtime: a marker that does not match the file in pg_wal is ignored and the segment is archived
again. The exit status is the archive command's for segment N. Standard library only (runs on the DB host
with any Python 3).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pgops_spool import SpoolOwner, held_by_someone

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
DEFAULT_SPOOL = "pgops_wal_spool"  # relative to the data directory, where PostgreSQL runs archive_command


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], str]:
    if "--" not in argv:
        raise SystemExit("usage: pgops_wal_archive.py [--parallel N] [--spool-dir DIR] -- ARCHIVE_COMMAND... %p")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="pgops_wal_archive.py")
    parser.add_argument("--parallel", type=int, default=4, help="segments archived at once (this one included)")
    parser.add_argument("--batch", type=int, default=0, help="segments per call (default: 2 x --parallel)")
    parser.add_argument("--in-process", action="store_true",
                        help="archive with barman-cloud-wal-archive's code in this process (one import per batch)")
    parser.add_argument("--spool-dir", default=DEFAULT_SPOOL, help="where markers of segments archived ahead live")
    parser.add_argument("--background", action="store_true",
                        help="a long-lived pusher archives ready segments (with --in-process)")
    parser.add_argument("--wait-s", type=float, default=120, help="longest wait for the pusher (--background)")
    parser.add_argument("--idle-s", type=float, default=60, help="the pusher stops after this long with nothing ready")
    parser.add_argument("--pusher", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    if len(rest) < 2:
        raise SystemExit("pgops_wal_archive.py: give the archive command and the WAL path (%p) after '--'")
    return opts, rest[:-1], rest[-1]


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(spool: Path, name: str, identity: str) -> None:
    tmp = spool / f"{name}.tmp"
    with open(tmp, "w") as fh:
        fh.write(identity + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(spool / f"{name}.archived")
    _fsync_dir(spool)


def _marker_matches(spool: Path, name: str, wal: Path) -> bool:
    marker = spool / f"{name}.archived"
    try:
        return marker.read_text().strip() == _identity(wal)
    except OSError:
        return False


def _ready_segments(wal_dir: Path, exclude: str, limit: int, spool: Path) -> list[str]:
    """The oldest ready WAL segments (not history or backup files) that no valid marker covers."""
    if limit <= 0:
        return []
    try:
        ready = sorted(n[:-6] for n in os.listdir(wal_dir / "archive_status") if n.endswith(".ready"))
    except OSError:
        return []
    out = []
    for name in ready:
        if name == exclude or not SEGMENT_RE.match(name) or _marker_matches(spool, name, wal_dir / name):
            continue
        out.append(name)
        if len(out) == limit:
            break
    return out


def _prune(spool: Path, wal_dir: Path) -> None:
    """Drop markers whose segment is gone from pg_wal (archived and recycled): they can never be asked for."""
    for entry in os.listdir(spool):
        name = entry.split(".", 1)[0]
        if entry.endswith((".archived", ".tmp")) and not (wal_dir / name).exists():
            (spool / entry).unlink(missing_ok=True)


def _archive_processes(command: list[str], paths: list[Path], parallel: int) -> list[int]:
    codes: list[int] = []
    for i in range(0, len(paths), max(1, parallel)):
        procs = [subprocess.Popen([*command, str(p)]) for p in paths[i:i + parallel]]
        codes += [p.wait() for p in procs]
    return codes


def _archive_in_process(command: list[str], paths: list[Path], parallel: int) -> list[int]:
    """barman-cloud-wal-archive's main() for many files: parse once, one cloud interface, upload threads."""
    from concurrent.futures import ThreadPoolExecutor

    from barman.clients import cloud_walarchive as cw

    config = cw.parse_arguments([*command[1:], str(paths[0])])
    cw.configure_logging(config)
    interface = cw.get_cloud_interface(config)
    uploader = cw.CloudWalUploader(cloud_interface=interface, server_name=config.server_name,
                                   compression=config.compression, compression_level=config.compression_level)

    def one(path: Path) -> int:
        if not cw.is_any_xlog_file(str(path)):
            print(f"pgops_wal_archive: {path} is an invalid name for a WAL file", file=sys.stderr)
            return 3
        kwargs = {"override_tags": config.history_tags} if cw.is_history_file(str(path)) else {}
        try:
            uploader.upload_wal(str(path), **kwargs)
        except Exception as exc:  # barman's main() turns every exception into exit 4 (GeneralErrorExit)
            print(f"pgops_wal_archive: Barman cloud WAL archiver exception for {path.name}: {exc}", file=sys.stderr)
            return 4
        return 0

    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            return list(pool.map(one, paths))
    finally:
        interface.close()


def main(argv: list[str]) -> int:
    opts, command, wal_arg = _parse(argv)
    wal = Path(wal_arg)
    wal_dir, name = wal.parent, wal.name
    spool = Path(opts.spool_dir)
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    if opts.pusher:
        return Pusher(opts, command, wal_dir.resolve(), spool.resolve()).run()

    background = opts.background and opts.in_process
    if background:
        (spool / CALLED).touch()  # PostgreSQL still archives through this wrapper: the pusher stays
    if _marker_matches(spool, name, wal) or (background and SEGMENT_RE.match(name)
                                             and _wait_for_pusher(opts, argv, spool, wal)):
        # Archived ahead, and the file is the one that was archived. The pusher drops the marker once
        # PostgreSQL has marked the segment done (dropping it here would have the pusher archive it again).
        if not background:
            (spool / f"{name}.archived").unlink()
        return 0
    (spool / f"{name}.archived").unlink(missing_ok=True)

    batch = opts.batch or 2 * opts.parallel
    ahead = _ready_segments(wal_dir, name, batch - 1, spool)
    identities = {n: _identity(wal_dir / n) for n in ahead}
    names = [name, *ahead]
    archive = _archive_in_process if opts.in_process else _archive_processes
    try:
        codes = dict(zip(names, archive(command, [wal_dir / n for n in names], opts.parallel), strict=True))
    except (Exception, SystemExit) as exc:  # barman not importable, bad arguments: nothing recorded as archived
        print(f"pgops_wal_archive: archiving {name} failed before any upload: {exc}", file=sys.stderr)
        return 4
    for n in ahead:
        # Only a success is recorded, and only for the file we archived; a failure is retried by its own call.
        if codes[n] == 0 and _identity(wal_dir / n) == identities[n]:
            _write_marker(spool, n, identities[n])
        elif codes[n] != 0:
            print(f"pgops_wal_archive: archiving {n} ahead failed (exit {codes[n]}); PostgreSQL will retry it "
                  "with its own archive_command call", file=sys.stderr)
    _prune(spool, wal_dir)
    if codes[name] != 0:
        print(f"pgops_wal_archive: archive command failed for WAL segment {name} (exit {codes[name]}). "
              f"HINT: run the archive_command by hand as the postgres user: {' '.join(command)} {wal}",
              file=sys.stderr)
    return codes[name]


def _prune_done(spool: Path, wal_dir: Path) -> None:
    """Drop markers of segments PostgreSQL no longer has ready (done, recycled), and failure notes with them."""
    for entry in os.listdir(spool):
        if entry.endswith((".archived", ".failed")):
            name = entry.split(".", 1)[0]
            if not (wal_dir / "archive_status" / f"{name}.ready").exists():
                (spool / entry).unlink(missing_ok=True)


CALLED = ".called"
LOCK = ".pusher.lock"
PID = ".pusher.pid"
LOG = ".pusher.log"


def _pusher_alive(spool: Path) -> bool:
    return held_by_someone(spool, LOCK)


def _wait_for_pusher(opts: argparse.Namespace, argv: list[str], spool: Path, wal: Path) -> bool:
    """True once the pusher has archived this file; False: the caller archives it itself."""
    failed = spool / f"{wal.name}.failed"
    try:
        failed.unlink(missing_ok=True)  # this call asks again: the pusher may retry it
        if not _pusher_alive(spool):
            with open(spool / LOG, "ab") as log:
                cut = argv.index("--")
                subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv[:cut], "--pusher", "--",
                                  *argv[cut + 1:-1], str(wal.resolve())],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                 close_fds=True, cwd=os.getcwd())
    except OSError as exc:
        print(f"pgops_wal_archive: no pusher ({exc}); archiving {wal.name} in this call", file=sys.stderr)
        return False
    deadline = time.monotonic() + opts.wait_s
    started = time.monotonic()
    checked = started
    while time.monotonic() < deadline:
        if _marker_matches(spool, wal.name, wal):
            return True
        if failed.exists():
            return False
        if time.monotonic() - checked > 1:
            checked = time.monotonic()
            if not _pusher_alive(spool) and time.monotonic() - started > 10:
                return False
        time.sleep(0.005)
    return False


class Pusher:
    """Archives every ready WAL segment of one pg_wal, --parallel at a time, barman imported once."""

    def __init__(self, opts: argparse.Namespace, command: list[str], wal_dir: Path, spool: Path):
        self.opts, self.command, self.wal_dir, self.spool = opts, command, wal_dir, spool
        self.postmaster_pid = wal_dir.parent / "postmaster.pid"
        self.owner = SpoolOwner(spool, LOCK, PID)

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pgops_wal_archive[{os.getpid()}]: {msg}", flush=True)

    def run(self) -> int:
        if not self.owner.acquire():
            return 0  # another pusher runs for this spool
        try:
            return self._serve()
        except Exception as exc:  # callers archive for themselves once this lock is gone
            self.log(f"stopped: {exc!r}")
            return 1
        finally:
            self.owner.release()

    def _alive(self) -> bool:
        if not self.owner.still_ours():
            return False  # spool removed or replaced
        return not self.watch_postmaster or self.postmaster_pid.exists()

    def _unasked_s(self) -> float:
        try:
            return time.time() - (self.spool / CALLED).stat().st_mtime
        except OSError:
            return 0.0

    def _serve(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        from barman.clients import cloud_walarchive as cw

        config = cw.parse_arguments([*self.command[1:], str(self.wal_dir / "000000010000000000000001")])
        cw.configure_logging(config)
        interface = cw.get_cloud_interface(config)
        uploader = cw.CloudWalUploader(cloud_interface=interface, server_name=config.server_name,
                                       compression=config.compression, compression_level=config.compression_level)
        self.watch_postmaster = self.postmaster_pid.exists()
        self.log(f"archiving ready segments of {self.wal_dir}: {self.opts.parallel} uploads at a time")
        inflight: dict[str, object] = {}
        last_ready = last_prune = time.monotonic()

        def one(name: str, identity: str) -> None:
            uploader.upload_wal(str(self.wal_dir / name))
            if _identity(self.wal_dir / name) != identity:
                raise RuntimeError(f"{name} changed while it was archived")
            _write_marker(self.spool, name, identity)

        try:
            with ThreadPoolExecutor(max_workers=max(1, self.opts.parallel)) as pool:
                while self._alive():
                    for name, fut in list(inflight.items()):
                        if fut.done():
                            del inflight[name]
                            if fut.exception() is not None:
                                self.log(f"archiving {name} failed: {fut.exception()!r}")
                                (self.spool / f"{name}.failed").write_text(f"{fut.exception()!r}\n")
                    room = 2 * max(1, self.opts.parallel) - len(inflight)
                    todo = [] if room <= 0 else _ready_segments(self.wal_dir, "", room + len(inflight), self.spool)
                    if todo:
                        last_ready = time.monotonic()
                    for name in todo:
                        if room <= 0:
                            break
                        if name in inflight or (self.spool / f"{name}.failed").exists():
                            continue
                        try:
                            identity = _identity(self.wal_dir / name)
                        except OSError:
                            continue
                        inflight[name] = pool.submit(one, name, identity)
                        room -= 1
                    if time.monotonic() - last_prune > 1:
                        last_prune = time.monotonic()
                        _prune_done(self.spool, self.wal_dir)
                        if self._unasked_s() > self.opts.idle_s:
                            # archive_command no longer calls this wrapper (changed, or the archiver stopped)
                            self.log("no archive_command call for a while: stopping")
                            return 0
                    if inflight:
                        last_ready = time.monotonic()
                    elif time.monotonic() - last_ready > self.opts.idle_s:
                        self.log("nothing ready for a while: stopping")
                        return 0
                    time.sleep(0.02)
        finally:
            interface.close()
        self.log("PostgreSQL stopped or the spool was removed: stopping")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
