"""Dashboard builders on report fixtures: colours, reasons, windows, the timeline, RTO trend and migration rounds."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from pgops.airflow.ui import charts, summary
from pgops.airflow.ui.summary import AMBER, GREEN, RED
from pgops.core.reports import envelope

NOW = datetime(2025, 3, 20, 12, 0, tzinfo=UTC)
MIB16 = 16 * 2**20


def seg(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


def backup(bid: str, *, days_ago: float, begin: int, tli: int = 1, status: str = "DONE", size: int = 2**30):
    end_t = NOW - timedelta(days=days_ago)
    return {"backup_id": bid, "status": status, "timeline": tli, "begin_segment": seg(tli, begin),
            "end_segment": seg(tli, begin + 1), "begin_lsn": None, "end_lsn": None,
            "begin_time": (end_t - timedelta(minutes=10)).isoformat(), "end_time": end_t.isoformat(),
            "size_bytes": size}


def audit_report(backups, *, gaps=(), newest=None, newest_age_s=60.0, findings=(), status=None, lifecycle=None,
                 age_s=600.0, window=True):
    newest = newest or seg(1, 100)
    latest_t = NOW - timedelta(seconds=newest_age_s)
    done = [b for b in backups if b["status"] == "DONE"]
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in ("ok", "warning", "critical")}
    win = None
    if window and done:
        win = {"earliest_backup_id": done[0]["backup_id"], "earliest_time": done[0]["end_time"],
               "latest_segment": newest, "latest_lsn": "0/0", "latest_time": latest_t.isoformat()}
    body = {"bucket": "b", "prefix": "p", "wal_segment_size_bytes": MIB16, "backups": list(backups),
            "continuity": {"newest_segment": newest, "gaps": list(gaps),
                           "broken_backup_ids": sorted({i for g in gaps for i in g["backup_ids"]}), "window": win},
            "recoverable_window": win,
            "freshness": {"newest_backup_time": max((b["end_time"] for b in done), default=None),
                          "newest_wal_time": latest_t.isoformat()},
            "lifecycle": lifecycle or {"status": "ok", "days_until_last_backup_expires": None},
            "findings": list(findings), "counts": counts}
    worst = status or ("critical" if counts["critical"] else "warning" if counts["warning"] else "ok")
    finished = NOW - timedelta(seconds=age_s)
    return envelope(kind="wal-audit", cluster="main", run_id="audit_1", started_at=finished - timedelta(seconds=5),
                    finished_at=finished, status=worst, body=body)


def restore_report(*, days_ago: float = 0.2, status: str = "ok", rto_s: float | None = 120.0, size: int = 2**30,
                   errors=None, trend=None, rpo_s: float = 3.0):
    finished = NOW - timedelta(days=days_ago)
    body = {"backup_id": "b3", "measurements": {"database_size_bytes": size, "rto_s": rto_s},
            "canary": {"archive_lag_s": rpo_s}, "rto_target_s": 3600, "errors": errors or {},
            "steps_not_finished": [], "rto_trend": trend or {"points": 1}}
    return envelope(kind="restore-verify", cluster="main", run_id=f"rv_{days_ago}", started_at=finished - timedelta(minutes=5),
                    finished_at=finished, status=status, body=body)


def finding(fid, severity, message="m", **evidence):
    return {"id": fid, "severity": severity, "message": message, "evidence": evidence, "fix": "f"}


HEALTHY_BACKUPS = [backup("b1", days_ago=3, begin=10), backup("b2", days_ago=2, begin=40), backup("b3", days_ago=0.5, begin=80)]


def test_healthy_cluster_is_green_with_window_and_proof():
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=restore_report())
    assert row["colour"] == GREEN, row["reasons"]
    assert row["window"]["earliest_backup_id"] == "b1"
    assert row["newest_backup"]["backup_id"] == "b3" and abs(row["newest_backup"]["age_s"] - 0.5 * 86400) < 1
    assert row["restore"]["passed"] and row["restore"]["rto_s"] == 120.0 and row["restore"]["rpo_s"] == 3.0
    assert "restore proven" in row["reason"]


def test_gap_is_red_and_timeline_marks_it_with_unreachable_time():
    gap = {"timeline": 1, "first_segment": seg(1, 50), "last_segment": seg(1, 59), "count": 10,
           "backup_ids": ["b1", "b2"], "inconsistent_backup_ids": []}
    audit = audit_report(HEALTHY_BACKUPS, gaps=[gap], findings=[finding("WAL_GAP", "critical", "WAL archive gap")])
    row = summary.fleet_row("main", now=NOW, audit=audit, restore=restore_report())
    assert row["colour"] == RED and row["reason"].startswith("WAL_GAP")
    tl = summary.timeline(audit, now=NOW, days=7, restores=[restore_report()])
    assert len(tl["backups"]) == 3 and [b["state"] for b in tl["backups"]] == ["broken", "broken", "ok"]
    assert len(tl["gaps"]) == 1
    g = tl["gaps"][0]
    b2_end, b3_begin = HEALTHY_BACKUPS[1]["end_time"], HEALTHY_BACKUPS[2]["begin_time"]
    assert b2_end < g["start"] < g["end"] < b3_begin  # segments 50..59 lie between b2 (40) and b3 (80)
    # the time from the gap to the next backup's end cannot be reached by any backup
    assert any(u["start"] == g["start"] and u["end"] == HEALTHY_BACKUPS[2]["end_time"] for u in tl["unreachable"])
    assert any(r["start"] == HEALTHY_BACKUPS[0]["end_time"] and r["end"] == g["start"] for r in tl["reachable"])
    svg = charts.timeline_svg(tl)
    assert svg.count("data-backup-id=") == 3
    assert len(re.findall(r'<rect class="gap" data-first-segment', svg)) == 1
    assert 'class="unreachable"' in svg and "<title>" in svg


def test_timeline_switch_splits_the_wal_bar_and_marks_the_switch():
    backups = [backup("b1", days_ago=3, begin=10, tli=1), backup("b2", days_ago=1, begin=60, tli=2)]
    audit = audit_report(backups, newest=seg(2, 90))
    tl = summary.timeline(audit, now=NOW, days=7)
    assert [c["timeline"] for c in tl["coverage"]] == [1, 2]
    assert tl["switches"] and tl["switches"][0]["timeline"] == 2
    assert tl["coverage"][0]["end"] == tl["coverage"][1]["start"] == tl["switches"][0]["time"]
    assert not tl["gaps"] and len(tl["reachable"]) == 1
    svg = charts.timeline_svg(tl)
    assert 'data-timeline="2"' in svg and 'class="switch"' in svg


def test_history_missing_after_switch_is_red():
    backups = [backup("b1", days_ago=3, begin=10, tli=1)]
    audit = audit_report(backups, newest=seg(2, 90),
                         findings=[finding("HISTORY_MISSING", "critical", "timeline history file 00000002.history")])
    row = summary.fleet_row("main", now=NOW, audit=audit, restore=restore_report())
    assert row["colour"] == RED and "HISTORY_MISSING" in row["reason"]


def test_stopped_backups_are_red_with_days_until_loss():
    backups = [backup("b1", days_ago=9, begin=10), backup("b2", days_ago=6, begin=40)]
    audit = audit_report(backups, age_s=86400 / 2, lifecycle={"days_until_last_backup_expires": 3.0},
                         findings=[finding("BACKUPS_STOPPED", "warning", "backups have stopped",
                                           days_until_last_backup_expires=3.0)])
    row = summary.fleet_row("main", now=NOW, audit=audit, restore=restore_report(), audit_interval_s=86400)
    assert row["colour"] == RED
    assert row["reason"].startswith("backups have stopped") and "unrecoverable in 2.5 days" in row["reason"]
    assert abs(row["days_until_loss"] - 2.5) < 1e-6
    assert any(r["colour"] == AMBER and r["text"].startswith("BACKUPS_STOPPED") for r in row["reasons"])


def test_overdue_backup_is_amber():
    backups = [backup("b1", days_ago=1.3, begin=10)]
    row = summary.fleet_row("main", now=NOW, audit=audit_report(backups), restore=restore_report())
    assert row["colour"] == AMBER and row["reason"].startswith("base backup overdue")


def test_failed_restore_is_red_and_names_the_error():
    rep = restore_report(status="failed", rto_s=None, errors={"restore": "barman-cloud-restore exit 1"})
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=rep)
    assert row["colour"] == RED
    assert "restore verification failed" in row["reason"] and "barman-cloud-restore exit 1" in row["reason"]
    assert row["restore"]["passed"] is False


def test_never_verified_and_stale_audit_are_amber():
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS, age_s=5 * 3600), restore=None)
    assert row["colour"] == AMBER
    texts = " | ".join(r["text"] for r in row["reasons"])
    assert "never proven restorable" in texts and "WAL audit report is 5.0 h old" in texts


def test_no_audit_at_all_is_amber_unknown_and_no_backup_is_red():
    assert summary.fleet_row("main", now=NOW, audit=None)["colour"] == AMBER
    empty = audit_report([], findings=[finding("NO_BACKUPS", "critical", "no finished base backup")])
    row = summary.fleet_row("main", now=NOW, audit=empty, restore=restore_report())
    assert row["colour"] == RED and row["window"] is None


def test_rto_over_target_is_red_and_forecast_over_target_is_amber():
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=restore_report(rto_s=4000))
    assert row["colour"] == RED and "over the target" in row["reason"]
    # 3 restores of growing sizes: 10 GiB more every 10 days at 100 s per GiB crosses 3600 s within 90 days
    reps = [restore_report(days_ago=d, size=int(s * 2**30), rto_s=100.0 * s) for d, s in ((20.2, 10), (10.2, 20), (0.2, 30))]
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=reps[-1], restores=reps)
    assert row["colour"] == AMBER and "RTO forecast" in row["reason"] and "in about 6 days" in row["reason"]
    assert row["rto_forecast"]["over_target"] and row["rto_forecast"]["status"] == "ok"
    series = summary.rto_series(reps, target_s=3600)
    assert series["forecast"]["text"] == row["rto_forecast"]["text"]  # the same figure in both views
    assert row["rto_forecast"]["projected_rto_s"] == pytest.approx(100.0 * (30 + 90))


def test_one_restore_is_not_enough_data_in_both_views_whatever_its_stored_trend():
    # the field report: one 41 MB restore in 4 s stored a trend of 7,542 s per GiB and 5.6 h in 90 days
    stored = {"points": 3, "seconds_per_gib": 7542.0, "projected_rto_s": 20160.0, "horizon_days": 90}
    rep = restore_report(size=41 * 2**20, rto_s=4.0, trend=stored)
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=rep, restores=[rep])
    series = summary.rto_series([rep], target_s=3600)
    for forecast in (row["rto_forecast"], series["forecast"]):
        assert forecast["status"] == "not_enough_data" and forecast["projected_rto_s"] is None
        assert forecast["text"].startswith("not enough data: 1 verified restore(s) of 1 different size(s)")
    assert row["rto_forecast"]["text"] == series["forecast"]["text"]
    assert series["fit"] is None and series["projection"] is None and not series["over_target"]
    assert row["colour"] == GREEN
    # without the history the fleet row has only the latest report: no forecast from it either
    assert summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS),
                             restore=rep)["rto_forecast"]["status"] == "not_enough_data"
    svg = charts.rto_svg(series)
    assert 'class="trend"' not in svg and "not enough data" in svg and svg.count("data-at=") == 1


def test_backup_event_newer_than_the_audit_counts():
    backups = [backup("b1", days_ago=1.5, begin=10)]
    ev = {"backup_id": "b9", "status": "DONE", "end_time": (NOW - timedelta(hours=2)).isoformat(),
          "begin_wal": seg(1, 200), "end_wal": seg(1, 201), "begin_time": (NOW - timedelta(hours=2, minutes=5)).isoformat(),
          "cluster_size_bytes": 3 * 2**30}
    row = summary.fleet_row("main", now=NOW, audit=audit_report(backups), restore=restore_report(), backup_event=ev)
    assert row["newest_backup"]["backup_id"] == "b9" and row["colour"] == GREEN
    tl = summary.timeline(audit_report(backups), now=NOW, days=7, backup_events=[ev])
    assert [b["backup_id"] for b in tl["backups"]] == ["b1", "b9"]


def test_rto_series_fits_and_forecasts():
    reps = [restore_report(days_ago=d, size=int(s * 2**30), rto_s=r)
            for d, s, r in ((30, 1, 100), (20, 2, 200), (10, 3, 300), (1, 4, 400))]
    reps.append(restore_report(days_ago=0.5, status="failed", rto_s=None))
    series = summary.rto_series(reps, target_s=600, horizon_days=90)
    assert len(series["points"]) == 4 and len(series["failed"]) == 1
    assert abs(series["trend"]["seconds_per_gib"] - 100) < 1e-6
    assert series["over_target"]  # growing 1 GiB per ~10 days: 600 s is crossed within 90 days
    # the fit covers the measured sizes only; the forecast is its own point
    assert (series["fit"]["from"]["size_bytes"], series["fit"]["to"]["size_bytes"]) == (2**30, 4 * 2**30)
    assert series["projection"]["size_bytes"] > 4 * 2**30
    svg = charts.rto_svg(series)
    assert svg.count("data-at=") == 4 and 'class="trend"' in svg and 'class="target"' in svg
    assert 'class="forecast-point"' in svg and 'class="forecast"' in svg


def _migration(durations, *, outcome, r, status="ok", downtime_s=40.0):
    rounds = [{"index": i + 1, "started_at": (NOW - timedelta(hours=10 - i)).isoformat(), "duration_s": d,
               "delta_bytes": int(d * 50 * 2**20), "predicted_duration_s": None if i == 0 else d * 0.9,
               "snapshots": {}, "copies": {}} for i, d in enumerate(durations)]
    decisions = [{"action": "another_round", "reason": "first", "numbers": {}}]
    decisions += [{"action": "another_round", "reason": f"after {i + 1}",
                   "numbers": {"floor_s": 30.0, "r": r, "downtime_target_s": 60.0}} for i in range(len(durations) - 1)]
    decisions.append({"action": outcome, "reason": f"{outcome} because", "numbers": {"floor_s": 30.0, "r": r,
                                                                                     "downtime_target_s": 60.0}})
    body = {"migration_id": "m1", "rounds": rounds, "decisions": decisions, "outcome": outcome,
            "downtime_s": downtime_s, "plan": {"floor_s": 28.0}, "initialization": {"vol-1": "none"}}
    return envelope(kind="ebs-migration", cluster="main", run_id="mig_1", started_at=NOW - timedelta(hours=11),
                    finished_at=NOW, status=status, body=body)


def test_converging_migration_is_green_with_floor_and_decisions():
    view = summary.migration_view(_migration([3600, 600, 120, 45], outcome="cut_over", r=0.2))
    assert view["colour"] == GREEN and view["floor_s"] == 30.0 and view["downtime_target_s"] == 60.0
    assert [r["decision"] for r in view["rounds"]] == ["another_round"] * 3 + ["cut_over"]
    svg = charts.rounds_svg(view)
    assert svg.count("data-round=") == 4 and 'class="floor"' in svg and svg.count('<line class="predicted"') == 3


def test_diverging_migration_is_red():
    view = summary.migration_view(_migration([600, 700, 900], outcome="diverging", r=1.3, status="failed",
                                             downtime_s=None))
    assert view["colour"] == RED and any("diverges" in r for r in view["reasons"])
    row = summary.fleet_row("main", now=NOW, audit=audit_report(HEALTHY_BACKUPS), restore=restore_report(),
                            migration=_migration([600, 700, 900], outcome="diverging", r=1.3, status="failed"))
    assert row["migration"]["colour"] == RED and row["colour"] == GREEN  # a migration does not change recoverability


def test_stalled_migration_over_target_is_amber():
    view = summary.migration_view(_migration([600, 200, 150, 140], outcome="stalled_at_floor", r=0.3, downtime_s=90))
    assert view["colour"] == AMBER and any("over the target" in r for r in view["reasons"])


def test_time_ticks_and_svg_escape():
    ticks = charts.time_ticks(NOW - timedelta(days=14), NOW)
    assert 2 <= len(ticks) <= 10 and all(t.hour == 0 for t in ticks)
    tl = summary.timeline(audit_report([backup("<b>&", days_ago=1, begin=10)]), now=NOW, days=3)
    assert "<b>&" not in charts.timeline_svg(tl)
