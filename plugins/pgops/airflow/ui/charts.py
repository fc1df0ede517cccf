"""Server-rendered SVG charts for the dashboard: no JavaScript, no build step, no network at run time.

Colours are CSS variables set in `STYLE` (one meaning each, everywhere: green = recoverable / ok, amber =
attention, red = loss or failure, blue = archived WAL, violet = base backups); text and axes use
currentColor, so a chart reads in Airflow's light and dark themes alike. Every mark carries a class
(`backup-point`, `wal-bar`, `gap`, `unreachable`, `rto-point`, `trend`, `target`, `round-bar`, ...) and a
<title> for its tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any

from pgops.airflow.ui.summary import human_bytes, human_duration
from pgops.core.reports import parse_ts

STYLE = """
:root { color-scheme: light dark;
  --pg-green: #2b8a3e; --pg-amber: #e67700; --pg-red: #e03131; --pg-wal: #1c7ed6; --pg-backup: #7048e8;
  --pg-grid: rgba(127,127,127,.25); --pg-bg: #ffffff; --pg-fg: #1a1b1e; --pg-muted: #666b73; --pg-row: rgba(127,127,127,.08); }
@media (prefers-color-scheme: dark) { :root:not(.light) {
  --pg-green: #69db7c; --pg-amber: #ffc078; --pg-red: #ff8787; --pg-wal: #74c0fc; --pg-backup: #b197fc;
  --pg-bg: #1a1b1e; --pg-fg: #e9ecef; --pg-muted: #a6adb5; } }
:root.dark { --pg-green: #69db7c; --pg-amber: #ffc078; --pg-red: #ff8787; --pg-wal: #74c0fc; --pg-backup: #b197fc;
  --pg-bg: #1a1b1e; --pg-fg: #e9ecef; --pg-muted: #a6adb5; }
svg.pg-chart { color: var(--pg-fg); font: 12px system-ui, sans-serif; max-width: 100%; height: auto; }
svg.pg-chart .axis line, svg.pg-chart .axis path { stroke: currentColor; stroke-opacity: .6; }
svg.pg-chart .grid line { stroke: var(--pg-grid); }
svg.pg-chart text { fill: currentColor; }
svg.pg-chart .muted { fill: var(--pg-muted); }
svg.pg-chart .wal-bar { fill: var(--pg-wal); }
svg.pg-chart .wal-bar.tli-even { fill-opacity: .6; }
svg.pg-chart .reachable { fill: var(--pg-green); fill-opacity: .55; }
svg.pg-chart .unreachable { fill: url(#pg-hatch); stroke: var(--pg-red); stroke-opacity: .6; }
svg.pg-chart .gap { fill: var(--pg-red); }
svg.pg-chart .pending { fill: var(--pg-muted); fill-opacity: .25; }
svg.pg-chart .now { stroke: currentColor; stroke-width: 2; stroke-dasharray: 1 3; }
svg.pg-chart text.now-label { font-weight: 600; }
svg.pg-chart .switch { stroke: currentColor; stroke-dasharray: 3 3; }
svg.pg-chart .backup-point { fill: var(--pg-backup); stroke: var(--pg-bg); stroke-width: 1.5; }
svg.pg-chart .backup-point.broken { fill: var(--pg-amber); }
svg.pg-chart .backup-point.unusable { fill: var(--pg-red); }
svg.pg-chart .restore-point.ok, svg.pg-chart .rto-point.ok { fill: var(--pg-green); }
svg.pg-chart .restore-point.failed, svg.pg-chart .rto-point.failed { fill: var(--pg-red); }
svg.pg-chart .trend { stroke: var(--pg-wal); stroke-width: 2; stroke-dasharray: 6 4; fill: none; }
svg.pg-chart .target { stroke: var(--pg-red); stroke-width: 1.5; stroke-dasharray: 2 3; }
svg.pg-chart .forecast { stroke: var(--pg-wal); stroke-width: 1.5; stroke-dasharray: 1 4; fill: none; }
svg.pg-chart .forecast-point { fill: none; stroke: var(--pg-wal); stroke-width: 2; }
svg.pg-chart .floor { stroke: var(--pg-amber); stroke-width: 1.5; stroke-dasharray: 6 3; }
svg.pg-chart .round-bar { fill: var(--pg-wal); }
svg.pg-chart .round-bar.red { fill: var(--pg-red); }
svg.pg-chart .predicted { stroke: var(--pg-backup); stroke-width: 3; }
svg.pg-chart .hatch-line { stroke: var(--pg-red); stroke-opacity: .45; }
svg.pg-chart .swatch-line { stroke-width: 2; }
svg.pg-chart text.tl-label { fill: var(--pg-bg); }
svg.pg-chart text.gap-label { fill: var(--pg-red); }
"""

_DEFS = ('<defs><pattern id="pg-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><line class="hatch-line" x1="0" y1="0" x2="0" y2="6" stroke-width="3"/>'
         '</pattern></defs>')


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _open(width: int, height: int, label: str, cls: str) -> list[str]:
    return [f'<svg class="pg-chart {cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{_e(label)}">', f"<title>{_e(label)}</title>",
            _DEFS]


def _legend(items: Sequence[tuple[str, str, str]], x: float, y: float) -> str:
    """items: (kind, css class, label); kind is 'rect', 'dot', 'line' or 'diamond'."""
    out = ['<g class="legend">']
    cx = x
    for kind, cls, label in items:
        if kind == "rect":
            out.append(f'<rect class="{cls}" x="{cx:.1f}" y="{y - 9:.1f}" width="14" height="10"/>')
        elif kind == "dot":
            out.append(f'<circle class="{cls}" cx="{cx + 7:.1f}" cy="{y - 4:.1f}" r="5"/>')
        elif kind == "diamond":
            out.append(f'<path class="{cls}" d="{_diamond(cx + 7, y - 4, 6)}"/>')
        else:
            out.append(f'<line class="{cls} swatch-line" x1="{cx:.1f}" y1="{y - 4:.1f}" x2="{cx + 14:.1f}" y2="{y - 4:.1f}"/>')
        out.append(f'<text x="{cx + 18:.1f}" y="{y:.1f}">{_e(label)}</text>')
        cx += 18 + 6.6 * len(label) + 16
    out.append("</g>")
    return "".join(out)


def _diamond(x: float, y: float, r: float) -> str:
    return f"M{x:.1f},{y - r:.1f} L{x + r:.1f},{y:.1f} L{x:.1f},{y + r:.1f} L{x - r:.1f},{y:.1f} Z"


# --- axes ---------------------------------------------------------------------------------------------

_TIME_STEPS = ([timedelta(minutes=m) for m in (1, 2, 5, 10, 15, 30)] + [timedelta(hours=h) for h in (1, 2, 3, 6, 12)]
               + [timedelta(days=d) for d in (1, 2, 7, 14, 30)])
MIN_SPAN_PX = 4  # a recoverable span or gap of seconds on a long axis is still this wide


def time_ticks(start: datetime, end: datetime, max_ticks: int = 10) -> list[datetime]:
    span = (end - start).total_seconds()
    step = next((s for s in _TIME_STEPS if span / s.total_seconds() <= max_ticks), _TIME_STEPS[-1])
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    k = math.ceil((start - epoch).total_seconds() / step.total_seconds())
    ticks = []
    t = epoch + step * k
    while t <= end:
        ticks.append(t)
        t += step
    return ticks


def _time_label(t: datetime, step_s: float) -> str:
    return t.strftime("%m-%d") if step_s >= 86400 else t.strftime("%m-%d %H:%M")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 10))
        v += step
    if out[-1] < hi - step * 1e-9:  # the last tick covers hi, so every mark stays inside the axes
        out.append(round(out[-1] + step, 10))
    return out


# --- recovery-window timeline ---------------------------------------------------------------------------


def timeline_svg(tl: dict[str, Any], *, width: int = 960) -> str:
    """Rows: recoverable (green) / unreachable (hatched red), archived WAL per timeline with gaps, backups, restores."""
    start, end = parse_ts(tl["start"]), parse_ts(tl["end"])
    left, right, top = 110, 20, 30
    row_h, rows = 26, ("Recoverable", "WAL archive", "Base backups", "Restore tests")
    height = top + row_h * len(rows) + 76
    plot_w = width - left - right
    total_s = max((end - start).total_seconds(), 1.0)

    def x(ts: Any) -> float:
        t = parse_ts(ts)
        return left + plot_w * min(max((t - start).total_seconds() / total_s, 0.0), 1.0)

    def y(row: int) -> float:
        return top + row * row_h

    def span_rect(cls: str, s0: Any, s1: Any, y0: float, h: float, title: str) -> str:
        """A span at least MIN_SPAN_PX wide (kept inside the plot), so minutes still show on a days-long axis."""
        x0, x1 = x(s0), x(s1)
        if x1 - x0 < MIN_SPAN_PX:
            x0 = min(x0, left + plot_w - MIN_SPAN_PX)
            x1 = x0 + MIN_SPAN_PX
        return (f'<rect class="{cls}" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{h:.1f}">'
                f'<title>{title}</title></rect>')

    label = (f"Recovery window, the last {human_duration((end - start).total_seconds())} (UTC)" if tl.get("zoomed")
             else f"Recovery window over the last {tl.get('days')} days (UTC)")
    out = _open(width, height, label, "pg-timeline")
    out.append(f'<text x="{left}" y="16" font-weight="600">{_e(label)}</text>')
    ticks = time_ticks(start, end)
    step_s = (ticks[1] - ticks[0]).total_seconds() if len(ticks) > 1 else 86400
    out.append('<g class="grid">')
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{y(len(rows)) + 2}"/>')
    out.append("</g>")
    for i, name in enumerate(rows):
        out.append(f'<text x="{left - 8}" y="{y(i) + row_h / 2 + 4:.1f}" text-anchor="end">{_e(name)}</text>')
    # row 0: what can be restored to (green), what no backup reaches (red), what is not archived yet (muted)
    for span in tl.get("reachable", []):
        out.append(span_rect("reachable", span["start"], span["end"], y(0) + 5, row_h - 10,
                             f'recoverable {_e(span["start"])} .. {_e(span["end"])}'))
    for span in tl.get("unreachable", []):
        out.append(span_rect("unreachable", span["start"], span["end"], y(0) + 5, row_h - 10,
                             f'no backup can be restored to {_e(span["start"])} .. {_e(span["end"])}'))
    for span in tl.get("pending", []):
        x0 = x(span["start"])
        out.append(f'<rect class="pending" x="{x0:.1f}" y="{y(0) + 5}" width="{max(x(span["end"]) - x0, 0):.1f}" '
                   f'height="{row_h - 10}"><title>not archived yet: WAL after {_e(span["start"])} is on the primary '
                   f'only</title></rect>')
    # row 1: archived WAL, gaps on top
    for bar in tl.get("coverage", []):
        parity = "tli-even" if int(bar.get("timeline") or 1) % 2 == 0 else "tli-odd"
        x0, x1 = x(bar["start"]), x(bar["end"])
        out.append(f'<rect class="wal-bar {parity}" data-timeline="{_e(bar.get("timeline"))}" x="{x0:.1f}" '
                   f'y="{y(1) + 5}" width="{max(x1 - x0, 1):.1f}" height="{row_h - 10}">'
                   f'<title>timeline {_e(bar.get("timeline"))}: WAL archived {_e(bar["start"])} .. {_e(bar["end"])}'
                   f'</title></rect>')
        if x1 - x0 > 40:
            out.append(f'<text x="{x0 + 4:.1f}" y="{y(1) + row_h / 2 + 4:.1f}" font-size="10" fill="white" '
                       f'class="tl-label">TL {_e(bar.get("timeline"))}</text>')
    for gap in tl.get("gaps", []):
        x0 = min(x(gap["start"]), left + plot_w - MIN_SPAN_PX)
        w = max(x(gap["end"]) - x0, MIN_SPAN_PX)
        out.append(f'<rect class="gap" data-first-segment="{_e(gap["first_segment"])}" x="{x0:.1f}" y="{y(1) + 1}" '
                   f'width="{w:.1f}" height="{row_h - 2}"><title>WAL gap: {_e(gap.get("count"))} segment(s) '
                   f'{_e(gap["first_segment"])}..{_e(gap["last_segment"])} missing</title></rect>')
        out.append(f'<text class="gap-label" x="{x0 + w / 2:.1f}" y="{y(0) + 2}" text-anchor="middle" '
                   f'font-size="10">gap</text>')
    for sw in tl.get("switches", []):
        xs = x(sw["time"])
        out.append(f'<line class="switch" x1="{xs:.1f}" y1="{y(1)}" x2="{xs:.1f}" y2="{y(2)}"><title>timeline '
                   f'{_e(sw["timeline"])} from about {_e(sw["time"])}</title></line>')
    # row 2: backups
    for b in tl.get("backups", []):
        state = b.get("state", "ok")
        out.append(f'<circle class="backup-point {state}" data-backup-id="{_e(b["backup_id"])}" cx="{x(b["time"]):.1f}" '
                   f'cy="{y(2) + row_h / 2:.1f}" r="6"><title>backup {_e(b["backup_id"])} ({_e(b.get("status"))}'
                   f"{', ' + human_bytes(b['size_bytes']) if b.get('size_bytes') else ''}), ended {_e(b['time'])}"
                   f"{'' if state == 'ok' else ': ' + state}</title></circle>")
    # row 3: restore verifications
    for r in tl.get("restores", []):
        cls = "ok" if r.get("passed") else "failed"
        out.append(f'<path class="restore-point {cls}" d="{_diamond(x(r["time"]), y(3) + row_h / 2, 7)}"><title>'
                   f'restore verification {_e(r.get("run_id"))}: {_e(r.get("status"))}'
                   f"{', RTO ' + human_duration(r['rto_s']) if r.get('rto_s') is not None else ''}</title></path>")
    # now: the right edge, marked in its own style across every row
    xn = x(tl.get("now") or tl["end"])
    out.append(f'<line class="now" x1="{xn:.1f}" y1="{top - 6}" x2="{xn:.1f}" y2="{y(len(rows)) + 2}">'
               f'<title>now ({_e(tl.get("now") or tl["end"])})</title></line>'
               f'<text class="now-label" x="{xn:.1f}" y="{top - 9}" text-anchor="end" font-size="10">now</text>')
    # time axis
    ay = y(len(rows)) + 2
    out.append(f'<g class="axis"><line x1="{left}" y1="{ay}" x2="{width - right}" y2="{ay}"/>')
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{ay}" x2="{x(t):.1f}" y2="{ay + 4}"/>'
                   f'<text x="{x(t):.1f}" y="{ay + 16}" text-anchor="middle">{_time_label(t, step_s)}</text>')
    out.append("</g>")
    out.append(_legend([("rect", "reachable", "recoverable"), ("rect", "unreachable", "not recoverable"),
                        ("rect", "pending", "not archived yet"), ("line", "now", "now"),
                        ("rect", "wal-bar", "archived WAL"), ("rect", "gap", "WAL gap")], left, height - 24))
    out.append(_legend([("dot", "backup-point", "base backup"), ("dot", "backup-point broken", "backup cut off by a gap"),
                        ("diamond", "restore-point ok", "restore passed"),
                        ("diamond", "restore-point failed", "restore failed")], left, height - 8))
    out.append("</svg>")
    return "".join(out)


# --- x/y charts: frame ------------------------------------------------------------------------------------

_XY_MARGINS = (64, 20, 30, 62)  # left, right, top, bottom of the RTO and rounds charts


def _xy_frame(label: str, *, width: int, height: int, y: Callable[[float], float], y_ticks: Sequence[float],
              x_ticks: Sequence[tuple[float, float]], x_title: str, y_title: str) -> list[str]:
    """Title, horizontal grid lines, both axes, tick labels (x_ticks: position, value) and axis titles."""
    left, right, top, bottom = _XY_MARGINS
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<text x="{left}" y="16" font-weight="600">{_e(label)}</text>',
           '<g class="grid">' + "".join(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}"/>'
                                        for v in y_ticks) + "</g>",
           f'<g class="axis"><line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>'
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>']
    out.extend(f'<text x="{at:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{v:g}</text>' for at, v in x_ticks)
    out.extend(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>' for v in y_ticks)
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 32}" text-anchor="middle">{x_title}</text>'
               f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{y_title}</text></g>')
    return out


# --- RTO against size -------------------------------------------------------------------------------------


def rto_svg(series: dict[str, Any], *, width: int = 640, height: int = 340) -> str:
    left, right, top, bottom = _XY_MARGINS
    pts = series.get("points", [])
    target = float(series.get("target_s") or 0)
    fit = series.get("fit")
    proj = series.get("projection")
    sizes = [p["size_bytes"] for p in pts] + ([fit["to"]["size_bytes"]] if fit else []) + (
        [proj["size_bytes"]] if proj else [])
    rtos = [p["rto_s"] for p in pts] + ([fit["to"]["rto_s"], fit["from"]["rto_s"]] if fit else []) + [target] + (
        [proj["rto_s"]] if proj else [])
    gib = 2**30
    x_hi = max(sizes, default=gib) / gib * 1.05 or 1.0
    xt = nice_ticks(0, x_hi)
    yt = nice_ticks(0, max(rtos, default=1) * 1.1 or 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(size_bytes: float) -> float:
        return left + plot_w * (size_bytes / gib) / xt[-1]

    def y(seconds: float) -> float:
        return top + plot_h * (1 - seconds / yt[-1])

    label = "RTO against database size"
    out = _open(width, height, label, "pg-rto")
    out.extend(_xy_frame(label, width=width, height=height, y=y, y_ticks=yt, x_ticks=[(x(v * gib), v) for v in xt],
                         x_title="database size (GiB)", y_title="RTO (s)"))
    if target:
        out.append(f'<line class="target" x1="{left}" y1="{y(target):.1f}" x2="{width - right}" y2="{y(target):.1f}">'
                   f'<title>RTO target {human_duration(target)}</title></line>')
    forecast = series.get("forecast") or {}
    if fit:  # over the restored sizes only: the fitted range
        out.append(f'<line class="trend" x1="{x(fit["from"]["size_bytes"]):.1f}" y1="{y(fit["from"]["rto_s"]):.1f}" '
                   f'x2="{x(fit["to"]["size_bytes"]):.1f}" y2="{y(fit["to"]["rto_s"]):.1f}"><title>fit over the restored '
                   f'sizes: {_e(forecast.get("text", ""))}</title></line>')
    if fit and proj:
        if proj["size_bytes"] > fit["to"]["size_bytes"]:
            out.append(f'<line class="forecast" x1="{x(fit["to"]["size_bytes"]):.1f}" y1="{y(fit["to"]["rto_s"]):.1f}" '
                       f'x2="{x(proj["size_bytes"]):.1f}" y2="{y(proj["rto_s"]):.1f}"/>')
        out.append(f'<path class="forecast-point" d="{_diamond(x(proj["size_bytes"]), y(proj["rto_s"]), 6)}"><title>'
                   f'forecast in {_e(proj.get("horizon_days"))} days: {human_bytes(proj["size_bytes"])} restored in '
                   f'{human_duration(proj["rto_s"])}</title></path>')
    for p in pts:
        cls = "ok" if p.get("passed") else "failed"
        out.append(f'<circle class="rto-point {cls}" data-at="{_e(p.get("at"))}" cx="{x(p["size_bytes"]):.1f}" cy="{y(p["rto_s"]):.1f}" r="5">'
                   f'<title>{_e(p.get("at"))}: {human_bytes(p["size_bytes"])} restored in {human_duration(p["rto_s"])}'
                   f'</title></circle>')
    if not pts:
        out.append(f'<text class="muted" x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle">'
                   "no measured restore yet</text>")
    elif not fit:
        out.append(f'<text class="muted not-enough-data" x="{left + plot_w / 2:.1f}" y="{top + 14}" '
                   f'text-anchor="middle">not enough data for a trend: {_e(forecast.get("points", len(pts)))} '
                   f'restore(s) of {_e(forecast.get("distinct_sizes", "?"))} size(s), 3 of different sizes needed'
                   '</text>')
    out.append(_legend([("dot", "rto-point ok", "measured RTO"), ("line", "trend", "fit (restored sizes)"),
                        ("diamond", "forecast-point", "forecast"), ("line", "target", "RTO target")],
                       left, height - 8))
    out.append("</svg>")
    return "".join(out)


# --- EBS migration rounds ---------------------------------------------------------------------------------


def rounds_svg(view: dict[str, Any], *, width: int = 640, height: int = 340) -> str:
    left, right, top, bottom = _XY_MARGINS
    rounds = view.get("rounds", [])
    values = [r["duration_s"] or 0 for r in rounds] + [r["predicted_duration_s"] or 0 for r in rounds]
    for key in ("floor_s", "downtime_target_s", "downtime_s"):
        if view.get(key) is not None and math.isfinite(view[key]):
            values.append(view[key])
    yt = nice_ticks(0, max(values, default=1) * 1.1 or 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(rounds), 1)
    slot = plot_w / n

    def y(seconds: float) -> float:
        return top + plot_h * (1 - seconds / yt[-1])

    label = "Snapshot rounds: duration per round"
    out = _open(width, height, label, "pg-rounds")
    out.extend(_xy_frame(label, width=width, height=height, y=y, y_ticks=yt, x_ticks=(),
                         x_title="round (delta size)", y_title="duration (s)"))
    bad = view.get("colour") == "red"
    for i, r in enumerate(rounds):
        cx = left + slot * (i + 0.5)
        w = min(slot * 0.6, 60)
        d = r.get("duration_s") or 0
        out.append(f'<rect class="round-bar{" red" if bad else ""}" data-round="{_e(r["index"])}" x="{cx - w / 2:.1f}" '
                   f'y="{y(d):.1f}" width="{w:.1f}" height="{max(top + plot_h - y(d), 0):.1f}"><title>round '
                   f'{_e(r["index"])}: {human_duration(d)}, delta {human_bytes(r.get("delta_bytes"))}; then '
                   f'{_e(r.get("decision") or "?")}</title></rect>')
        if r.get("predicted_duration_s") is not None:
            p = r["predicted_duration_s"]
            out.append(f'<line class="predicted" x1="{cx - w / 2 - 4:.1f}" y1="{y(p):.1f}" x2="{cx + w / 2 + 4:.1f}" '
                       f'y2="{y(p):.1f}"><title>predicted {human_duration(p)}</title></line>')
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_e(r["index"])} '
                   f'({human_bytes(r.get("delta_bytes"))})</text>')
    if view.get("floor_s") is not None and math.isfinite(view["floor_s"]):
        out.append(f'<line class="floor" x1="{left}" y1="{y(view["floor_s"]):.1f}" x2="{width - right}" '
                   f'y2="{y(view["floor_s"]):.1f}"><title>floor d* {human_duration(view["floor_s"])}</title></line>')
    if view.get("downtime_target_s") is not None:
        t = view["downtime_target_s"]
        out.append(f'<line class="target" x1="{left}" y1="{y(t):.1f}" x2="{width - right}" y2="{y(t):.1f}">'
                   f'<title>downtime target {human_duration(t)}</title></line>')
    if not rounds:
        out.append(f'<text class="muted" x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle">'
                   "no finished round</text>")
    out.append(_legend([("rect", "round-bar", "actual duration"), ("line", "predicted", "predicted"),
                        ("line", "floor", "floor d*"), ("line", "target", "downtime target")], left, height - 8))
    out.append("</svg>")
    return "".join(out)
