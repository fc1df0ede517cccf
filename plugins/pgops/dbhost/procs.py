"""This host: PostgreSQL's binaries, a free loopback port, whether a pid is alive, stopping one by pid."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from pathlib import Path

# Debian's PostgreSQL 15 server binaries (pg_ctl, initdb, pg_amcheck ...).
PG_BIN = Path(os.environ.get("PGOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _listen_candidates() -> list[int]:
    """Ports outside the kernel's ephemeral range, in random order.

    A port the kernel handed out with bind(0) comes from the ephemeral range, the same range outgoing
    connections take their local port from: between choosing it and the server binding it, a client
    socket (SeaweedFS's own volume -> master connections at start-up, say) can take it, and the server's
    listener then fails. Ports below (or above) that range are never given to client sockets.
    """
    lo, hi = _ephemeral_range()
    pool = list(range(20000, lo)) if lo - 20000 >= 2000 else list(range(max(hi + 1, 1024), 65536))
    if len(pool) < 2000:
        pool = list(range(10000, 65536))
    random.SystemRandom().shuffle(pool)
    return pool


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports outside the ephemeral range (held open together so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for port in _listen_candidates():
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"found only {len(socks)} of {n} free loopback ports")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False


def stop_pid(pid: int | None, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM, group: bool = False) -> None:
    """Stop one process we started (by pid, never by name); SIGKILL after the timeout."""
    if not pid_alive(pid):
        return
    kill = os.killpg if group else os.kill
    try:
        kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
