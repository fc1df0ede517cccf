#!/usr/bin/env python3
"""restore_command wrapper: one long-lived WAL prefetcher per recovery instead of a Python start per segment.

    restore_command = '[ -f SPOOL/%f ] && mv -f SPOOL/%f %p ||
                       <dbhost-venv>/bin/pgops-wal-restore --parallel 4 --spool-dir SPOOL --
                       <dbhost-venv>/bin/barman-cloud-wal-restore ... %f %p'

barman-cloud-wal-restore costs about 1 s of CPU per call (Python start and imports), prefetching or not, so
replay from the bucket ran at half the speed of replay from a local copy. Called for a segment that is not in
the spool, this script starts (once) a prefetcher in the background: barman-cloud-wal-restore's own code
(argument parser, cloud interface, compression handling) imported once, --parallel download threads keeping
the next --depth segments of the timeline in the spool. PostgreSQL's later calls find them there and the
shell moves them into place. The prefetcher follows recovery by the segments that leave the spool, stops when
recovery has not asked for anything for --idle-s seconds (or the spool is removed), and then removes what it
fetched and nobody took.

Correctness:
- a segment appears in the spool only complete: downloaded and decompressed to a hidden temporary file,
  fsynced, then renamed;
- a timeline history file is fetched by the prefetcher too (recovery asks for the next timeline's at its start
  and at its end, and a barman-cloud-wal-restore start for each cost a second); when a listing made after the
  call asked has no such file (barman's own test: the name under wals/, compression suffix aside), the call
  exits 1 as barman-cloud-wal-restore does for a file that does not exist;
- anything else (a partial segment, a segment the bucket does not have, a download error, no prefetcher)
  goes to barman-cloud-wal-restore itself with the given arguments: its answer and exit status are what
  PostgreSQL gets, exactly as without this wrapper.
Standard library only in the calling process; the prefetcher needs the DB-host venv's python (barman
importable), as barman-cloud-wal-restore does.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pgops_spool import SpoolOwner, held_by_someone, is_segment_name

HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
LOCK = ".prefetcher.lock"
PID = ".prefetcher.pid"
LOG = ".prefetcher.log"
WANTED = ".wanted"
TMP_PREFIX = ".tmp-"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], str, str]:
    if "--" not in argv:
        raise SystemExit("usage: pgops_wal_restore.py [--parallel N] --spool-dir DIR -- WAL_RESTORE_COMMAND... %f %p\n"
                         "       pgops_wal_restore.py [--parallel N] --spool-dir DIR --start SEGMENT -- "
                         "WAL_RESTORE_COMMAND...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="pgops_wal_restore.py")
    parser.add_argument("--parallel", type=int, default=4, help="download threads of the prefetcher (0: none)")
    parser.add_argument("--depth", type=int, default=0, help="segments kept ahead in the spool (default 2 x --parallel)")
    parser.add_argument("--spool-dir", required=True, help="where prefetched segments wait for PostgreSQL")
    parser.add_argument("--wait-s", type=float, default=300,
                        help="longest wait for the prefetcher's download of the asked segment")
    parser.add_argument("--idle-s", type=float, default=120, help="the prefetcher stops after this long unasked")
    parser.add_argument("--start", metavar="SEGMENT", default="",
                        help="start the prefetcher at SEGMENT (a recovery's first segment) and return at once, "
                             "so the first segments are in the spool before PostgreSQL asks for them")
    parser.add_argument("--prefetcher", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    if opts.start:
        if not is_segment_name(opts.start):
            raise SystemExit(f"pgops_wal_restore.py: --start {opts.start!r} is not a WAL segment name "
                             "(24 hexadecimal digits, e.g. 000000010000000000000003)")
        if not rest:
            raise SystemExit("pgops_wal_restore.py: give the WAL restore command after '--'")
        opts.depth = opts.depth or 2 * max(1, opts.parallel)
        return opts, rest, opts.start, ""
    if len(rest) < 3:
        raise SystemExit("pgops_wal_restore.py: give the WAL restore command, %f and %p after '--'")
    opts.depth = opts.depth or 2 * max(1, opts.parallel)
    return opts, rest[:-2], rest[-2], rest[-1]


def _fallback(command: list[str], wal_name: str, wal_dest: str) -> None:
    os.execvp(command[0], [*command, wal_name, wal_dest])


def _prefetcher_alive(spool: Path) -> bool:
    return held_by_someone(spool, LOCK)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


def _ask(spool: Path, segment: str, argv: list[str]) -> None:
    """Name ``segment`` as the one recovery wants; start the spool's prefetcher (``argv``: its options, then
    ``--`` and the command) when none runs, and wait up to 10 s for it to hold the spool. OSError when the spool
    cannot be written or the prefetcher not started."""
    spool.mkdir(parents=True, exist_ok=True)
    _write_atomic(spool / WANTED, segment)
    if not _prefetcher_alive(spool):
        with open(spool / LOG, "ab") as log:
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "--prefetcher", *argv],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
        started = time.monotonic()
        while not _prefetcher_alive(spool) and time.monotonic() - started < 10:
            time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts, command, wal_name, wal_dest = _parse(argv)
    spool = Path(opts.spool_dir)
    if opts.prefetcher:
        return Prefetcher(opts, command, spool).run()
    if opts.start:
        return _warm_start(opts, command, spool)
    history = bool(HISTORY_RE.match(wal_name))
    if opts.parallel < 1 or not (is_segment_name(wal_name) or history):
        _fallback(command, wal_name, wal_dest)
    ready, missing, absent = spool / wal_name, spool / f"{wal_name}.missing", spool / f"{wal_name}.absent"
    try:
        for answer in (missing, absent):  # before asking: the answer must be this call's
            answer.unlink(missing_ok=True)
        _ask(spool, wal_name, argv)
    except OSError as exc:
        print(f"pgops_wal_restore: no prefetcher ({exc}); asking barman-cloud-wal-restore", file=sys.stderr)
        _fallback(command, wal_name, wal_dest)
    deadline = time.monotonic() + opts.wait_s
    checked = 0.0
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                shutil.move(str(ready), wal_dest)
                return 0
            except OSError as exc:
                print(f"pgops_wal_restore: moving {ready} to {wal_dest} failed: {exc}", file=sys.stderr)
                break
        if history and absent.exists():
            # A listing made after this call asked, with barman's own test (the name under wals/, compression
            # suffix aside), found none: barman-cloud-wal-restore's answer, without its start. Recovery asks for
            # the next timeline's history at its start and again when it ends; mostly it does not exist.
            print(f"pgops_wal_restore: WAL file {wal_name} does not exist in the archive", file=sys.stderr)
            return 1
        if missing.exists():
            break  # not in the bucket (yet): barman-cloud-wal-restore gives PostgreSQL the authoritative answer
        if time.monotonic() - checked > 1:
            checked = time.monotonic()
            if not _prefetcher_alive(spool) and not ready.exists():
                break
        time.sleep(0.005)
    _fallback(command, wal_name, wal_dest)
    return 1  # not reached


def _warm_start(opts: argparse.Namespace, command: list[str], spool: Path) -> int:
    """Ask the prefetcher (started if none runs) for the recovery's first segment and return without waiting.

    PostgreSQL's first restore_command call then finds it in the spool instead of waiting for a prefetcher's
    start (Python, barman's imports, the bucket listing): on a short recovery that start was most of the gap to a
    restore_command written in C. Nothing here is needed for correctness: a spool without the segment falls
    back as always. Exit 0 when a prefetcher runs for the spool, 1 (with the reason) when none could start.
    """
    if opts.parallel < 1:
        return 0
    # the prefetcher parses the same options, with a segment and a destination it never uses
    argv = ["--parallel", str(opts.parallel), "--depth", str(opts.depth), "--spool-dir", str(spool),
            "--wait-s", str(opts.wait_s), "--idle-s", str(opts.idle_s), "--", *command, opts.start, os.devnull]
    try:
        _ask(spool, opts.start, argv)
    except OSError as exc:
        print(f"pgops_wal_restore: no prefetcher for {spool} ({exc})", file=sys.stderr)
        return 1
    if not _prefetcher_alive(spool):
        print(f"pgops_wal_restore: the prefetcher for {spool} did not start; see {spool / LOG}", file=sys.stderr)
        return 1
    return 0


class Prefetcher:
    """Keeps the next segments of the timeline recovery is on in the spool, with barman's code imported once."""

    def __init__(self, opts: argparse.Namespace, command: list[str], spool: Path):
        self.opts, self.command, self.spool = opts, command, spool
        self.listed: dict[str, tuple[float, dict[str, str]]] = {}  # wals/<dir>/ -> (when, segment -> key)
        self.fetched: set[str] = set()  # delivered to the spool by this prefetcher, not yet taken
        self.inflight: dict[str, object] = {}
        self.failed: set[str] = set()  # not fetched again unless asked for
        self.owner = SpoolOwner(spool, LOCK, PID)
        self.position = ""  # newest segment recovery asked for or took

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pgops_wal_restore[{os.getpid()}]: {msg}", flush=True)

    def run(self) -> int:
        if not self.owner.acquire():
            return 0  # another prefetcher runs for this spool
        try:
            return self._serve()
        except Exception as exc:  # the caller falls back to barman-cloud-wal-restore once this lock is gone
            self.log(f"stopped: {exc!r}")
            return 1
        finally:
            self._clean()
            self.owner.release()

    def _serve(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        from barman.clients import cloud_walrestore as cw
        from barman.cloud import ALLOWED_COMPRESSIONS

        self.compressions = ALLOWED_COMPRESSIONS
        config = cw.parse_arguments([*self.command[1:], "000000010000000000000001", "/dev/null"])
        self.interface = cw.get_cloud_interface(config)
        self.wals = os.path.join(self.interface.path, config.server_name, "wals") + "/"
        self.log(f"prefetching into {self.spool}: {self.opts.parallel} threads, {self.opts.depth} segments ahead")
        last_activity = last_window = time.monotonic()
        wanted_seen = None
        try:
            with ThreadPoolExecutor(max_workers=self.opts.parallel) as pool:
                while self.owner.still_ours():
                    activity = False
                    try:
                        wanted = (self.spool / WANTED).read_text().strip()
                        stamp = (self.spool / WANTED).stat().st_mtime_ns
                    except OSError:
                        wanted, stamp = "", None
                    if (wanted, stamp) != wanted_seen and HISTORY_RE.match(wanted):
                        wanted_seen, activity = (wanted, stamp), True
                        if wanted not in self.inflight and not (self.spool / wanted).exists():
                            key = self._history_key(wanted)
                            if key is None:
                                _write_atomic(self.spool / f"{wanted}.absent", "")
                            else:
                                self.fetched.discard(wanted)
                                self.inflight[wanted] = pool.submit(self._download, wanted, key)
                    elif (wanted, stamp) != wanted_seen and is_segment_name(wanted):
                        # asked for by PostgreSQL: needed now, so everything before it was taken
                        wanted_seen, activity = (wanted, stamp), True
                        self._advance(wanted, asked=True)
                        if wanted not in self.inflight and not (self.spool / wanted).exists():
                            key = self._key(wanted, True)
                            if key is None:
                                _write_atomic(self.spool / f"{wanted}.missing", "")
                            else:
                                self.fetched.discard(wanted)
                                self.failed.discard(wanted)
                                self.inflight[wanted] = pool.submit(self._download, wanted, key)
                    for name in [n for n in self.fetched if not (self.spool / n).exists()]:
                        self.fetched.discard(name)  # taken by PostgreSQL
                        if is_segment_name(name):
                            self._advance(name)
                        activity = True
                    for name, fut in list(self.inflight.items()):
                        if fut.done():
                            del self.inflight[name]
                            activity = True
                            if fut.exception() is None:
                                self.fetched.add(name)
                            else:
                                self.log(f"download of {name} failed: {fut.exception()!r}")
                                self.failed.add(name)
                                # whoever waits for it asks barman-cloud-wal-restore instead
                                _write_atomic(self.spool / f"{name}.missing", "")
                    if activity or time.monotonic() - last_window > 1:
                        last_window = time.monotonic()
                        for name in self._window():
                            if name not in self.fetched and name not in self.inflight and name not in self.failed \
                                    and not (self.spool / name).exists():
                                self.inflight[name] = pool.submit(self._download, name, self._key(name, False))
                                activity = True
                    if activity:
                        last_activity = time.monotonic()
                    elif time.monotonic() - last_activity > self.opts.idle_s and not self.inflight:
                        self.log("recovery asked for nothing for a while: stopping")
                        return 0
                    time.sleep(0.02)
        finally:
            self.interface.close()
        self.log("spool removed or replaced: stopping")
        return 0

    def _advance(self, name: str, asked: bool = False) -> None:
        if name[:8] != self.position[:8]:
            # a new timeline: segments fetched for the old one will not be asked for
            for old in [n for n in self.fetched if n[:8] != name[:8]]:
                (self.spool / old).unlink(missing_ok=True)
                self.fetched.discard(old)
            self.position = name
        elif asked or name > self.position:
            self.position = name

    def _dir_keys(self, directory: str, fresh: bool) -> dict[str, str]:
        when, keys = self.listed.get(directory, (0.0, {}))
        if fresh and time.monotonic() - when > 0.5 or directory not in self.listed:
            keys = {}
            for key in self.interface.list_bucket(self.wals + directory + "/"):
                base = os.path.basename(key)
                for ext in self.compressions:
                    if base.endswith(ext):
                        base = base[:-len(ext)]
                        break
                if is_segment_name(base):
                    keys[base] = key
            self.listed[directory] = (time.monotonic(), keys)
        return keys

    def _history_key(self, name: str) -> str | None:
        """The key of a timeline history file, from a listing made now (history files sit in wals/ itself)."""
        for key in self.interface.list_bucket(self.wals + name):
            base = os.path.basename(key)
            for ext in self.compressions:
                if base.endswith(ext):
                    base = base[:-len(ext)]
                    break
            if base == name:
                return key
        return None

    def _key(self, name: str, fresh: bool) -> str | None:
        return self._dir_keys(name[:16], fresh).get(name)

    def _window(self) -> list[str]:
        """The next --depth segments after the position that the bucket has: what the spool should hold."""
        out: list[str] = []
        if not self.position:
            return out
        directory = self.position[:16]
        for _ in range(2):  # this directory, then the next one (segments wrap into the next log file)
            for name in sorted(n for n in self._dir_keys(directory, False) if n > self.position):
                out.append(name)
                if len(out) >= self.opts.depth:
                    return out
            directory = f"{directory[:8]}{int(directory[8:], 16) + 1:08X}"
        return out

    def _download(self, name: str, key: str | None) -> None:
        if key is None:
            raise FileNotFoundError(name)
        compression = next((c for ext, c in self.compressions.items() if key.endswith(ext)), None)
        tmp = self.spool / f"{TMP_PREFIX}{name}"
        try:
            self.interface.download_file(key, str(tmp), compression)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            tmp.replace(self.spool / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never a partial segment where the shell could take it
            raise

    def _clean(self) -> None:
        if not self.owner.still_ours():
            return  # a new spool in its place belongs to someone else
        # fetched, and in flight when it was told to stop (the pool finished those downloads before this runs)
        for name in set(self.fetched) | set(self.inflight):
            (self.spool / name).unlink(missing_ok=True)
        try:
            for entry in os.listdir(self.spool):
                if entry.startswith(TMP_PREFIX) or entry.endswith((".missing", ".absent")):
                    (self.spool / entry).unlink(missing_ok=True)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
