"""Incremental EBS snapshot chain planner: chain snapshots until the delta is small, then cut over.

A snapshot's point in time is fixed at CreateSnapshot and it stores only the blocks changed since
the previous snapshot, so round i copies what was written while round i-1 ran:
d_i = c + r * d_(i-1), with r = W / T (write rate over snapshot throughput) and c the fixed
per-snapshot overhead. The chain converges to the floor d* = c / (1 - r) when r < 1 and never when
r >= 1 (the pre-copy live-migration recurrence, Clark et al., NSDI 2005). A hot working set
rewritten every round raises that floor; durations then stop shrinking, which `decide` detects.

Why rounds grew mid-chain: a round stores everything written since the previous round started, so
time spent with no snapshot running goes into the next round. Ready to cut over, the chain used to
stop and wait for the round copies (the first, full copy runs for hours), then ask again: each wait
made the next round longer (544 s, then 834 s) and a cutover after one carried it all in the final
snapshot (892 s after 67-s rounds). What removes it: copies run beside the next snapshot
(`next_copy`), a ready chain holds at its floor with back-to-back rounds until the copy before the
last round is done (HOLD_FOR_COPIES), a wait is only taken far from the floor, ending the next round
as the copy in flight ends (`Decision.wait_s`), and the cutover is decided right after a round (a
late decision asks for a fresh round). Every target goes on toward the floor while a round pays off
(`floor_margin`), so a stricter target never ends worse and one below the floor ends near floor + copy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

MIB = 1024 * 1024

ANOTHER_ROUND = "another_round"
CUT_OVER = "cut_over"
STALLED_AT_FLOOR = "stalled_at_floor"
DIVERGING = "diverging"
MAX_ROUNDS = "max_rounds"
CUTOVER_AT_REACHED = "cutover_at_reached"
# Ready to cut over, but the round copies lag: the final copy would wait for them, so take another round.
HOLD_FOR_COPIES = "hold_for_copies"
# Actions after which the caller takes another round (after Decision.wait_s).
ROUND_ACTIONS = frozenset({ANOTHER_ROUND, HOLD_FOR_COPIES})
# Actions after which the chain stops and the caller quiesces writes for the final snapshot.
CUTOVER_ACTIONS = frozenset({CUT_OVER, STALLED_AT_FLOOR, MAX_ROUNDS, CUTOVER_AT_REACHED})


def _secs(value: float | None) -> str:
    if value is None:
        return "unknown"
    if math.isinf(value):
        return "never"
    return f"{value:.0f} s"


def _mibps(value: float | None) -> str:
    return "unknown" if value is None else f"{value / MIB:.1f} MiB/s"


def _ratio(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


@dataclass(frozen=True, kw_only=True)
class RoundObservation:
    """One finished snapshot of the chain; round 1 is the first, full snapshot."""

    index: int
    started_at: datetime
    volume_size_bytes: int
    completed_at: datetime | None = None
    duration_s: float | None = None
    # ListChangedBlocks count x BlockSize against the previous snapshot; None when not measured.
    delta_bytes: int | None = None
    predicted_duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.duration_s is None:
            if self.completed_at is None:
                raise ValueError(f"round {self.index}: give completed_at or duration_s")
            object.__setattr__(self, "duration_s", (self.completed_at - self.started_at).total_seconds())
        if self.duration_s <= 0:
            raise ValueError(f"round {self.index}: duration_s {self.duration_s} must be > 0 seconds")
        if self.index < 1:
            raise ValueError(f"round index {self.index} must be >= 1 (round 1 is the full snapshot)")


@dataclass(frozen=True, kw_only=True)
class ChainParams:
    downtime_target_s: float
    max_rounds: int
    cutover_at: datetime | None = None
    stall_ratio: float = 0.8
    stall_window: int = 2
    # Predicted time to copy the final snapshot (incremental copy of the last delta), seconds.
    copy_time_s: float = 300.0
    # Known fixed per-snapshot overhead; fitted from the rounds when None.
    overhead_s: float | None = None
    # The target is the longest pause accepted, not a reason to stop early: the chain cuts over once the
    # predicted downtime is within this fraction of the best reachable one, floor + copy (or the rounds
    # stall), as a round near the floor costs minutes while each second it saves is a second of write pause.
    floor_margin: float = 0.1

    def __post_init__(self) -> None:
        if not _is_number(self.downtime_target_s) or self.downtime_target_s <= 0:
            raise ValueError(f"downtime_target_s {self.downtime_target_s!r} must be a number > 0: set the "
                             "longest write pause you accept, in seconds (e.g. 300)")
        if not isinstance(self.max_rounds, int) or isinstance(self.max_rounds, bool) or self.max_rounds < 2:
            raise ValueError(f"max_rounds {self.max_rounds!r} must be an integer >= 2: the write rate needs "
                             "two finished rounds (10 is a sensible ceiling)")
        if not _is_number(self.stall_ratio) or not 0 < self.stall_ratio < 1:
            raise ValueError(f"stall_ratio {self.stall_ratio!r} must be between 0 and 1 (exclusive): it is "
                             "the round-over-round duration ratio above which the chain counts as stalled "
                             "(default 0.8)")
        if not isinstance(self.stall_window, int) or isinstance(self.stall_window, bool) or self.stall_window < 1:
            raise ValueError(f"stall_window {self.stall_window!r} must be an integer >= 1: the number of "
                             "successive ratios that must exceed stall_ratio (default 2)")
        if not _is_number(self.copy_time_s) or self.copy_time_s < 0:
            raise ValueError(f"copy_time_s {self.copy_time_s!r} must be a number >= 0: the predicted time to "
                             "copy the final snapshot, in seconds")
        if self.copy_time_s >= self.downtime_target_s:
            raise ValueError(f"copy_time_s {self.copy_time_s} >= downtime_target_s {self.downtime_target_s}: "
                             "no chain can meet the target; raise downtime_target_s or speed up the copy")
        if not _is_number(self.floor_margin) or self.floor_margin <= 0:
            raise ValueError(f"floor_margin {self.floor_margin!r} must be a number > 0: the fraction above "
                             "floor + copy at which more rounds stop paying off (default 0.1)")
        if self.overhead_s is not None and (not _is_number(self.overhead_s) or self.overhead_s < 0):
            raise ValueError(f"overhead_s {self.overhead_s!r} must be a number >= 0 seconds, or None to fit "
                             "it from the rounds")
        if self.cutover_at is not None and (
            not isinstance(self.cutover_at, datetime) or self.cutover_at.utcoffset() is None
        ):
            raise ValueError(f"cutover_at {self.cutover_at!r} must be a timezone-aware datetime "
                             "(e.g. datetime(2025, 1, 5, 2, 0, tzinfo=timezone.utc)) or None")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ChainEstimate:
    """What the finished rounds say about the volume; None where they cannot tell yet."""

    rounds: int
    method: str  # "delta_bytes" or "durations"
    throughput_bps: float | None
    write_rate_bps: float | None
    overhead_s: float
    r: float | None
    # Hot working set H rewritten every round whatever its length (delta = H + W * interval); 0 when unseen.
    hot_set_bytes: float = 0.0

    @property
    def hot_set_s(self) -> float:
        return self.hot_set_bytes / self.throughput_bps if self.hot_set_bytes and self.throughput_bps else 0.0

    @property
    def floor_s(self) -> float | None:
        if self.r is None:
            return None
        return math.inf if self.r >= 1 else (self.overhead_s + self.hot_set_s) / (1 - self.r)


_HOT_SET_FIT_ROUNDS = 4


def _fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares intercept and slope of y = a + b*x, or None when x does not vary."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y - slope * mean_x, slope


def estimate(observations: Sequence[RoundObservation], overhead_s: float | None = None) -> ChainEstimate:
    """Estimate T, W, c and r from finished rounds (ordered by index)."""
    if not observations:
        raise ValueError("estimate needs at least one finished round")
    if all(o.delta_bytes is not None for o in observations):
        return _estimate_from_deltas(observations, overhead_s)
    return _estimate_from_durations(observations, overhead_s)


def _estimate_from_deltas(obs: Sequence[RoundObservation], overhead_s: float | None) -> ChainEstimate:
    later = [(float(o.delta_bytes), o.duration_s) for o in obs if o.index > 1]
    # Round 1 copies the whole volume at first-snapshot speed; fit without it once the later rounds can.
    points = later if len({x for x, _ in later}) >= 2 else [(float(o.delta_bytes), o.duration_s) for o in obs]
    c = overhead_s
    throughput = None
    if c is None and len(points) >= 2:
        fit = _fit_line(points)
        if fit is not None and fit[0] >= 0 and fit[1] > 0:
            c, throughput = fit[0], 1 / fit[1]
    if throughput is None:
        c = c or 0.0
        rates = [x / (y - c) for x, y in points if x > 0 and y > c]
        throughput = statistics.median(rates) if rates else None
    write_rate, hot_set = None, 0.0
    # Each later round stores what was written since the previous round started: delta = H + W * interval.
    # A line through the last rounds separates the uniform write rate W from a hot set H rewritten every
    # round; a single ratio delta / interval would fold H into W and underestimate the floor.
    spans = [((b.started_at - a.started_at).total_seconds(), float(b.delta_bytes), b.index)
             for a, b in zip(obs, obs[1:], strict=False)]
    spans = [(x, y, i) for x, y, i in spans if x > 0]
    # The interval after the full snapshot is hours long: uniform writes overlap there, which bends the
    # line; leave it out once two shorter intervals can carry the fit.
    short = [(x, y) for x, y, i in spans if i > 2]
    spans = (short if len(short) >= 2 else [(x, y) for x, y, _ in spans])[-_HOT_SET_FIT_ROUNDS:]
    if len(spans) >= 2:
        fit = _fit_line(spans)
        if fit is not None and fit[0] > 0 and fit[1] >= 0:
            hot_set, write_rate = fit
    if write_rate is None and spans:
        write_rate = spans[-1][1] / spans[-1][0]
    r = write_rate / throughput if write_rate is not None and throughput else None
    return ChainEstimate(len(obs), "delta_bytes", throughput, write_rate, c, r, hot_set)


def _estimate_from_durations(obs: Sequence[RoundObservation], overhead_s: float | None) -> ChainEstimate:
    pairs = [(a.duration_s, b.duration_s) for a, b in zip(obs, obs[1:], strict=False)]
    c, r = overhead_s, None
    if c is None and len(pairs) >= 2:
        fit = _fit_line(pairs)
        if fit is not None and fit[0] >= 0 and fit[1] >= 0:
            c, r = fit
    if r is None and pairs:
        c = c or 0.0
        r = statistics.median(max(0.0, y - c) / x for x, y in pairs)
    c = c or 0.0
    throughput = None
    if obs[0].index == 1 and obs[0].duration_s > c:
        throughput = obs[0].volume_size_bytes / (obs[0].duration_s - c)
    write_rate = r * throughput if r is not None and throughput is not None else None
    return ChainEstimate(len(obs), "durations", throughput, write_rate, c, r)


def predict_next(observations: Sequence[RoundObservation], now: datetime | None = None,
                 overhead_s: float | None = None) -> float | None:
    """Predicted duration of a snapshot started at `now` (default: when the last round completed).

    It copies what was written since the last round started: c + r * (interval since that start).
    None until two rounds have finished (one round cannot tell the write rate).
    """
    return _predict(estimate(observations, overhead_s), observations[-1], now)


def _predict(est: ChainEstimate, last: RoundObservation, now: datetime | None) -> float | None:
    if est.r is None:
        return None
    interval_s = last.duration_s
    if now is not None:
        interval_s = max(interval_s, (now - last.started_at).total_seconds())
    return est.overhead_s + est.hot_set_s + est.r * interval_s


@dataclass(frozen=True)
class ChainPlan:
    """The chain predicted before the first snapshot; `rounds` are live rounds before the final one."""

    outcome: str  # the action decide would end with: cut_over, stalled_at_floor, max_rounds, diverging
    converges: bool
    reaches_target: bool
    rounds: int | None
    round_durations_s: tuple[float, ...]
    final_round_s: float | None
    copy_time_s: float
    downtime_s: float | None
    total_chain_s: float | None
    floor_s: float
    r: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _near_floor(final_s: float, floor_s: float | None, copy_time_s: float, margin: float) -> bool:
    """A final snapshot this long gives a downtime within `margin` of the best reachable one, floor + copy."""
    if floor_s is None or not math.isfinite(floor_s):
        return False
    return final_s - floor_s <= margin * (floor_s + copy_time_s)


def plan_before_start(volume_size_bytes: int, throughput_bps: float, write_rate_bps: float, overhead_s: float,
                      downtime_target_s: float, copy_time_s: float, max_rounds: int, *,
                      stall_ratio: float = 0.8, stall_window: int = 2, floor_margin: float = 0.1) -> ChainPlan:
    """Predict rounds, downtime and total chain time from T, W and c, with the rules `decide` applies.

    Closed form: d_1 = c + V/T and d_i = d* + r^(i-1) * (d_1 - d*), d* = c / (1 - r). The chain has
    n live rounds, n the first i where the final round d_(i+1) plus the copy is within floor_margin of
    floor + copy (or the chain stalls, or max_rounds is reached); the outcome is cut_over when that
    downtime fits the target, else stalled_at_floor. r >= 1 is reported as "diverging", not raised.
    The round copies are not modelled: `decide` holds the chain at its floor while they catch up.
    """
    for name, value in (("volume_size_bytes", volume_size_bytes), ("throughput_bps", throughput_bps)):
        if not _is_number(value) or value <= 0:
            raise ValueError(f"{name} {value!r} must be a number > 0")
    for name, value in (("write_rate_bps", write_rate_bps), ("overhead_s", overhead_s),
                        ("copy_time_s", copy_time_s)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} {value!r} must be a number >= 0")
    params = ChainParams(downtime_target_s=downtime_target_s, max_rounds=max_rounds, stall_ratio=stall_ratio,
                         stall_window=stall_window, copy_time_s=copy_time_s, overhead_s=overhead_s,
                         floor_margin=floor_margin)
    r = write_rate_bps / throughput_bps
    c = overhead_s
    first_s = c + volume_size_bytes / throughput_bps
    numbers = (f"T={_mibps(throughput_bps)}, W={_mibps(write_rate_bps)}, r={r:.2f}, c={_secs(c)}, "
               f"first snapshot {_secs(first_s)}")
    if r >= 1:
        return ChainPlan(DIVERGING, False, False, None, (first_s,), None, copy_time_s, None, None, math.inf, r,
                         f"the chain diverges ({numbers}): writes dirty blocks at least as fast as snapshots "
                         "copy them, so every round lasts as long as the last; throttle writes below T or "
                         "catch up through WAL instead")
    floor_s = c / (1 - r)

    def duration(i: int) -> float:
        return floor_s + r ** (i - 1) * (first_s - floor_s)

    durations = [first_s]
    outcome = MAX_ROUNDS
    for i in range(1, max_rounds + 1):
        final_s = duration(i + 1)
        ratios = [duration(j) / duration(j - 1) for j in range(max(2, i - stall_window + 1), i + 1)]
        stalled = len(ratios) == stall_window and all(x > stall_ratio for x in ratios)
        if stalled or _near_floor(final_s, floor_s, copy_time_s, floor_margin):
            outcome = CUT_OVER if final_s + copy_time_s <= params.downtime_target_s else STALLED_AT_FLOOR
        if outcome != MAX_ROUNDS or i == max_rounds:
            break
        durations.append(duration(i + 1))
    n = len(durations)
    final_s = duration(n + 1)
    downtime_s = final_s + copy_time_s
    total_s = sum(durations) + downtime_s
    reaches = downtime_s <= downtime_target_s
    summary = (f"{n} live round(s), final snapshot {_secs(final_s)} + copy {_secs(copy_time_s)} = downtime "
               f"{_secs(downtime_s)} (target {_secs(downtime_target_s)}), total {total_s / 3600:.2f} h, "
               f"floor d*={_secs(floor_s)}; {numbers}")
    if outcome == CUT_OVER:
        message = f"the chain meets the target near its floor: {summary}"
    elif outcome == STALLED_AT_FLOOR:
        message = (f"the chain reaches its floor above the target: {summary}; lower the write rate or "
                   "accept the longer downtime")
    else:
        message = (f"max_rounds {max_rounds} is reached before the floor "
                   f"({'within' if reaches else 'above'} the target): {summary}")
    return ChainPlan(outcome, True, reaches, n, tuple(durations), final_s, copy_time_s, downtime_s, total_s,
                     floor_s, r, message)


def hot_set_floor_s(throughput_bps: float, write_rate_bps: float, overhead_s: float, hot_set_bytes: float,
                    hot_write_rate_bps: float) -> float:
    """Floor of a chain whose writes are uniform at W plus a hot set of H bytes rewritten at W_h.

    Each round copies c plus the uniform writes plus min(H, W_h * d) of the hot set:
    d* solves d = c + (W*d + min(H, W_h*d)) / T (a concave map, so the fixed point is unique).
    """
    r_uniform = write_rate_bps / throughput_bps
    saturated_s = math.inf if r_uniform >= 1 else (overhead_s + hot_set_bytes / throughput_bps) / (1 - r_uniform)
    if hot_write_rate_bps * saturated_s >= hot_set_bytes:
        return saturated_s
    r_total = r_uniform + hot_write_rate_bps / throughput_bps
    return math.inf if r_total >= 1 else overhead_s / (1 - r_total)


@dataclass(frozen=True, kw_only=True)
class CopyState:
    """Where the round copies to the destination stand, as DescribeSnapshots shows them there."""

    copied_through: int = 0  # newest round whose copy has completed; 0 when none has
    pending_index: int | None = None  # the round whose copy is in flight, if one is
    pending_started_at: datetime | None = None
    pending_progress: float | None = None  # 0..1 (Progress "37%" is 0.37)
    # (round index, seconds) of each completed copy: their throughput times the copy in flight
    completed_s: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.copied_through, int) or isinstance(self.copied_through, bool) or self.copied_through < 0:
            raise ValueError(f"copied_through {self.copied_through!r} must be a round index >= 0 (0: no copy "
                             "has completed)")
        if self.pending_progress is not None and (not _is_number(self.pending_progress)
                                                  or not 0 <= self.pending_progress <= 1):
            raise ValueError(f"pending_progress {self.pending_progress!r} must be a fraction from 0 to 1")

    def describe(self) -> str:
        text = f"round {self.copied_through} is the newest copied" if self.copied_through else "no round is copied yet"
        if self.pending_index is not None:
            progress = "" if self.pending_progress is None else f", {self.pending_progress:.0%}"
            text += f", the copy of round {self.pending_index} is in flight{progress}"
        return text


def _progress(value: Any) -> float | None:
    if isinstance(value, str):
        value = value.strip().rstrip("%")
        try:
            return min(1.0, max(0.0, float(value) / 100)) if value else None
        except ValueError:
            return None
    return min(1.0, max(0.0, value / 100)) if _is_number(value) else None


def copy_state(copies: Iterable[Mapping[str, Any]]) -> CopyState:
    """CopyState from the round copies, each {"index": round} plus DescribeSnapshots' State, StartTime,
    CompletionTime (when completed) and Progress ("37%"). A round of several volumes counts as copied
    when all its copies are; in flight while any is (the least advanced one times it)."""
    rounds: dict[int, list[Mapping[str, Any]]] = {}
    for copy in copies:
        rounds.setdefault(int(copy["index"]), []).append(copy)
    completed, pending = [], []
    for index, items in sorted(rounds.items()):
        if all(c.get("State") == "completed" and c.get("CompletionTime") for c in items):
            completed.append((index, max((c["CompletionTime"] - c["StartTime"]).total_seconds() for c in items)))
        elif any(c.get("State") == "pending" for c in items):
            slowest = min((c for c in items if c.get("State") == "pending"),
                          key=lambda c: _progress(c.get("Progress")) or 0.0)
            pending.append((index, slowest))
    copied_through = max((index for index, _ in completed), default=0)
    if not pending:
        return CopyState(copied_through=copied_through, completed_s=tuple(completed))
    index, newest = pending[-1]
    return CopyState(copied_through=copied_through, pending_index=index, pending_started_at=newest.get("StartTime"),
                     pending_progress=_progress(newest.get("Progress")), completed_s=tuple(completed))


def next_copy(round_indexes: Iterable[int], copies: CopyState) -> int | None:
    """The round to copy now, or None: the newest finished round, once no copy is in flight.

    A copy is incremental from the newest completed copy of an ancestor, so a copy started while
    another runs carries the same blocks again (a full copy when none has completed). One at a time,
    newest round first, keeps each copy to what changed since the last one and runs it beside the
    next snapshot instead of before it.
    """
    if copies.pending_index is not None:
        return None
    newest = max(round_indexes, default=0)
    return newest if newest > copies.copied_through else None


# A final snapshot predicted this much longer than the last round (plus EC2's 15 s between snapshots of a
# volume) no longer "follows the round": take a fresh round first.
FRESH_TOLERANCE = 0.1
FRESH_SLACK_S = 15.0
# A round after a paced wait lasts at most this share of the last one: waiting never makes a round grow,
# and the shrinking rounds never look stalled.
PACE_SHRINK = 0.5
# Below this Progress the copy in flight is timed from the completed copies' throughput instead.
_MIN_PROGRESS = 0.05


def _next_s(est: ChainEstimate, obs: Sequence[RoundObservation], now: datetime) -> float | None:
    next_s = _predict(est, obs[-1], now)
    if est.throughput_bps:
        # No snapshot copies more than the whole volume: a small or idle volume may cut over whatever r says.
        full_s = est.overhead_s + est.hot_set_s + obs[-1].volume_size_bytes / est.throughput_bps
        next_s = full_s if next_s is None else min(next_s, full_s)
    return next_s


def _fresh(est: ChainEstimate, obs: Sequence[RoundObservation], next_s: float | None) -> bool:
    if next_s is None:
        return True
    reference_s = max(obs[-1].duration_s, est.floor_s or 0.0)
    return next_s <= reference_s * (1 + FRESH_TOLERANCE) + FRESH_SLACK_S


def fresh_for_cutover(observations: Sequence[RoundObservation], now: datetime,
                      overhead_s: float | None = None) -> bool:
    """Whether a final snapshot taken at `now` is predicted no longer than the last round (within noise).

    The cutover must follow a round: anything that delays it (an approval, a copy, a retry) adds its
    writes to the final snapshot. When this is False, take a fresh round and decide again.
    """
    obs = sorted(observations, key=lambda o: o.index)
    if not obs:
        return False
    est = estimate(obs, overhead_s)
    return _fresh(est, obs, _next_s(est, obs, now))


def _copy_done_at(obs: Sequence[RoundObservation], copies: CopyState, now: datetime) -> datetime | None:
    """When the copy in flight should complete, from its Progress or the completed copies; None if unknown.

    With one copy in flight at a time, a copy carries the rounds after the previous completed one.
    """
    started = copies.pending_started_at
    if copies.pending_index is None or started is None:
        return None
    progress = copies.pending_progress or 0.0
    elapsed_s = (now - started).total_seconds()
    if progress >= _MIN_PROGRESS and elapsed_s > 0:
        return started + timedelta(seconds=elapsed_s / progress)
    deltas = {o.index: o.delta_bytes for o in obs}
    if any(d is None for d in deltas.values()):
        return None

    def carried(after: int, through: int) -> float:
        return float(sum(d for i, d in deltas.items() if after < i <= through))

    rates, previous = [], 0
    for index, seconds in copies.completed_s:
        if seconds > 0 and carried(previous, index) > 0:
            rates.append((carried(previous, index), carried(previous, index) / seconds))
        previous = index
    if not rates:
        return None
    copy_bps = max(rates)[1]  # the biggest copy: least bent by the fixed per-copy overhead
    return started + timedelta(seconds=carried(copies.copied_through, copies.pending_index) / copy_bps)


def _pace_s(est: ChainEstimate, obs: Sequence[RoundObservation], copy_done_at: datetime | None,
            now: datetime) -> float:
    """Seconds to wait before the next round so that it ends as the copy in flight does.

    Copies start right after rounds, so a round ending with the copy starts the next copy without a
    gap, while the chain stays short of its floor instead of idling there. A wait goes into the
    next round, so it is only taken while that round stays at most PACE_SHRINK of the last: far from
    the floor there is room, at the floor none (the chain then holds with back-to-back rounds).
    """
    r = est.r
    if copy_done_at is None or r is None or not 0 < r < 1:
        return 0.0
    base_s = est.overhead_s + est.hot_set_s
    since_start_s = (now - obs[-1].started_at).total_seconds()
    max_wait_s = (PACE_SHRINK * obs[-1].duration_s - base_s) / r - since_start_s
    # the round after a wait w ends at now + w + base + r * (since_start + w)
    wait_s = ((copy_done_at - now).total_seconds() - base_s - r * since_start_s) / (1 + r)
    return max(0.0, min(wait_s, max_wait_s))


@dataclass(frozen=True)
class ChainNumbers:
    rounds: int
    method: str | None
    r: float | None
    throughput_bps: float | None
    write_rate_bps: float | None
    overhead_s: float | None
    predicted_next_s: float | None
    predicted_copy_s: float
    predicted_downtime_s: float | None
    floor_s: float | None
    downtime_target_s: float
    last_ratio: float | None
    hot_set_bytes: float = 0.0
    copied_through: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    numbers: ChainNumbers
    # Start the next round this many seconds from now (0: at once); only with copies to pace against.
    wait_s: float = 0.0

    @property
    def proceed_to_cutover(self) -> bool:
        return self.action in CUTOVER_ACTIONS

    @property
    def take_round(self) -> bool:
        return self.action in ROUND_ACTIONS

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "numbers": self.numbers.to_dict(),
                "wait_s": self.wait_s}


def decide(observations: Sequence[RoundObservation], params: ChainParams, now: datetime, *,
           copies: CopyState | None = None) -> Decision:
    """Take another round, or stop (and why), given the finished rounds in index order.

    Call it right after a round completes: a cutover decided later is refused (a fresh round first).
    With `copies` (the rounds' copies to the destination), a chain ready to cut over holds with
    another round while the copy before the last round is not done, and `wait_s` paces the rounds
    to the copies; without, the copies are not looked at.
    """
    obs = sorted(observations, key=lambda o: o.index)
    target_s = params.downtime_target_s
    copied = None if copies is None else copies.copied_through
    if not obs:
        numbers = ChainNumbers(0, None, None, None, None, params.overhead_s, None, params.copy_time_s, None, None,
                               target_s, None, copied_through=copied)
        return Decision(ANOTHER_ROUND, "no round has finished: take the first, full snapshot", numbers)
    est = estimate(obs, params.overhead_s)
    next_s = _next_s(est, obs, now)
    downtime_s = None if next_s is None else next_s + params.copy_time_s
    durations = [o.duration_s for o in obs]
    ratios = [b / a for a, b in zip(durations, durations[1:], strict=False)]
    numbers = ChainNumbers(len(obs), est.method, est.r, est.throughput_bps, est.write_rate_bps, est.overhead_s,
                           next_s, params.copy_time_s, downtime_s, est.floor_s, target_s,
                           ratios[-1] if ratios else None, est.hot_set_bytes, copied)
    hot = f", hot set H={est.hot_set_bytes / MIB:.0f} MiB" if est.hot_set_bytes else ""
    figures = (f"round {obs[-1].index} took {_secs(durations[-1])}; T={_mibps(est.throughput_bps)}, "
               f"W={_mibps(est.write_rate_bps)}, r={_ratio(est.r)}, c={_secs(est.overhead_s)}{hot}, "
               f"floor d*={_secs(est.floor_s)}; predicted final snapshot {_secs(next_s)} + copy "
               f"{_secs(params.copy_time_s)} = downtime {_secs(downtime_s)} (target {_secs(target_s)})")
    if copies is not None:
        figures += f"; copies: {copies.describe()}"
    under_target = next_s is not None and next_s + params.copy_time_s <= target_s
    if next_s is None or (est.r is None and not under_target):
        if len(obs) >= params.max_rounds:
            return Decision(MAX_ROUNDS, f"max_rounds {params.max_rounds} reached before the write rate was "
                            f"known: cut over with an unknown downtime; {figures}", numbers)
        return Decision(ANOTHER_ROUND, f"one round cannot tell the write rate: take another; {figures}", numbers)
    if est.r is not None and est.r >= 1 and not under_target:
        return Decision(DIVERGING, f"the chain diverges (r={est.r:.2f} >= 1: writes dirty blocks at "
                        f"{_mibps(est.write_rate_bps)}, snapshots copy {_mibps(est.throughput_bps)}); stop "
                        f"chaining: throttle writes or catch up through WAL instead; {figures}", numbers)
    stop = _stop(est, obs, params, now, next_s, downtime_s, under_target, ratios, figures)
    pace_s = 0.0
    if copies is not None and params.cutover_at is None:
        pace_s = _pace_s(est, obs, _copy_done_at(obs, copies, now), now)
    paced = f"; start it in {_secs(pace_s)}, so that it ends as the copy in flight does" if pace_s else ""
    if stop is None:
        if under_target and params.cutover_at is not None:
            why = (f"under target, waiting for cutover_at {params.cutover_at.isoformat()}: keep the delta small "
                   "with another round")
        elif under_target:
            gain_s = (1 - est.r) * (next_s - est.floor_s)
            why = (f"under target but {_secs(next_s - est.floor_s)} above the floor: another round takes about "
                   f"{_secs(gain_s)} off the downtime")
        else:
            why = "above target and still shrinking: take another round"
        return Decision(ANOTHER_ROUND, f"{why}{paced}; {figures}", numbers, pace_s)
    action, reason = stop
    if not _fresh(est, obs, next_s):
        lag_s = (now - obs[-1].started_at).total_seconds() - durations[-1]
        return Decision(ANOTHER_ROUND, f"{action}, but round {obs[-1].index} ended {_secs(lag_s)} ago: a final "
                        f"snapshot now ({_secs(next_s)}) would carry that wait too and outgrow the round "
                        f"({_secs(durations[-1])}); take a fresh round and decide right after it; {figures}",
                        numbers)
    if copies is not None and copies.copied_through < obs[-1].index - 1:
        return Decision(HOLD_FOR_COPIES, f"ready to cut over ({action}) but the round copies lag ("
                        f"{copies.describe()}): the final copy would wait for them, so hold the delta at the "
                        f"floor with another round, beside the copy{paced}; {figures}", numbers, pace_s)
    return Decision(action, reason, numbers)


def _stop(est: ChainEstimate, obs: Sequence[RoundObservation], params: ChainParams, now: datetime, next_s: float,
          downtime_s: float, under_target: bool, ratios: Sequence[float], figures: str) -> tuple[str, str] | None:
    """The cutover action the rounds call for (and why), or None while another round pays off."""
    recent = ratios[-params.stall_window:]
    stalled = len(recent) == params.stall_window and all(x > params.stall_ratio for x in recent)
    near = _near_floor(next_s, est.floor_s, params.copy_time_s, params.floor_margin)
    floor_unknown = est.r is None or est.floor_s is None or not math.isfinite(est.floor_s)
    if params.cutover_at is not None and now >= params.cutover_at:
        return CUTOVER_AT_REACHED, (f"cutover_at {params.cutover_at.isoformat()} reached: quiesce writes and take "
                                    f"the final snapshot; {figures}")
    if under_target and params.cutover_at is None and (near or stalled or floor_unknown):
        why = ("within the floor margin" if near else "the rounds have stalled" if stalled
               else "the floor is unknown")
        return CUT_OVER, (f"under target and {why}: quiesce writes and take the final snapshot now; {figures}")
    if not under_target and (near or stalled):
        if stalled:
            why = (f"the last {params.stall_window} round-over-round ratios "
                   f"{', '.join(f'{x:.2f}' for x in recent)} exceed {params.stall_ratio}")
        else:
            why = (f"the predicted final snapshot is within {params.floor_margin:.0%} of floor + copy "
                   f"({_secs(est.floor_s + params.copy_time_s)})")
        return STALLED_AT_FLOOR, (f"the chain has reached its floor above the target: {why}, so more rounds "
                                  "will not shrink the delta; the floor is the overhead plus the hot working "
                                  "set rewritten every round, over 1 - r; cut over now with predicted downtime "
                                  f"{_secs(downtime_s)}; {figures}")
    if len(obs) >= params.max_rounds:
        return MAX_ROUNDS, (f"max_rounds {params.max_rounds} reached: cut over with predicted downtime "
                            f"{_secs(downtime_s)}; {figures}")
    return None
