"""What the DB-host helpers (pgops_wal_archive.py's pusher, pgops_wal_restore.py's prefetcher) share: one
long-lived process per spool directory, found through an exclusive lock on a file in it, and a log that
cannot grow without bound.

Standard library only, and none of it that an interpreter start has not loaded already (no pathlib): the
archive_command wrapper imports this module once per WAL segment. Paths are str or os.PathLike.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

_HEX_UPPER = frozenset("0123456789ABCDEF")


def is_segment_name(name: str) -> bool:
    """A WAL segment's file name: 24 upper-case hex digits (not a .history, .backup or .partial file). Without re
    (the archive call loads none; re's $ would also take a trailing newline): every DB-host tool checks names so."""
    return len(name) == 24 and _HEX_UPPER.issuperset(name)


def held_by_someone(spool: str | os.PathLike, lock_name: str) -> bool:
    """True while a process holds the spool's lock (the helper runs); the probe holds it for an instant."""
    try:
        fd = os.open(os.path.join(spool, lock_name), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this probe may have taken
    return False


class SpoolOwner:
    """The lock of a spool, held for a helper's whole life, and its pid file (stop it by that pid)."""

    def __init__(self, spool: str | os.PathLike, lock_name: str, pid_name: str):
        self.spool, self.lock_name, self.pid_name = spool, lock_name, pid_name
        self.fd: int | None = None
        self.inode: int | None = None

    def acquire(self) -> bool:
        """Take the lock (a probe may hold it for an instant); False when another helper has it."""
        fd = os.open(os.path.join(self.spool, self.lock_name), os.O_RDWR | os.O_CREAT, 0o600)
        for _attempt in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.01)
        else:
            os.close(fd)
            return False
        self.fd, self.inode = fd, os.fstat(fd).st_ino
        import signal  # here, not at the top: signal loads enum, and the archive_command call never needs it

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped by pid: clean up as on idle
        tmp = os.path.join(self.spool, f".tmp-{self.pid_name}")
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, os.path.join(self.spool, self.pid_name))
        return True

    def still_ours(self) -> bool:
        """False once the spool is removed or replaced by a new one (its lock file is another file)."""
        try:
            return self.inode is not None and os.stat(os.path.join(self.spool, self.lock_name)).st_ino == self.inode
        except OSError:
            return False

    def release(self) -> None:
        """Drop the pid file and the lock; a second call does nothing (the next owner's pid file stays)."""
        if self.fd is None:
            return
        if self.still_ours():
            try:
                os.unlink(os.path.join(self.spool, self.pid_name))
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd, self.inode = None, None


def rotate_log(path: str | os.PathLike, cap_bytes: int) -> bool:
    """Move a log past cap_bytes to <log>.1 (replacing the older one); True when it did."""
    try:
        if os.stat(path).st_size <= cap_bytes:
            return False
        os.replace(path, os.fspath(path) + ".1")
        return True
    except OSError:
        return False


class CappedLog:
    """A helper's stdout and stderr (fds 1 and 2, so barman's logging and tracebacks too) in one file that is
    moved to <file>.1 once it passes cap_bytes: at most about twice the cap on disk, however long it runs."""

    def __init__(self, path: str | os.PathLike, cap_bytes: int):
        self.path, self.cap_bytes = path, cap_bytes

    def attach(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def check(self) -> None:
        """Rotate when full (cheap: one stat); call it now and then."""
        sys.stdout.flush()
        sys.stderr.flush()
        if rotate_log(self.path, self.cap_bytes):
            try:
                self.attach()
            except OSError:
                pass  # the spool is gone: the helper stops on its own
