"""Restore verification core (pure): recovery targets and settings, server-log reading, disk and RTO arithmetic.

Plain values in, plain values out: no Airflow, no network, no processes.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgops.core.reports import parse_ts

TARGET_KINDS = ("latest", "canary", "time", "lsn", "xid")
CHECKS = ("canary", "system_identifier", "amcheck", "sql")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
# Room for WAL replayed into pg_wal and the restore_command spool on top of the data directory.
DISK_MARGIN_RATIO = 0.10
DISK_MARGIN_BYTES = 256 * 1024 * 1024


class RestorePlanError(ValueError):
    """A bad request (target, backup id, params): retrying will not help."""


# -- recovery target ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RecoveryTarget:
    kind: str  # latest | time | lsn | xid ("canary" resolves to xid or time of the canary row)
    value: str | None = None

    def settings(self) -> dict[str, str]:
        if self.kind == "latest":
            return {}
        name = {"time": "recovery_target_time", "lsn": "recovery_target_lsn", "xid": "recovery_target_xid"}[self.kind]
        return {name: str(self.value), "recovery_target_inclusive": "on"}

    def describe(self) -> str:
        return "the end of the archived WAL" if self.kind == "latest" else f"{self.kind} {self.value}"


def parse_target(text: str | None) -> tuple[str, str | None]:
    """The user's target param: ('latest'|'canary', None), ('time', iso) or ('lsn', 'X/Y')."""
    raw = (text or "latest").strip()
    low = raw.lower()
    if low in ("latest", "canary"):
        return low, None
    if LSN_RE.match(raw):
        return "lsn", raw.upper()
    try:
        ts = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise RestorePlanError(f"restore target {raw!r} is not 'latest', 'canary', an LSN like 0/3000060 or an ISO "
                               "timestamp like 2024-05-01T13:45:00+00:00. Fix: correct the 'target' param") from None
    if ts.tzinfo is None:
        raise RestorePlanError(f"restore target {raw!r} has no time zone, so it is ambiguous. Fix: add +00:00 (or Z)")
    return "time", ts.isoformat()


def resolve_target(kind: str, value: str | None, *, canary: dict[str, Any] | None,
                   canary_mode: str = "xid") -> RecoveryTarget:
    """Turn the user's target into PostgreSQL's: 'canary' becomes the canary transaction's xid (or commit time)."""
    if kind == "canary":
        if not canary:
            raise RestorePlanError("target 'canary' needs the canary task's row, and there is none. "
                                   "Fix: check the canary task, or give a timestamp, an LSN or 'latest'")
        if canary_mode == "time":
            return RecoveryTarget(kind="time", value=str(canary["committed_at"]))
        return RecoveryTarget(kind="xid", value=str(canary["xid"]))
    if kind not in TARGET_KINDS:
        raise RestorePlanError(f"unknown target kind {kind!r}")
    return RecoveryTarget(kind=kind, value=value)


def target_time(target: RecoveryTarget, canary: dict[str, Any] | None) -> datetime | None:
    """The wall-clock moment a target stands for, when known (to pick a backup that ends before it)."""
    if target.kind == "time":
        return parse_ts(target.value)
    if target.kind == "xid" and canary:
        return parse_ts(canary.get("committed_at"))
    return None


# -- backup choice and disk ----------------------------------------------------------------------
def choose_backup(catalog: Sequence[Any], requested: str, *, before: datetime | None = None) -> Any:
    """The backup to restore: a given id/name, or for 'latest' the newest DONE one that ended before the target."""
    done = [b for b in catalog if b.status == "DONE"]
    if requested.lower() not in ("latest", "last"):
        for b in catalog:
            if requested in (b.backup_id, b.backup_name):
                if b.status != "DONE":
                    raise RestorePlanError(f"backup {requested} has status {b.status}"
                                           f"{': ' + b.error if getattr(b, 'error', None) else ''}; only DONE backups "
                                           "can be restored. Fix: pick another backup id or 'latest'")
                return b
        known = ", ".join(b.backup_id for b in done[-5:]) or "none"
        raise RestorePlanError(f"backup {requested!r} is not in the catalog (newest DONE: {known}). "
                               "Fix: give a backup id from barman-cloud-backup-list or 'latest'")
    if not done:
        raise RestorePlanError("the catalog has no DONE backup to restore. Fix: run the base-backup DAG first")
    candidates = sorted(done, key=lambda b: (parse_ts(b.end_time) or datetime.min.replace(tzinfo=UTC), b.backup_id))
    if before is not None:
        usable = [b for b in candidates if (parse_ts(b.end_time) or before) < before]
        if not usable:
            raise RestorePlanError(f"no DONE backup ended before the target {before.isoformat()} (oldest ends "
                                   f"{candidates[0].end_time}). Fix: choose a later target")
        candidates = usable
    return candidates[-1]


def required_bytes(cluster_size_bytes: int | None) -> int:
    """Free space a restore needs: the data directory plus a margin for replayed WAL and the spool."""
    size = cluster_size_bytes or 0
    return int(size * (1 + DISK_MARGIN_RATIO)) + DISK_MARGIN_BYTES


def parse_df_avail(stdout: str) -> int:
    """Bytes available from `df -B1 --output=avail PATH`."""
    lines = [line.strip() for line in stdout.strip().splitlines() if line.strip()]
    try:
        return int(lines[-1])
    except (IndexError, ValueError):
        raise ValueError(f"unexpected df output: {stdout[:200]!r}") from None


def disk_shortfall(*, avail_bytes: int, needed_bytes: int, path: str, backup_id: str) -> str | None:
    if avail_bytes >= needed_bytes:
        return None
    return (f"restore host has {human_bytes(avail_bytes)} ({avail_bytes} bytes) free in {path} but backup {backup_id} "
            f"needs {human_bytes(needed_bytes)} ({needed_bytes} bytes). Fix: free space, point the scratch area at a "
            "bigger volume, or restore on another host")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- scratch instance settings -------------------------------------------------------------------
def scratch_name(dag_id: str, run_id: str) -> str:
    """A directory name derived from the run, so a retry or a cleared run finds what an earlier try left.

    Short on purpose: the unix socket inside it must fit PostgreSQL's 107-byte socket path limit.
    """
    import hashlib

    return "rv-" + hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:16]


UNIX_SOCKET_PATH_MAX = 107


def socket_path_problem(socket_dir: str) -> str | None:
    path = f"{socket_dir}/.s.PGSQL.65535"
    if len(path.encode()) <= UNIX_SOCKET_PATH_MAX:
        return None
    return (f"the scratch instance's socket path {path} is {len(path.encode())} bytes, over the {UNIX_SOCKET_PATH_MAX}-byte "
            "limit of unix sockets. Fix: use a shorter scratch_root")


def restore_command(wal_restore_argv: Sequence[str]) -> str:
    """restore_command: the WAL restore argv (wal_restore_argv) plus PostgreSQL's %f %p."""
    argv = [str(a) for a in wal_restore_argv]
    command = shlex.join(argv) + " %f %p"
    if "--spool-dir" in argv[:-1]:
        # A prefetched segment is moved out of the spool by the shell, without a Python start per segment;
        # anything else (or a failed move) goes to the command.
        spool = shlex.quote(argv[argv.index("--spool-dir") + 1] + "/")
        return f"[ -f {spool}%f ] && mv -f {spool}%f %p || {command}"
    return command


def recovery_settings(*, restore_command: str, target: RecoveryTarget, port: int, socket_dir: str,
                      hba_file: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Settings appended to the restored postgresql.auto.conf (read last, so they win over the primary's)."""
    settings = {
        "restore_command": restore_command,
        **target.settings(),
        "recovery_target_action": "promote",
        # A restored copy inherits the primary's archive_command: it must never write into the primary's prefix.
        "archive_mode": "off",
        "archive_command": "",
        "archive_cleanup_command": "",
        "recovery_end_command": "",
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": socket_dir,
        "unix_socket_permissions": "0700",
        "hba_file": hba_file,
        "hot_standby": "on",
        "synchronous_standby_names": "",
        "primary_conninfo": "",
        "primary_slot_name": "",
        "logging_collector": "off",
        "log_destination": "stderr",
        "log_line_prefix": "%m [%p] ",
        "cluster_name": "pgops-restore-verify",
    }
    settings.update(extra or {})
    return settings


_GUC_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.]{0,62}$")


def render_conf(settings: dict[str, str], header: str = "pgops restore verification") -> str:
    """postgresql.conf lines; names must be plain GUC names and values one line (quotes and backslashes escaped)."""
    lines = [f"\n# {header}: these lines override the primary's settings\n"]
    for key, value in settings.items():
        text = str(value)
        if not _GUC_NAME_RE.match(key) or any(c in text for c in "\n\r\0"):
            raise ValueError(f"setting {key!r} = {text!r} cannot be written to a config file: a name must be a plain "
                             "setting name and a value one line")
        text = text.replace("\\", "\\\\").replace("'", "''")
        lines.append(f"{key} = '{text}'\n")
    return "".join(lines)


SCRATCH_HBA = (
    "# pgops restore verification: local socket only (the socket directory is 0700), loopback with passwords\n"
    "local all all trust\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
)


# -- server log ----------------------------------------------------------------------------------
_LOG_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?) ?([A-Z]{2,5}|[+-]\d{2})?")
_RESTORED_RE = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
_MISSING_RE = re.compile(r"WAL file ([0-9A-F]{24}) for server \S+ does not exist")
_LEVEL_RE = re.compile(r"\b(FATAL|PANIC):\s+(.*)$")
TARGET_NOT_REACHED = "recovery ended before configured recovery target was reached"
# FATALs a client connection gets while the server starts or recovers: our own polling, not a failure.
_BENIGN_FATAL = ("the database system is starting up", "the database system is not yet accepting connections",
                 "consistent recovery state has not been yet reached", "the database system is shutting down",
                 "the database system is not accepting connections", "terminating connection due to administrator command",
                 "the database system is in recovery mode")


_REPLAY_LSN_RE = re.compile(r"(?:redo starts at|current LSN:|consistent recovery state reached at|redo done at) "
                            r"([0-9A-F]{1,8}/[0-9A-F]{1,8})\b")


@dataclass
class ServerLog:
    fatal: list[str] = field(default_factory=list)
    restored_segments: list[str] = field(default_factory=list)
    missing_segments: list[str] = field(default_factory=list)
    target_not_reached: bool = False
    recovery_stop: str | None = None
    started_at: str | None = None
    ready_at: str | None = None
    archive_recovery_complete: bool = False
    # the latest WAL position the server's own log names (redo starts at / redo in progress / consistent
    # recovery state reached at / redo done at): the replay progress before it accepts connections
    replay_lsn: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.fatal)

    def missing_needed(self) -> str | None:
        """The segment whose absence ended recovery: the first one asked for and missing after the last restored."""
        last = self.restored_segments[-1] if self.restored_segments else ""
        later = [s for s in self.missing_segments if s > last]
        return later[0] if later else (self.missing_segments[0] if self.missing_segments else None)

    def failure_message(self) -> str:
        parts = [f"PostgreSQL: {line}" for line in dict.fromkeys(self.fatal)]
        missing = self.missing_needed()
        if self.target_not_reached and missing:
            last = self.restored_segments[-1] if self.restored_segments else "none"
            parts.append(f"WAL segment {missing} is missing from the archive (last segment restored: {last}); the "
                         "recovery target lies beyond it. Fix: find out why it was not archived or was deleted "
                         "(pg_stat_archiver, lifecycle rules); PITR past this point is impossible, and a new base "
                         "backup is needed to protect the time after it")
        elif missing and not self.restored_segments:
            parts.append(f"WAL segment {missing} was not found in the archive")
        return "; ".join(parts)


def parse_server_log(text: str) -> ServerLog:
    out = ServerLog()
    for line in text.splitlines():
        ts = _LOG_TS_RE.match(line)
        if ts and out.started_at is None:
            out.started_at = ts.group(0).strip()
        m = _RESTORED_RE.search(line)
        if m:
            out.restored_segments.append(m.group(1))
            continue
        m = _MISSING_RE.search(line)
        if m:
            out.missing_segments.append(m.group(1))
            continue
        if TARGET_NOT_REACHED in line:
            out.target_not_reached = True
        if "recovery stopping " in line:
            out.recovery_stop = line.split("recovery stopping ", 1)[1].strip()
        if "archive recovery complete" in line:
            out.archive_recovery_complete = True
        m = _REPLAY_LSN_RE.search(line)
        if m:
            out.replay_lsn = m.group(1)
        if "database system is ready to accept connections" in line and ts and out.archive_recovery_complete:
            out.ready_at = ts.group(0).strip()
        m = _LEVEL_RE.search(line)
        if m and not any(b in m.group(2) for b in _BENIGN_FATAL):
            out.fatal.append(f"{m.group(1)}: {m.group(2).strip()}")
    return out


def log_timestamp(text: str | None) -> datetime | None:
    """A '%m' log prefix ('2024-05-01 13:45:00.123 UTC') as an aware datetime."""
    if not text:
        return None
    m = _LOG_TS_RE.match(text)
    if not m:
        return None
    ts = datetime.fromisoformat(m.group(1))
    zone = m.group(2)
    if zone in (None, "UTC", "GMT", "Z"):
        return ts.replace(tzinfo=UTC)
    return None  # a named local zone: unknown offset, so no measurement rather than a wrong one


# -- RTO trend -----------------------------------------------------------------------------------
MIN_RESTORES = 3  # restores of different sizes behind a forecast
MIN_SIZE_STEP = 0.10  # sizes count as different when at least 10% apart
NOT_ENOUGH_DATA = "not_enough_data"


@dataclass(frozen=True, kw_only=True)
class RtoTrend:
    """RTO = fixed_s + seconds_per_gib * size, fitted on verified restores, and its forecast at the horizon.

    status "ok" only with at least MIN_RESTORES restores of MIN_RESTORES different sizes and a positive per-GiB
    cost; otherwise NOT_ENOUGH_DATA with the reason, and no number at all (no extrapolation from one point).
    """

    points: int
    seconds_per_gib: float | None = None
    intercept_s: float | None = None  # the fixed cost (download set-up, start, replay of the last WAL)
    growth_bytes_per_day: float | None = None
    projected_rto_s: float | None = None
    horizon_days: int = 0
    days_until_target: float | None = None
    warning: str | None = None
    status: str = NOT_ENOUGH_DATA
    reason: str | None = None
    distinct_sizes: int = 0
    size_min_bytes: int | None = None  # the fitted range: the smallest and largest restored size
    size_max_bytes: int | None = None
    size_now_bytes: int | None = None  # the newest restore's size
    projected_size_bytes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(slope, intercept) of the least-squares line, or None when the xs do not vary."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def distinct_sizes(sizes: Sequence[float], step: float = MIN_SIZE_STEP) -> int:
    """How many different sizes: sorted, a size starts a new one when over the last one's start by more than step."""
    count, start = 0, None
    for size in sorted(sizes):
        if start is None or size > start * (1 + step):
            count, start = count + 1, size
    return count


def rto_trend(history: Sequence[dict[str, Any]], *, target_s: float, horizon_days: int,
              min_points: int = MIN_RESTORES) -> RtoTrend:
    """Fit RTO = fixed + per-GiB cost on the restores and size against time; warn when the forecast crosses the target.

    ``history`` items: {"at": datetime, "size_bytes": int, "rto_s": float} (this run included).
    """
    pts = [p for p in history if p.get("size_bytes") and p.get("rto_s") is not None and p.get("at") is not None]
    pts.sort(key=lambda p: p["at"])
    sizes = [float(p["size_bytes"]) for p in pts]
    rtos = [float(p["rto_s"]) for p in pts]
    distinct = distinct_sizes(sizes)
    known = {"points": len(pts), "horizon_days": horizon_days, "distinct_sizes": distinct,
             "size_min_bytes": int(min(sizes)) if sizes else None, "size_max_bytes": int(max(sizes)) if sizes else None,
             "size_now_bytes": int(sizes[-1]) if sizes else None}
    if len(pts) < min_points or distinct < min_points:
        return RtoTrend(**known, reason=(
            f"{len(pts)} verified restore(s) of {distinct} different size(s); a forecast needs {min_points} restores of "
            f"{min_points} sizes at least {MIN_SIZE_STEP:.0%} apart"))
    slope, intercept = _least_squares(sizes, rtos)  # the sizes vary: distinct >= 3
    if slope <= 0:
        return RtoTrend(**known, reason=(
            f"the {len(pts)} restores do not take longer when larger (fitted {slope * 2**30:.1f} s per GiB): "
            "their times are noise for a forecast"))
    if intercept < 0:  # a fixed cost below zero is meaningless: the per-GiB cost alone, through the origin
        slope, intercept = sum(x * y for x, y in zip(sizes, rtos, strict=True)) / sum(x * x for x in sizes), 0.0
    t0 = pts[0]["at"]
    growth = _least_squares([(p["at"] - t0).total_seconds() / 86400 for p in pts], sizes)
    growth_per_day = growth[0] if growth is not None else 0.0
    now_size = sizes[-1]
    size_h = now_size + max(growth_per_day, 0.0) * horizon_days
    projected = intercept + slope * size_h
    days_until = None
    if growth_per_day > 0:
        size_at_target = (target_s - intercept) / slope
        days_until = max(0.0, (size_at_target - now_size) / growth_per_day)
    warning = None
    if projected > target_s:
        when = f"in about {days_until:.0f} days" if days_until is not None and math.isfinite(days_until) else "soon"
        warning = (f"RTO is projected to reach {projected:.0f} s within {horizon_days} days (target {target_s:.0f} s; "
                   f"crossing {when}) at the current growth of {human_bytes(growth_per_day)}/day and "
                   f"{intercept:.0f} s + {slope * 2**30:.1f} s per GiB. Fix: plan for it (faster restore host, parallel "
                   "download, smaller database, or a revised target)")
    return RtoTrend(**known, seconds_per_gib=slope * 2**30, intercept_s=intercept, growth_bytes_per_day=growth_per_day,
                    projected_rto_s=projected, days_until_target=days_until, warning=warning, status="ok",
                    projected_size_bytes=size_h)


def report_status(*, failed: bool, rto_s: float | None, rto_target_s: float, trend_warning: str | None) -> str:
    if failed:
        return "failed"
    if rto_s is not None and rto_s > rto_target_s:
        return "critical"
    if trend_warning:
        return "warning"
    return "ok"


def history_points(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """RTO history from earlier restore-verify reports (verified runs only)."""
    out = []
    for r in reports:
        body = r.get("body") or {}
        m = body.get("measurements") or {}
        at = parse_ts(r.get("finished_at"))
        if r.get("status") != "failed" and m.get("database_size_bytes") and m.get("rto_s") is not None and at:
            out.append({"at": at, "size_bytes": m["database_size_bytes"], "rto_s": m["rto_s"]})
    return out
