"""Dashboard builders: plain report dicts in, plain view dicts out (no Airflow, no I/O).

- `fleet_row`: one cluster at a glance, coloured green / amber / red with the reasons, worst first.
- `timeline`: the recovery window over the last N days (backups as points, WAL coverage as bars, gaps and
  the times no backup can reach marked).
- `rto_series`: measured RTO against database size, the least-squares trend and the target.
- `migration_view`: the rounds of an EBS migration, the floor, each decision, the cutover downtime.

Inputs are the report envelopes of `pgops.core.reports` (kinds wal-audit, restore-verify, ebs-migration) and the
extra of backup asset events; every field is optional, because a report of an older schema, or one written
by a run that failed half-way, must still render.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pgops.core import wal
from pgops.core.reports import parse_ts

GREEN, AMBER, RED = "green", "amber", "red"
MIN_SPAN = timedelta(minutes=30)  # the recovery-window chart never spans less
MIN_PAD = timedelta(minutes=2)  # room left of the first mark
_RANK = {GREEN: 0, AMBER: 1, RED: 2}
DAY_S = 86400.0


# --- small helpers ------------------------------------------------------------------------------------


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def num(value: Any) -> float | None:
    """A report's number, or None when it is not a finite int or float (a report is data from the bucket)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def human_duration(seconds: float | None) -> str:
    seconds = num(seconds)
    if seconds is None:
        return "unknown"
    s = abs(float(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 90:
        return f"{sign}{s:.0f} s"
    if s < 5400:
        return f"{sign}{s / 60:.0f} min"
    if s < 2 * DAY_S:
        return f"{sign}{s / 3600:.1f} h"
    return f"{sign}{s / DAY_S:.1f} days"


def human_bytes(n: float | None) -> str:
    n = num(n)
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def worst(colours: Iterable[str]) -> str:
    out = GREEN
    for c in colours:
        if _RANK[c] > _RANK[out]:
            out = c
    return out


def _body(report: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((report or {}).get("body") or {})


def _age_s(ts: datetime | None, now: datetime) -> float | None:
    return None if ts is None else (now - ts).total_seconds()


# --- fleet row ----------------------------------------------------------------------------------------


_Say = Callable[[str, str], None]  # say(colour, reason)


def fleet_row(
    cluster: str,
    *,
    now: datetime,
    audit: Mapping[str, Any] | None,
    restore: Mapping[str, Any] | None = None,
    migration: Mapping[str, Any] | None = None,
    backup_event: Mapping[str, Any] | None = None,
    restores: Sequence[Mapping[str, Any]] | None = None,
    rto_target_s: float = 3600,
    rpo_target_s: float = 300,
    backup_interval_s: float | None = DAY_S,
    audit_interval_s: float | None = 3600,
    restore_interval_s: float | None = DAY_S,
) -> dict[str, Any]:
    """One cluster at a glance: what can be restored, when it was last proven, and the colour with why.

    ``backup_event`` is the extra of the newest backup asset event (it may be newer than the last audit).
    ``restores``: the restore-verify reports behind the RTO forecast, the same ones the cluster page's chart
    uses (`rto_series`), so both show the same figure; None: only the latest (which is not enough for one).
    """
    reasons: list[dict[str, str]] = []

    def say(colour: str, text: str) -> None:
        reasons.append({"colour": colour, "text": text})

    a = _body(audit)
    newest_backup = _newest_backup(a, backup_event, now)
    backup_age = newest_backup["age_s"] if newest_backup else None
    audit_age = _age_s(parse_ts((audit or {}).get("finished_at")), now)
    days_until_loss, loss_by = _audit_reasons(audit, a, audit_age=audit_age, audit_interval_s=audit_interval_s,
                                              say=say)
    _backup_reasons(audit, backup_age=backup_age, backup_interval_s=backup_interval_s,
                    days_until_loss=days_until_loss, loss_by=loss_by, say=say)
    restore_row = _restore_row(restore, now=now, rto_target_s=rto_target_s, rpo_target_s=rpo_target_s,
                               restore_interval_s=restore_interval_s, say=say)
    forecast = rto_forecast(restores if restores is not None else [restore] if restore is not None else [],
                            target_s=rto_target_s)
    if forecast["over_target"] and restore_row and restore_row["passed"]:
        when = (f" in about {forecast['days_until_target']:.0f} days"
                if forecast.get("days_until_target") is not None else "")
        say(AMBER, f"RTO forecast {human_duration(forecast['projected_rto_s'])} within "
                   f"{forecast['horizon_days']} days crosses the target {human_duration(rto_target_s)}{when}")

    colour = worst(x["colour"] for x in reasons)
    reasons.sort(key=lambda x: -_RANK[x["colour"]])
    if not reasons:
        reasons.append({"colour": GREEN, "text": _all_clear(backup_age, restore_row)})
    window = a.get("recoverable_window")
    counts = a.get("counts") or {}
    return {
        "cluster": cluster, "colour": colour, "reason": reasons[0]["text"], "reasons": reasons,
        "newest_backup": newest_backup,
        "window": ({"earliest_time": window.get("earliest_time"), "latest_time": window.get("latest_time"),
                    "earliest_backup_id": window.get("earliest_backup_id"),
                    "latest_segment": window.get("latest_segment"), "latest_lsn": window.get("latest_lsn")}
                   if window else None),
        "findings": {"critical": int(counts.get("critical", 0)), "warning": int(counts.get("warning", 0))},
        "audit": ({"finished_at": audit.get("finished_at"), "age_s": audit_age, "status": audit.get("status"),
                   "run_id": audit.get("run_id")} if audit else None),
        "restore": restore_row, "rto_forecast": forecast, "days_until_loss": days_until_loss,
        "migration": _migration_row(migration), "replication": replication_view(a),
    }


def _newest_backup(a: Mapping[str, Any], backup_event: Mapping[str, Any] | None,
                   now: datetime) -> dict[str, Any] | None:
    """The audit's newest finished backup, unless a later backup event says more; with its age."""
    backups = [b for b in a.get("backups") or [] if b.get("end_time")]
    done = [b for b in backups if str(b.get("status", "DONE")).upper() == "DONE"]
    newest = max(done, key=lambda b: parse_ts(b["end_time"]), default=None)
    newest_backup = None
    if newest:
        newest_backup = {"backup_id": newest.get("backup_id"), "time": newest.get("end_time"),
                         "status": newest.get("status"), "size_bytes": newest.get("size_bytes")}
    elif (a.get("freshness") or {}).get("newest_backup_time"):
        newest_backup = {"backup_id": None, "time": a["freshness"]["newest_backup_time"], "status": "DONE",
                         "size_bytes": None}
    if backup_event and backup_event.get("end_time"):
        ev_t = parse_ts(backup_event["end_time"])
        if newest_backup is None or (ev_t and ev_t > parse_ts(newest_backup["time"])):
            newest_backup = {"backup_id": backup_event.get("backup_id"), "time": backup_event["end_time"],
                             "status": backup_event.get("status"),
                             "size_bytes": backup_event.get("cluster_size_bytes") or backup_event.get("stored_bytes")}
    if newest_backup:
        newest_backup["age_s"] = _age_s(parse_ts(newest_backup["time"]), now)
    return newest_backup


def _audit_reasons(audit: Mapping[str, Any] | None, a: Mapping[str, Any], *, audit_age: float | None,
                   audit_interval_s: float | None, say: _Say) -> tuple[float | None, str | None]:
    """Is the audit there and fresh, what does it find, what window does it prove.

    Returns the days until the newest recoverable backup is lost (counted on since the audit) and by what.
    """
    if audit is None:
        say(AMBER, "no WAL audit report yet: recoverability is unknown (run the pgops_wal_audit DAG)")
        return None, None
    if audit_interval_s and audit_age is not None and audit_age > 2 * audit_interval_s + 600:
        say(AMBER, f"the WAL audit report is {human_duration(audit_age)} old (audit every "
                   f"{human_duration(audit_interval_s)}): the figures below may be out of date")
    findings = a.get("findings") or []
    for f in findings:
        if f.get("severity") == "critical":
            say(RED, f"{f.get('id')}: {f.get('message')}")
    for f in findings:
        if f.get("severity") == "warning":
            say(AMBER, f"{f.get('id')}: {f.get('message')}")
    if audit.get("status") == "failed":
        say(RED, "the last WAL audit failed to run: recoverability is unknown")
    if not a.get("recoverable_window") and audit.get("status") != "failed":
        say(RED, "no recoverable window: no backup can be restored and rolled forward")
    lifecycle = a.get("lifecycle") or {}
    left = num(lifecycle.get("days_until_last_backup_expires"))
    if left is None:
        for f in findings:
            if f.get("id") in ("BACKUPS_STOPPED", "LIFECYCLE_DAYS_UNTIL_LOSS"):
                left = num((f.get("evidence") or {}).get("days_until_last_backup_expires"))
                if left is not None:
                    break
    if left is None or audit_age is None:
        return None, None
    days_until_loss = max(left - audit_age / DAY_S, 0.0)  # the countdown went on since the audit
    loss = lifecycle.get("days_until_loss") if isinstance(lifecycle.get("days_until_loss"), Mapping) else {}
    rules = [x for x in loss.get("rules") or [] if isinstance(x, Mapping)]
    loss_by = (f"lifecycle rule {rules[0].get('rule_id')} expires "
               f"{' and '.join(str(e) for e in rules[0].get('expires') or [])}" if rules else "by lifecycle")
    return days_until_loss, loss_by


def _backup_reasons(audit: Mapping[str, Any] | None, *, backup_age: float | None, backup_interval_s: float | None,
                    days_until_loss: float | None, loss_by: str | None, say: _Say) -> None:
    """Backups stopped or overdue, judged now (the audit may be hours old)."""
    if backup_age is None:
        if audit is not None:
            say(RED, "no finished base backup: nothing can be restored")
    elif backup_interval_s:
        if backup_age > 2 * backup_interval_s:
            loss = (f"; the newest recoverable backup becomes unrecoverable in {days_until_loss:.1f} days "
                    f"({loss_by})" if days_until_loss is not None else "")
            say(RED, f"backups have stopped: the newest base backup is {human_duration(backup_age)} old "
                     f"(one every {human_duration(backup_interval_s)}){loss}")
        elif backup_age > backup_interval_s + max(3600.0, 0.25 * backup_interval_s):
            say(AMBER, f"base backup overdue: the newest is {human_duration(backup_age)} old "
                       f"(one every {human_duration(backup_interval_s)})")


def _restore_row(restore: Mapping[str, Any] | None, *, now: datetime, rto_target_s: float, rpo_target_s: float,
                 restore_interval_s: float | None, say: _Say) -> dict[str, Any] | None:
    """The last restore verification: when was recoverability last proven, and how fast."""
    if restore is None:
        say(AMBER, "never proven restorable: no restore verification report yet (run pgops_restore_verify)")
        return None
    r = _body(restore)
    m = r.get("measurements") or {}
    canary = r.get("canary") or {}
    restore_t = parse_ts(restore.get("finished_at"))
    passed = restore.get("status") != "failed"
    restore_row = {
        "finished_at": restore.get("finished_at"), "age_s": _age_s(restore_t, now), "run_id": restore.get("run_id"),
        "status": restore.get("status"), "passed": passed, "backup_id": r.get("backup_id"),
        "rto_s": m.get("rto_s"), "rto_target_s": r.get("rto_target_s") or rto_target_s,
        "rpo_s": canary.get("archive_lag_s"), "rpo_target_s": rpo_target_s,
        "database_size_bytes": m.get("database_size_bytes"),
    }
    target = restore_row["rto_target_s"]
    if not passed:
        errors = "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items())
        not_finished = ", ".join(r.get("steps_not_finished") or [])
        detail = errors or (f"step(s) {not_finished} did not finish" if not_finished else "see the run's logs")
        say(RED, f"the last restore verification failed ({human_duration(restore_row['age_s'])} ago, run "
                 f"{restore.get('run_id')}): {detail}")
    elif m.get("rto_s") is not None and m["rto_s"] > target:
        say(RED, f"measured RTO {human_duration(m['rto_s'])} is over the target {human_duration(target)}")
    if restore_interval_s and restore_row["age_s"] is not None and restore_row["age_s"] > 2 * restore_interval_s + 3600:
        say(AMBER, f"last proven restorable {human_duration(restore_row['age_s'])} ago "
                   f"(verification every {human_duration(restore_interval_s)})")
    if restore_row["rpo_s"] is not None and restore_row["rpo_s"] > rpo_target_s:
        say(AMBER, f"measured RPO {human_duration(restore_row['rpo_s'])} (canary commit to archived) is over "
                   f"the target {human_duration(rpo_target_s)}")
    return restore_row


def _migration_row(migration: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if migration is None:
        return None
    view = migration_view(migration)
    return {"run_id": migration.get("run_id"), "status": migration.get("status"), "colour": view["colour"],
            "outcome": view["outcome"], "rounds": len(view["rounds"]), "downtime_s": view["downtime_s"],
            "finished_at": migration.get("finished_at")}


def _all_clear(backup_age: float | None, restore_row: Mapping[str, Any] | None) -> str:
    """The one green reason: what was checked and found well."""
    bits = ["WAL continuous"]
    if backup_age is not None:
        bits.append(f"newest backup {human_duration(backup_age)} old")
    if restore_row:
        bits.append(f"restore proven {human_duration(restore_row['age_s'])} ago"
                    + (f" (RTO {human_duration(restore_row['rto_s'])}, target "
                       f"{human_duration(restore_row['rto_target_s'])})" if restore_row["rto_s"] is not None else ""))
    return ", ".join(bits)


# --- replication and the client endpoint --------------------------------------------------------------------

_SEVERITY_COLOUR = {"critical": RED, "warning": AMBER, "ok": GREEN}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def replication_view(audit_body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The audit's replication section at a glance: the primary, each node's role, and the client endpoint next to
    it (where it points, whether an old primary is fenced), each coloured by its own findings. None: no replication."""
    repl = audit_body.get("replication")
    if not isinstance(repl, Mapping) or not repl:
        return None
    findings = [f for f in audit_body.get("findings") or [] if isinstance(f, Mapping)]

    def colour_of(prefixes: tuple[str, ...]) -> str:
        return worst(_SEVERITY_COLOUR.get(str(f.get("severity")), GREEN) for f in findings
                     if str(f.get("id") or "").startswith(prefixes))

    nodes = repl.get("nodes") if isinstance(repl.get("nodes"), Mapping) else {}
    roles = {str(k): _text(v.get("role")) if isinstance(v, Mapping) else None for k, v in nodes.items()}
    ep = repl.get("endpoint") if isinstance(repl.get("endpoint"), Mapping) else None
    endpoint = None
    if ep:
        state = _text(ep.get("state")) or "unknown"
        at = _names(ep.get("points_at_nodes")) or _names(ep.get("points_at_instances")) or _names(ep.get("values"))
        primary = _text(ep.get("current_primary"))
        text = {"on_primary": f"reaches the primary {primary}",
                "not_on_primary": f"points at {', '.join(at) or 'nothing'}, not the primary {primary}",
                "not_found": "does not exist"}.get(state, "state unknown")
        olds = ep.get("old_primaries") if isinstance(ep.get("old_primaries"), Mapping) else {}
        fences = []
        for name, o in olds.items():
            o = o if isinstance(o, Mapping) else {}
            fenced = o.get("fenced")
            fences.append({"node": str(name), "instance_id": _text(o.get("instance_id")),
                           "instance_state": _text(o.get("instance_state")), "fenced": fenced,
                           "text": f"old primary {name} " + ("fenced" if fenced is True else "NOT fenced"
                                                              if fenced is False else "fencing unknown")
                                   + f" (instance {o.get('instance_state') or 'unknown'}"
                                   + (", writable)" if o.get("writable") is True else ")")})
        endpoint = {"endpoint": _text(ep.get("endpoint")), "kind": _text(ep.get("kind")), "state": state,
                    "points_at": at, "current_primary": primary, "text": text, "fix": _text(ep.get("fix")),
                    "old_primaries": fences, "colour": colour_of(("ENDPOINT_", "OLD_PRIMARY_")),
                    "instances": {str(k): {"instance_id": _text(v.get("instance_id")),
                                           "instance_state": _text(v.get("instance_state"))}
                                  for k, v in (ep.get("nodes") or {}).items() if isinstance(v, Mapping)}
                    if isinstance(ep.get("nodes"), Mapping) else {}}
    return {"current_primary": _text(repl.get("current_primary")),
            "inventory_primary": _text(repl.get("inventory_primary")), "roles": roles,
            "colour": colour_of(("REPLICATION_", "REPMGR_")), "endpoint": endpoint}


# --- recovery-window timeline -------------------------------------------------------------------------


class _SegmentClock:
    """Maps a WAL segment number to a time by interpolating between known (segment, time) anchors.

    The audit knows the time of a backup's begin and end segments and of the newest archived segment; a gap
    is only known by segment names, so its time is read off this clock. Segment numbers grow with the LSN
    across timelines, so one clock serves every timeline.
    """

    def __init__(self, anchors: Iterable[tuple[int, datetime]]):
        pts: dict[int, datetime] = {}
        for segno, ts in anchors:
            pts[segno] = min(ts, pts[segno]) if segno in pts else ts
        self.points = sorted(pts.items())
        # keep time monotonic in segment order (clock skew between sources must not fold the axis)
        mono: list[tuple[int, datetime]] = []
        for segno, ts in self.points:
            if mono and ts < mono[-1][1]:
                ts = mono[-1][1]
            mono.append((segno, ts))
        self.points = mono

    def time_of(self, segno: int) -> datetime | None:
        pts = self.points
        if not pts:
            return None
        if segno <= pts[0][0]:
            return pts[0][1]
        if segno >= pts[-1][0]:
            return pts[-1][1]
        for (s0, t0), (s1, t1) in zip(pts, pts[1:], strict=False):
            if s0 <= segno <= s1:
                frac = (segno - s0) / (s1 - s0) if s1 != s0 else 0.0
                return t0 + (t1 - t0) * frac
        return pts[-1][1]


def _segno(name: str | None, size: int) -> tuple[int, int] | None:
    if not name:
        return None
    try:
        return wal.segment_to_segno(name[:24], size)
    except (ValueError, TypeError):
        return None


def timeline(
    audit: Mapping[str, Any] | None,
    *,
    now: datetime,
    days: int = 14,
    restores: Sequence[Mapping[str, Any]] = (),
    backup_events: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The recovery window over the last `days`: backups (points), WAL coverage (bars per timeline), gaps,
    the times no backup can reach (unreachable), timeline switches and the restore verifications."""
    start = now - timedelta(days=days)
    a = _body(audit)
    size = int(a.get("wal_segment_size_bytes") or wal.DEFAULT_WAL_SEGMENT_SIZE_BYTES)
    cont = a.get("continuity") or {}
    fresh = a.get("freshness") or {}
    window = a.get("recoverable_window") or cont.get("window")

    # backups: the audit's list, completed by asset events newer than the audit
    by_id: dict[str, dict[str, Any]] = {}
    for b in a.get("backups") or []:
        by_id[b.get("backup_id")] = {"backup_id": b.get("backup_id"), "status": str(b.get("status") or "DONE").upper(),
                                     "timeline": b.get("timeline"), "begin_segment": b.get("begin_segment"),
                                     "end_segment": b.get("end_segment"), "end_lsn": b.get("end_lsn"),
                                     "begin_time": b.get("begin_time"), "end_time": b.get("end_time"),
                                     "size_bytes": b.get("size_bytes"), "source": "audit"}
    for ev in backup_events:
        bid = ev.get("backup_id")
        if bid and bid not in by_id:
            by_id[bid] = {"backup_id": bid, "status": str(ev.get("status") or "DONE").upper(),
                          "timeline": ev.get("timeline"), "begin_segment": ev.get("begin_wal"),
                          "end_segment": ev.get("end_wal"), "end_lsn": ev.get("end_lsn"),
                          "begin_time": ev.get("begin_time"), "end_time": ev.get("end_time"),
                          "size_bytes": ev.get("cluster_size_bytes") or ev.get("stored_bytes"), "source": "event"}
    broken = set(cont.get("broken_backup_ids") or [])
    inconsistent = {bid for g in cont.get("gaps") or [] for bid in g.get("inconsistent_backup_ids") or []}

    anchors: list[tuple[int, datetime]] = []
    first_seen: dict[int, tuple[int, datetime]] = {}  # timeline -> earliest (segno, time) seen on it

    def anchor(name: str | None, ts: datetime | None) -> None:
        parsed = _segno(name, size)
        if parsed is None or ts is None:
            return
        tli, segno = parsed
        anchors.append((segno, ts))
        if tli not in first_seen or segno < first_seen[tli][0]:
            first_seen[tli] = (segno, ts)

    for b in by_id.values():
        anchor(b["begin_segment"], parse_ts(b["begin_time"]))
        anchor(b["end_segment"], parse_ts(b["end_time"]))
    if window:
        anchor(window.get("latest_segment"), parse_ts(window.get("latest_time")))
    newest_wal_t = parse_ts(fresh.get("newest_wal_time")) or parse_ts((window or {}).get("latest_time"))
    anchor(cont.get("newest_segment"), newest_wal_t)
    clock = _SegmentClock(anchors)

    gaps = []
    for g in cont.get("gaps") or []:
        first, last = _segno(g.get("first_segment"), size), _segno(g.get("last_segment"), size)
        if first is None or last is None:
            continue
        g_start, g_end = clock.time_of(first[1]), clock.time_of(last[1] + 1)
        gaps.append({"timeline": g.get("timeline"), "first_segment": g.get("first_segment"),
                     "last_segment": g.get("last_segment"), "count": g.get("count"), "start": g_start, "end": g_end,
                     "backup_ids": g.get("backup_ids") or []})
    gaps.sort(key=lambda g: g["start"] or now)

    # reachable: from each consistent backup's end to the next gap (or to the newest archived WAL)
    wal_end = newest_wal_t or parse_ts((window or {}).get("latest_time"))
    usable = sorted((b for b in by_id.values() if b["status"] == "DONE" and b["backup_id"] not in inconsistent
                     and parse_ts(b["end_time"])), key=lambda b: parse_ts(b["end_time"]))
    reachable: list[tuple[datetime, datetime]] = []
    for b in usable:
        b_end = parse_ts(b["end_time"])
        stop = wal_end
        for g in gaps:
            if g["start"] and g["start"] >= b_end:
                stop = min(stop, g["start"]) if stop else g["start"]
                break
        if stop and stop > b_end:
            reachable.append((b_end, stop))
    reachable = _union(reachable)
    # coverage: archived WAL from the oldest backup's begin to the newest segment, less the gaps
    first_begin = min((parse_ts(b["begin_time"]) for b in by_id.values() if parse_ts(b["begin_time"])), default=None)
    coverage: list[dict[str, Any]] = []
    if first_begin and wal_end and wal_end > first_begin:
        spans = [(first_begin, wal_end)]
        for g in gaps:
            if g["start"] and g["end"]:
                spans = _subtract(spans, (g["start"], g["end"]))
        switches = sorted((t, tli) for tli, (_, t) in first_seen.items())
        for s, e in spans:
            cuts = [t for t, _ in switches if s < t < e]
            edges = [s, *cuts, e]
            for s2, e2 in zip(edges, edges[1:], strict=False):
                tli = max((tli for t, tli in switches if t <= s2), default=switches[0][1] if switches else 1)
                coverage.append({"start": s2, "end": e2, "timeline": tli})
    switch_marks = [{"time": t, "timeline": tli} for tli, (_, t) in sorted(first_seen.items())
                    if tli != min(first_seen)]
    # not recoverable: between the first backup's end (the earliest point any backup could reach) and the newest
    # archived WAL, what no backup reaches (gaps, unusable backups); before it is no gap, only older than the archive
    first_end = min((parse_ts(b["end_time"]) for b in by_id.values() if parse_ts(b["end_time"])), default=None)
    unreachable = (_subtract([(max(first_end, start), wal_end)], *reachable)
                   if wal_end and first_end and wal_end > first_end else [])
    # after the newest archived WAL: written on the primary, not archived yet (the RPO lag), its own mark
    pending = [(wal_end, now)] if wal_end and wal_end < now else []

    restore_points = []
    for rep in restores:
        t = parse_ts(rep.get("finished_at"))
        if t and t >= start:
            rb = _body(rep)
            restore_points.append({"time": t, "passed": rep.get("status") != "failed", "status": rep.get("status"),
                                   "run_id": rep.get("run_id"), "backup_id": rb.get("backup_id"),
                                   "rto_s": (rb.get("measurements") or {}).get("rto_s")})

    def clip(items: list[dict[str, Any]], a_key: str = "start", b_key: str = "end") -> list[dict[str, Any]]:
        out = []
        for it in items:
            s, e = it[a_key], it[b_key]
            if s is None or e is None or e <= start or s >= now:
                continue
            out.append({**it, a_key: max(s, start), b_key: min(e, now)})
        return out

    # zoom to the data: a window of minutes fills the chart instead of a pixel of a 14-day axis
    firsts = [t for t in ([first_begin, first_end] + [s for s, _ in reachable] + [g["start"] for g in gaps]
                          + [p["time"] for p in restore_points]) if t is not None and t < now]
    if firsts:
        data_start = max(min(firsts), start)
        span = now - data_start
        start = max(start, min(data_start - max(span * 0.05, MIN_PAD), now - MIN_SPAN))

    backups_out = []
    for b in sorted(by_id.values(), key=lambda b: parse_ts(b["end_time"]) or now):
        t = parse_ts(b["end_time"]) or parse_ts(b["begin_time"])
        if t is None or t < start:
            continue
        state = ("unusable" if b["backup_id"] in inconsistent or b["status"] != "DONE"
                 else "broken" if b["backup_id"] in broken else "ok")
        backups_out.append({**b, "time": t, "state": state})
    return _jsonable({
        "start": start, "end": now, "now": now, "days": days, "zoomed": start > now - timedelta(days=days),
        "window": ({"earliest_time": parse_ts(window.get("earliest_time")), "latest_time": parse_ts(window.get("latest_time")),
                    "earliest_backup_id": window.get("earliest_backup_id"), "latest_segment": window.get("latest_segment")}
                   if window else None),
        "backups": backups_out,
        "coverage": clip(coverage),
        "gaps": [{**g, "start": max(g["start"], start), "end": min(g["end"], now)} for g in gaps
                 if g["start"] and g["end"] and g["end"] > start],
        "reachable": clip([{"start": s, "end": e} for s, e in reachable]),
        "unreachable": clip([{"start": s, "end": e} for s, e in unreachable if e > s]),
        "pending": clip([{"start": s, "end": e} for s, e in pending if e > s]),
        "switches": [s for s in switch_marks if start <= s["time"] <= now],
        "restores": restore_points,
    })


def _union(spans: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[list[datetime]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _subtract(spans: list[tuple[datetime, datetime]], *cuts: tuple[datetime, datetime]) -> list[tuple[datetime, datetime]]:
    for cs, ce in cuts:
        nxt = []
        for s, e in spans:
            if ce <= s or cs >= e:
                nxt.append((s, e))
                continue
            if s < cs:
                nxt.append((s, cs))
            if ce < e:
                nxt.append((ce, e))
        spans = nxt
    return spans


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --- RTO against size ---------------------------------------------------------------------------------


RTO_HORIZON_DAYS = 90


def rto_forecast(restores: Sequence[Mapping[str, Any]], *, target_s: float,
                 horizon_days: int = RTO_HORIZON_DAYS) -> dict[str, Any]:
    """The RTO forecast from the restore-verify reports: one function for the fleet table and the cluster page.

    A number only when fitted on enough data (pgops.core.restore.rto_trend: 3 restores of different sizes, a positive
    per-GiB cost); otherwise status "not_enough_data" and a text that says what is missing.
    """
    from pgops.core.restore import history_points, rto_trend

    trend = rto_trend(history_points([r for r in restores if isinstance(r, Mapping)]), target_s=target_s,
                      horizon_days=horizon_days).to_dict()
    ok = trend["status"] == "ok"
    if ok:
        text = (f"{human_duration(trend['projected_rto_s'])} in {horizon_days} days (fixed "
                f"{human_duration(trend['intercept_s'])} + {trend['seconds_per_gib']:.1f} s per GiB, fitted on "
                f"{trend['points']} restores of {human_bytes(trend['size_min_bytes'])} to "
                f"{human_bytes(trend['size_max_bytes'])}; target {human_duration(target_s)})")
    else:
        text = f"not enough data: {trend['reason']}"
    projected = trend["projected_rto_s"] if ok else None
    return {"status": trend["status"], "text": text, "projected_rto_s": projected, "horizon_days": horizon_days,
            "days_until_target": trend["days_until_target"] if ok else None, "target_s": target_s,
            "over_target": bool(projected is not None and projected > target_s),
            "seconds_per_gib": trend["seconds_per_gib"], "fixed_s": trend["intercept_s"], "points": trend["points"],
            "distinct_sizes": trend["distinct_sizes"], "trend": trend}


def rto_series(restores: Sequence[Mapping[str, Any]], *, target_s: float,
               horizon_days: int = RTO_HORIZON_DAYS) -> dict[str, Any]:
    """Measured RTO against database size (verified runs), the fit over the measured sizes, the forecast (only
    when fitted on enough data) and the target."""
    points = []
    for rep in restores:
        m = _body(rep).get("measurements") or {}
        if m.get("database_size_bytes") and m.get("rto_s") is not None:
            points.append({"at": rep.get("finished_at"), "size_bytes": m["database_size_bytes"], "rto_s": m["rto_s"],
                           "passed": rep.get("status") != "failed", "run_id": rep.get("run_id")})
    failed = [{"at": rep.get("finished_at"), "run_id": rep.get("run_id")} for rep in restores
              if rep.get("status") == "failed"]
    forecast = rto_forecast(restores, target_s=target_s, horizon_days=horizon_days)
    trend = forecast["trend"]
    fit = projection = None
    if forecast["status"] == "ok":
        slope = trend["seconds_per_gib"] / 2**30
        lo, hi = trend["size_min_bytes"], trend["size_max_bytes"]  # the fitted range: the restores' own sizes
        fit = {"from": {"size_bytes": lo, "rto_s": trend["intercept_s"] + slope * lo},
               "to": {"size_bytes": hi, "rto_s": trend["intercept_s"] + slope * hi}}
        projection = {"size_bytes": trend["projected_size_bytes"], "rto_s": trend["projected_rto_s"],
                      "horizon_days": horizon_days}
    return {"points": points, "failed": failed, "target_s": target_s, "trend": trend, "forecast": forecast,
            "fit": fit, "projection": projection, "over_target": forecast["over_target"]}


# --- EBS migration ------------------------------------------------------------------------------------

_OUTCOME_COLOUR = {"cut_over": GREEN, "cutover_at_reached": GREEN, "stalled_at_floor": AMBER, "max_rounds": AMBER,
                   "diverging": RED}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def migration_view(report: Mapping[str, Any]) -> dict[str, Any]:
    """Rounds (predicted and actual duration, delta bytes) with the decision after each, the floor, the cutover."""
    b = _body(report)
    decisions = [d if isinstance(d, Mapping) else {} for d in _list(b.get("decisions"))]
    rounds = []
    for r in [r for r in _list(b.get("rounds")) if isinstance(r, Mapping)]:
        i = int(num(r.get("index")) or 0)
        d = decisions[i] if 0 <= i < len(decisions) else {}
        rounds.append({"index": i, "started_at": r.get("started_at"), "duration_s": num(r.get("duration_s")),
                       "predicted_duration_s": num(r.get("predicted_duration_s")),
                       "delta_bytes": num(r.get("delta_bytes")), "decision": d.get("action"), "reason": d.get("reason")})
    rounds.sort(key=lambda r: r["index"])
    last = decisions[-1] if decisions else {}
    numbers = last.get("numbers") if isinstance(last.get("numbers"), Mapping) else {}
    numbers = {k: num(numbers.get(k)) for k in ("floor_s", "downtime_target_s", "r")}
    plan = b.get("plan") if isinstance(b.get("plan"), Mapping) else {}
    floor_s = numbers["floor_s"] if numbers["floor_s"] is not None else num(plan.get("floor_s"))
    target_s = numbers["downtime_target_s"]
    outcome = b.get("outcome") or last.get("action")
    durations = [r["duration_s"] for r in rounds if r["duration_s"] is not None]
    ratios = [y / x for x, y in zip(durations, durations[1:], strict=False) if x]
    growing = len(ratios) >= 2 and all(x >= 1 for x in ratios[-2:])
    reasons = []
    colour = GREEN
    if report.get("status") == "failed":
        colour = RED
        reasons.append(f"the migration did not finish (outcome {outcome or 'unknown'})")
    if outcome == "diverging" or (numbers.get("r") is not None and numbers["r"] >= 1) or growing:
        colour = RED
        reasons.append("the chain diverges: rounds do not shrink"
                       + (f" (r={numbers['r']:.2f} >= 1)" if numbers.get("r") is not None and numbers["r"] >= 1 else "")
                       + (f"; round-over-round ratios {', '.join(f'{x:.2f}' for x in ratios[-3:])}" if ratios else ""))
    elif outcome in _OUTCOME_COLOUR:
        colour = worst([colour, _OUTCOME_COLOUR[outcome]])
        if _OUTCOME_COLOUR[outcome] != GREEN:
            reasons.append(last.get("reason") or outcome)
    downtime_s = num(b.get("downtime_s"))
    if downtime_s is not None and target_s is not None and downtime_s > target_s:
        colour = worst([colour, AMBER])
        reasons.append(f"cutover downtime {human_duration(downtime_s)} over the target {human_duration(target_s)}")
    approval = b.get("approval") if isinstance(b.get("approval"), Mapping) else {}
    approval_text = b.get("approval_text") if isinstance(b.get("approval_text"), str) else None
    if approval.get("decision") in ("rejected", "timed_out") and downtime_s is None:
        colour = worst([colour, AMBER])
        reasons.append(f"no cutover: {approval_text or approval.get('decision')}")
    if not reasons:
        reasons.append(f"converged in {len(rounds)} round(s)"
                       + (f", cutover downtime {human_duration(downtime_s)}" if downtime_s is not None else ""))
    init = b.get("initialization")
    return {
        "cluster": report.get("cluster"), "run_id": report.get("run_id"), "migration_id": b.get("migration_id"),
        "status": report.get("status"), "colour": colour, "reasons": reasons, "outcome": outcome,
        "dry_run": b.get("dry_run"), "rounds": rounds, "floor_s": floor_s, "downtime_target_s": target_s,
        "r": numbers.get("r"), "downtime_s": downtime_s,
        "cutover_to_volume_available_s": num(b.get("cutover_to_volume_available_s")),
        "initialization": init, "destination_volumes": b.get("destination_volumes"),
        "started_at": report.get("started_at"), "finished_at": report.get("finished_at"),
        "approval": approval_text, "approval_decision": approval.get("decision"),
    }
