"""The recovery-window chart: green where a backup reaches, red only for real gaps, now in its own style, and a
window of minutes still visible."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from test_ui_summary import HEALTHY_BACKUPS, NOW, audit_report, backup, seg

from pgops.airflow.ui import charts, summary
from pgops.core.reports import parse_ts


def rects(svg: str, cls: str) -> list[tuple[float, float]]:
    """(x, width) of every <rect class="cls" ...> of the chart (its legend left out)."""
    svg = re.sub(r'<g class="legend">.*?</g>', "", svg)
    return [(float(x), float(w)) for x, w in
            re.findall(rf'<rect class="{cls}"[^>]* x="([\d.]+)"[^>]* width="([\d.]+)"', svg)]


def minutes_ago(m: float) -> datetime:
    return NOW - timedelta(minutes=m)


def test_no_gap_draws_no_red_and_marks_now_and_the_unarchived_tail_apart():
    audit = audit_report(HEALTHY_BACKUPS, newest_age_s=600)  # the newest WAL is 10 minutes old
    tl = summary.timeline(audit, now=NOW, days=7)
    assert tl["unreachable"] == [] and tl["gaps"] == []
    assert len(tl["reachable"]) == 1 and tl["reachable"][0]["start"] == HEALTHY_BACKUPS[0]["end_time"]
    assert tl["pending"] == [{"start": minutes_ago(10).isoformat(), "end": NOW.isoformat()}]
    svg = charts.timeline_svg(tl)
    assert rects(svg, "unreachable") == [] and rects(svg, "gap") == [] and "gap-label" not in svg
    assert len(rects(svg, "reachable")) == 1 and len(rects(svg, "pending")) == 1
    assert len(re.findall(r'<line class="now"', svg)) == 1 and ">now</text>" in svg
    # the pending tail ends where now is drawn
    (px, pw), = rects(svg, "pending")
    now_x = float(re.search(r'<line class="now" x1="([\d.]+)"', svg).group(1))
    assert abs(px + pw - now_x) < 0.2


def test_a_window_of_minutes_fills_the_chart():
    # a new cluster: one backup ended 12 minutes ago, WAL archived up to a minute ago
    b = backup("b1", days_ago=12 / 1440, begin=2)
    tl = summary.timeline(audit_report([b], newest=seg(1, 5), newest_age_s=60), now=NOW, days=14)
    assert tl["zoomed"] and parse_ts(tl["start"]) > NOW - timedelta(hours=1)
    svg = charts.timeline_svg(tl)
    (x, width), = rects(svg, "reachable")
    assert width > 300  # 11 of about 30 minutes of an 830 px plot, not a sliver of 14 days
    assert "Recovery window, the last" in svg and "over the last 14 days" not in svg
    ticks = charts.time_ticks(parse_ts(tl["start"]), NOW)
    assert 2 <= len(ticks) <= 10 and all(t.second == 0 for t in ticks)
    assert (ticks[1] - ticks[0]) < timedelta(hours=1)


def test_minutes_on_a_days_long_axis_are_still_visible():
    # old backups cut off by a gap a week ago; the only recoverable span is the newest backup's last 3 minutes
    backups = [backup("b1", days_ago=7, begin=10), backup("b2", days_ago=4 / 1440, begin=90)]
    gap = {"timeline": 1, "first_segment": seg(1, 30), "last_segment": seg(1, 80), "count": 51,
           "backup_ids": ["b1"], "inconsistent_backup_ids": []}
    audit = audit_report(backups, gaps=[gap], newest=seg(1, 92), newest_age_s=60)
    tl = summary.timeline(audit, now=NOW, days=14)
    recent = [r for r in tl["reachable"] if parse_ts(r["start"]) > NOW - timedelta(hours=1)]
    assert len(recent) == 1
    svg = charts.timeline_svg(tl)
    widths = [w for _, w in rects(svg, "reachable")]
    assert len(widths) == 2 and min(widths) >= charts.MIN_SPAN_PX
    assert all(x + w <= 960 - 20 + 0.1 for x, w in rects(svg, "reachable"))  # kept inside the plot
    # the gap is red, and what no backup reaches after it too
    assert len(rects(svg, "gap")) == 1 and rects(svg, "unreachable")


def test_backup_duration_before_the_first_consistent_point_is_not_a_gap():
    # the first backup began 10 minutes before it ended: nothing before its end is "not recoverable"
    tl = summary.timeline(audit_report(HEALTHY_BACKUPS), now=NOW, days=7)
    first_end = parse_ts(HEALTHY_BACKUPS[0]["end_time"])
    assert all(parse_ts(u["start"]) >= first_end for u in tl["unreachable"])
    assert datetime(2025, 1, 1, tzinfo=UTC) < parse_ts(tl["start"]) <= parse_ts(HEALTHY_BACKUPS[0]["begin_time"])


def test_axes_cover_every_mark_of_the_rto_chart():
    assert charts.nice_ticks(0, 49.6)[-1] >= 49.6 and charts.nice_ticks(0, 40)[-1] == 40
    reps = [{"status": "ok", "finished_at": (NOW - timedelta(days=d)).isoformat(), "run_id": f"r{d}",
             "body": {"measurements": {"database_size_bytes": int(s * 2**30), "rto_s": 100.0 * s}}}
            for d, s in ((4, 1.0), (3, 1.5), (2, 2.0))]
    series = summary.rto_series(reps, target_s=3600)
    svg = charts.rto_svg(series)
    cx, cy = (float(v) for v in re.search(r'class="forecast-point" d="M([\d.]+),([\d.]+)', svg).groups())
    assert 64 <= cx <= 640 - 20 and 30 - 6 <= cy <= 340 - 62  # the forecast point is inside the plot
