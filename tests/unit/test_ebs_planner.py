import math
from datetime import UTC, datetime, timedelta

import pytest

from pgops.core.ebs import planner
from pgops.core.ebs.planner import ChainParams, RoundObservation

GIB = 1024**3
TIB = 1024 * GIB
VOLUME_BYTES = 2 * TIB
FIRST_S = 14 * 3600
T_BPS = VOLUME_BYTES / FIRST_S
C_S = 60.0
T0 = datetime(2025, 1, 6, tzinfo=UTC)


def chain(write_rate_bps, rounds, *, hot_set_bytes=0, with_delta=True):
    """Rounds that follow the model exactly: back to back, delta = uniform writes + saturated hot set."""
    obs, start, delta = [], T0, VOLUME_BYTES
    for i in range(1, rounds + 1):
        duration_s = C_S + delta / T_BPS
        obs.append(RoundObservation(index=i, started_at=start, duration_s=duration_s,
                                    delta_bytes=int(delta) if with_delta else None,
                                    volume_size_bytes=VOLUME_BYTES))
        start += timedelta(seconds=duration_s)
        delta = write_rate_bps * duration_s + hot_set_bytes
    return obs


def done(obs):
    return obs[-1].started_at + timedelta(seconds=obs[-1].duration_s)


def test_closed_form_rounds_for_r_0_1():
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, 0.1 * T_BPS, C_S, downtime_target_s=300,
                                     copy_time_s=60, max_rounds=10)
    # d: 50460, 5106, 571, 117; the target fits after 571 s (final 117 s + 60 s), but one more round takes the
    # final snapshot to 71.7 s, within 10% of floor + copy (66.7 + 60 s)
    assert plan.outcome == planner.CUT_OVER and plan.reaches_target
    assert plan.rounds == 4
    assert plan.final_round_s == pytest.approx(C_S + 0.1 * 117.05, rel=1e-3)
    assert plan.downtime_s <= 1.1 * (plan.floor_s + 60)
    assert plan.floor_s == pytest.approx(C_S / 0.9)
    assert plan.total_chain_s == pytest.approx(sum(plan.round_durations_s) + plan.downtime_s)
    assert plan.round_durations_s[0] == pytest.approx(FIRST_S + C_S)


def test_plan_reports_divergence():
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, 1.2 * T_BPS, C_S, downtime_target_s=300,
                                     copy_time_s=60, max_rounds=10)
    assert plan.outcome == planner.DIVERGING and not plan.converges and plan.rounds is None
    assert "WAL" in plan.message and "r=1.20" in plan.message


def test_plan_stalls_when_floor_above_target():
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, 0.5 * T_BPS, C_S, downtime_target_s=150,
                                     copy_time_s=60, max_rounds=30)
    assert plan.floor_s == pytest.approx(120)
    assert plan.outcome == planner.STALLED_AT_FLOOR and not plan.reaches_target
    assert plan.final_round_s - plan.floor_s <= 0.1 * (plan.floor_s + 60)


def test_estimate_from_deltas_recovers_t_w_c():
    est = planner.estimate(chain(0.1 * T_BPS, 4))
    assert est.method == "delta_bytes"
    assert est.throughput_bps == pytest.approx(T_BPS, rel=1e-6)
    assert est.write_rate_bps == pytest.approx(0.1 * T_BPS, rel=1e-6)
    assert est.overhead_s == pytest.approx(C_S, rel=1e-6)
    assert est.r == pytest.approx(0.1, rel=1e-6)


def test_estimate_from_durations_alone():
    est = planner.estimate(chain(0.1 * T_BPS, 4, with_delta=False))
    assert est.method == "durations"
    assert est.r == pytest.approx(0.1, rel=1e-6)
    assert est.overhead_s == pytest.approx(C_S, rel=1e-6)
    assert est.throughput_bps == pytest.approx(T_BPS, rel=1e-6)


def test_predict_next_follows_recurrence():
    obs = chain(0.1 * T_BPS, 3)
    assert planner.predict_next(obs) == pytest.approx(C_S + 0.1 * obs[-1].duration_s, rel=1e-6)
    assert planner.predict_next(obs[:1]) is None


@pytest.mark.parametrize("with_delta", [True, False])
def test_decide_goes_on_while_a_round_pays_off_then_cuts_over_near_the_floor(with_delta):
    params = ChainParams(downtime_target_s=300, max_rounds=10, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 4, with_delta=with_delta)
    assert planner.decide(obs[:1], params, done(obs[:1])).action == planner.ANOTHER_ROUND
    assert planner.decide(obs[:2], params, done(obs[:2])).action == planner.ANOTHER_ROUND
    # Under target (117 s + 60 s <= 300 s) but 50 s above the floor: one more round takes ~45 s off.
    pays_off = planner.decide(obs[:3], params, done(obs[:3]))
    assert pays_off.action == planner.ANOTHER_ROUND and "above the floor" in pays_off.reason
    assert pays_off.numbers.predicted_next_s == pytest.approx(117.1, abs=0.5)
    decision = planner.decide(obs, params, done(obs))
    assert decision.action == planner.CUT_OVER and decision.proceed_to_cutover
    assert decision.numbers.predicted_next_s == pytest.approx(71.7, abs=0.5)
    assert "r=0.10" in decision.reason and "MiB/s" in decision.reason and "target 300 s" in decision.reason


def test_decide_first_call_asks_for_full_snapshot():
    decision = planner.decide([], ChainParams(downtime_target_s=300, max_rounds=5, copy_time_s=60), T0)
    assert decision.action == planner.ANOTHER_ROUND and "full" in decision.reason


def test_decide_diverging():
    obs = chain(1.3 * T_BPS, 2)
    decision = planner.decide(obs, ChainParams(downtime_target_s=300, max_rounds=10, copy_time_s=60), done(obs))
    assert decision.action == planner.DIVERGING and not decision.proceed_to_cutover
    assert decision.numbers.r == pytest.approx(1.3, rel=1e-6)
    assert "throttle writes" in decision.reason and "WAL" in decision.reason
    assert math.isinf(decision.numbers.floor_s)


def test_decide_stalls_at_hot_set_floor():
    hot = 8 * GIB
    params = ChainParams(downtime_target_s=200, max_rounds=20, copy_time_s=60)
    floor_s = planner.hot_set_floor_s(T_BPS, 0.1 * T_BPS, C_S, hot, hot_write_rate_bps=1e12)
    assert floor_s == pytest.approx((C_S + hot / T_BPS) / 0.9)
    obs = chain(0.1 * T_BPS, 1, hot_set_bytes=hot)
    while True:
        decision = planner.decide(obs, params, done(obs))
        if decision.action != planner.ANOTHER_ROUND:
            break
        obs = chain(0.1 * T_BPS, len(obs) + 1, hot_set_bytes=hot)
    assert decision.action == planner.STALLED_AT_FLOOR and decision.proceed_to_cutover
    assert decision.numbers.predicted_next_s - floor_s <= 0.1 * (floor_s + 60) + 1
    assert decision.numbers.predicted_next_s <= obs[-1].duration_s
    assert decision.numbers.predicted_downtime_s > params.downtime_target_s
    assert "hot working set" in decision.reason and "predicted downtime" in decision.reason


def test_decide_max_rounds():
    obs = chain(0.5 * T_BPS, 3)
    decision = planner.decide(obs, ChainParams(downtime_target_s=130, max_rounds=3, copy_time_s=5), done(obs))
    assert decision.action == planner.MAX_ROUNDS and decision.proceed_to_cutover


def test_cutover_at_defers_cutover_until_reached():
    obs = chain(0.1 * T_BPS, 4)
    cutover_at = done(obs) + timedelta(hours=2)
    params = ChainParams(downtime_target_s=300, max_rounds=50, copy_time_s=60, cutover_at=cutover_at)
    waiting = planner.decide(obs, params, done(obs))
    assert waiting.action == planner.ANOTHER_ROUND and "cutover_at" in waiting.reason
    # Asked 2 h after the last round, the final snapshot would carry those 2 h: a fresh round first.
    late = planner.decide(obs, params, cutover_at)
    assert late.action == planner.ANOTHER_ROUND and "fresh round" in late.reason
    # That round stores everything written since round 4 started; right after it, the cutover follows.
    delta = 0.1 * T_BPS * (cutover_at - obs[-1].started_at).total_seconds()
    fresh = RoundObservation(index=5, started_at=cutover_at, duration_s=C_S + delta / T_BPS, delta_bytes=int(delta),
                             volume_size_bytes=VOLUME_BYTES)
    reached = planner.decide([*obs, fresh], params, done([fresh]))
    assert reached.action == planner.CUTOVER_AT_REACHED and reached.proceed_to_cutover


def test_observation_needs_a_duration():
    with pytest.raises(ValueError, match="completed_at or duration_s"):
        RoundObservation(index=1, started_at=T0, volume_size_bytes=1)
    obs = RoundObservation(index=2, started_at=T0, completed_at=T0 + timedelta(seconds=90), volume_size_bytes=1)
    assert obs.duration_s == 90


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"downtime_target_s": 0}, "downtime_target_s"),
    ({"max_rounds": 1}, "max_rounds"),
    ({"stall_ratio": 1.5}, "stall_ratio"),
    ({"stall_window": 0}, "stall_window"),
    ({"copy_time_s": -1}, "copy_time_s"),
    ({"copy_time_s": 400}, "copy_time_s"),
    ({"overhead_s": -3}, "overhead_s"),
    ({"cutover_at": datetime(2025, 1, 1)}, "cutover_at"),
])
def test_params_validation_names_the_field(kwargs, field):
    base = {"downtime_target_s": 300, "max_rounds": 10, "copy_time_s": 60} | kwargs
    with pytest.raises(ValueError, match=field):
        ChainParams(**base)


def test_estimate_separates_hot_set_from_write_rate():
    hot = 8 * GIB
    obs = chain(0.1 * T_BPS, 5, hot_set_bytes=hot)
    est = planner.estimate(obs)
    assert est.hot_set_bytes == pytest.approx(hot, rel=1e-3)
    assert est.r == pytest.approx(0.1, rel=1e-3)
    assert est.floor_s == pytest.approx((C_S + hot / T_BPS) / 0.9, rel=1e-3)
    # The next round copies the hot set plus the uniform writes of the last interval.
    expected_s = C_S + (hot + 0.1 * T_BPS * obs[-1].duration_s) / T_BPS
    assert planner.predict_next(obs) == pytest.approx(expected_s, rel=1e-3)


COPY_S = 120.0
TARGETS = (600.0, 300.0, 200.0, 130.0, COPY_S + 1)  # loosest first; the last: as low as possible


def run_model(write_rate_bps, target_s, *, hot_set_bytes=0, max_rounds=20):
    """Decide after each model-exact round (back to back) until the planner stops."""
    params = ChainParams(downtime_target_s=target_s, max_rounds=max_rounds, copy_time_s=COPY_S)
    obs = chain(write_rate_bps, 1, hot_set_bytes=hot_set_bytes)
    while True:
        decision = planner.decide(obs, params, done(obs))
        if not decision.take_round:
            return decision, obs
        obs = chain(write_rate_bps, len(obs) + 1, hot_set_bytes=hot_set_bytes)


@pytest.mark.parametrize(("r", "hot"), [(0.1, 0), (0.3, 0), (0.5, 0), (0.1, 8 * GIB), (0.3, 16 * GIB)])
def test_every_target_ends_near_the_floor_and_a_stricter_one_never_worse(r, hot):
    floor_s = (C_S + hot / T_BPS) / (1 - r)
    downtimes = []
    for target_s in TARGETS:
        decision, obs = run_model(r * T_BPS, target_s, hot_set_bytes=hot)
        assert decision.proceed_to_cutover
        final_s = decision.numbers.predicted_next_s
        # The final snapshot follows the last round: never longer than it.
        assert final_s <= obs[-1].duration_s * 1.001
        assert final_s + COPY_S <= 1.1 * (floor_s + COPY_S) + 1
        assert decision.action == (planner.CUT_OVER if final_s + COPY_S <= target_s else planner.STALLED_AT_FLOOR)
        downtimes.append(decision.numbers.predicted_downtime_s)
    assert all(b <= a + 1e-6 for a, b in zip(downtimes, downtimes[1:], strict=False)), downtimes


@pytest.mark.parametrize("r", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_plan_a_stricter_target_never_plans_a_longer_downtime(r):
    plans = [planner.plan_before_start(VOLUME_BYTES, T_BPS, r * T_BPS, C_S, target_s, COPY_S, max_rounds=30)
             for target_s in TARGETS]
    downtimes = [p.downtime_s for p in plans]
    assert all(b <= a + 1e-6 for a, b in zip(downtimes, downtimes[1:], strict=False)), downtimes
    for plan, target_s in zip(plans, TARGETS, strict=True):
        assert plan.reaches_target == (plan.downtime_s <= target_s)
        # From r ~0.7 on, rounds shrink by less than stall_ratio long before the floor: the stall rule ends them.
        if r <= 0.5:
            assert plan.downtime_s <= 1.1 * (plan.floor_s + COPY_S) + 1e-6


def test_a_cutover_decided_after_a_wait_takes_a_fresh_round_first():
    params = ChainParams(downtime_target_s=300, max_rounds=6, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 6)
    assert planner.fresh_for_cutover(obs, done(obs))
    assert planner.decide(obs, params, done(obs)).action == planner.CUT_OVER
    # An approval or a copy wait of 10 minutes: the final snapshot would carry 60 s more writes than the round.
    later = done(obs) + timedelta(minutes=10)
    assert not planner.fresh_for_cutover(obs, later)
    late = planner.decide(obs, params, later)  # max_rounds is reached, yet no cutover this late
    assert late.action == planner.ANOTHER_ROUND and late.take_round and not late.proceed_to_cutover
    assert "max_rounds, but round 6 ended 600 s ago" in late.reason and "fresh round" in late.reason
    # With rounds left, the same wait simply makes another round pay off again.
    roomy = planner.decide(obs, ChainParams(downtime_target_s=300, max_rounds=20, copy_time_s=60), later)
    assert roomy.action == planner.ANOTHER_ROUND and "above the floor" in roomy.reason
    # EC2's 15 s between snapshots and a poll are within the tolerance.
    assert planner.fresh_for_cutover(obs, done(obs) + timedelta(seconds=30))
    assert not planner.fresh_for_cutover([], done(obs))


def test_copies_behind_the_last_round_hold_the_chain_at_its_floor():
    params = ChainParams(downtime_target_s=300, max_rounds=5, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 6)  # past max_rounds too: holding is not capped by it
    started = done(obs) - timedelta(seconds=30)
    behind = planner.CopyState(copied_through=1, pending_index=5, pending_started_at=started, pending_progress=0.2)
    hold = planner.decide(obs, params, done(obs), copies=behind)
    assert hold.action == planner.HOLD_FOR_COPIES and hold.take_round and not hold.proceed_to_cutover
    assert "copy of round 5 is in flight, 20%" in hold.reason and "round 1 is the newest copied" in hold.reason
    assert hold.wait_s == 0  # at the floor a wait would grow the next round: back to back
    assert hold.numbers.copied_through == 1
    caught_up = planner.CopyState(copied_through=5, pending_index=6, pending_started_at=done(obs), pending_progress=0)
    cut = planner.decide(obs, params, done(obs), copies=caught_up)
    assert cut.action == planner.CUT_OVER and cut.proceed_to_cutover
    assert planner.decide(obs, params, done(obs)).action == planner.CUT_OVER  # no copies given: no gate
    # max_rounds stops a chain far from its floor, but not before the copies catch up either.
    slow = chain(0.5 * T_BPS, 5)
    capped = planner.decide(slow, params, done(slow), copies=behind)
    assert capped.action == planner.HOLD_FOR_COPIES and "(max_rounds)" in capped.reason


def test_pacing_ends_the_next_round_with_the_copy_in_flight():
    params = ChainParams(downtime_target_s=300, max_rounds=20, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 2)
    copy_started = done(obs[:1])
    elapsed_s = (done(obs) - copy_started).total_seconds()
    copy_done = copy_started + timedelta(seconds=12660)
    copies = planner.CopyState(copied_through=0, pending_index=1, pending_started_at=copy_started,
                               pending_progress=elapsed_s / 12660)
    decision = planner.decide(obs, params, done(obs), copies=copies)
    assert decision.action == planner.ANOTHER_ROUND and decision.wait_s > 0
    assert "ends as the copy in flight does" in decision.reason
    start = done(obs) + timedelta(seconds=decision.wait_s)
    next_s = planner.predict_next(obs, start)
    assert start + timedelta(seconds=next_s) == pytest.approx(copy_done, abs=timedelta(seconds=2))
    assert next_s <= planner.PACE_SHRINK * obs[-1].duration_s
    # A copy far in the future: the wait stops where the next round would reach half the last one.
    far = planner.CopyState(copied_through=0, pending_index=1, pending_started_at=copy_started,
                            pending_progress=0.06)
    capped = planner.decide(obs, params, done(obs), copies=far)
    capped_s = planner.predict_next(obs, done(obs) + timedelta(seconds=capped.wait_s))
    assert capped_s == pytest.approx(planner.PACE_SHRINK * obs[-1].duration_s, rel=1e-6)


def test_pacing_times_a_fresh_copy_from_the_completed_ones():
    params = ChainParams(downtime_target_s=300, max_rounds=20, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 3)
    # The full copy of round 1 took 4 h; round 3's copy (rounds 2 and 3) just started at 0%.
    copies = planner.CopyState(copied_through=1, pending_index=3, pending_started_at=done(obs), pending_progress=0.0,
                               completed_s=((1, 4 * 3600.0),))
    copy_bps = VOLUME_BYTES / (4 * 3600)
    expected_done = done(obs) + timedelta(seconds=(obs[1].delta_bytes + obs[2].delta_bytes) / copy_bps)
    decision = planner.decide(obs, params, done(obs), copies=copies)
    start = done(obs) + timedelta(seconds=decision.wait_s)
    assert decision.wait_s > 0
    assert start + timedelta(seconds=planner.predict_next(obs, start)) == pytest.approx(
        expected_done, abs=timedelta(seconds=2))
    # Without delta bytes (durations only) nothing can time the copy: no wait.
    blind = planner.decide(chain(0.1 * T_BPS, 3, with_delta=False), params, done(obs), copies=copies)
    assert blind.wait_s == 0


def test_next_copy_keeps_one_copy_in_flight_newest_round_first():
    assert planner.next_copy([1, 2, 3], planner.CopyState()) == 3
    assert planner.next_copy([1, 2, 3], planner.CopyState(copied_through=3)) is None
    assert planner.next_copy([1, 2, 3], planner.CopyState(copied_through=1, pending_index=2)) is None
    assert planner.next_copy([], planner.CopyState()) is None


def test_copy_state_from_describe_snapshots():
    t = T0
    copies = [
        {"index": 1, "State": "completed", "StartTime": t, "CompletionTime": t + timedelta(hours=3), "Progress": "100%"},
        {"index": 4, "State": "pending", "StartTime": t + timedelta(hours=4), "Progress": "37%"},
        {"index": 2, "State": "error", "StartTime": t + timedelta(hours=3), "Progress": "12%"},
    ]
    state = planner.copy_state(copies)
    assert state.copied_through == 1 and state.pending_index == 4
    assert state.pending_progress == pytest.approx(0.37) and state.pending_started_at == t + timedelta(hours=4)
    assert state.completed_s == ((1, 3 * 3600.0),)
    assert planner.copy_state([]) == planner.CopyState()
    # Two volumes: round 4 is copied only when both copies are; its slower copy times it.
    two = [*copies, {"index": 4, "State": "completed", "StartTime": t + timedelta(hours=4),
                     "CompletionTime": t + timedelta(hours=5), "Progress": "100%"},
           {"index": 4, "State": "pending", "StartTime": t + timedelta(hours=4), "Progress": "12%"}]
    state = planner.copy_state(two)
    assert state.copied_through == 1 and state.pending_index == 4 and state.pending_progress == pytest.approx(0.12)
    two[-1] = two[-1] | {"State": "completed", "CompletionTime": t + timedelta(hours=6)}
    state = planner.copy_state(two[:1] + two[3:])
    assert state.copied_through == 4 and state.pending_index is None
    assert state.completed_s == ((1, 3 * 3600.0), (4, 2 * 3600.0))
    with pytest.raises(ValueError, match="copied_through"):
        planner.CopyState(copied_through=-1)
    with pytest.raises(ValueError, match="pending_progress"):
        planner.CopyState(pending_progress=1.5)


def test_decision_dict_carries_the_wait():
    decision = planner.decide(chain(0.1 * T_BPS, 2), ChainParams(downtime_target_s=300, max_rounds=5,
                                                                 copy_time_s=60), done(chain(0.1 * T_BPS, 2)))
    assert decision.to_dict()["wait_s"] == 0.0 and decision.to_dict()["numbers"]["copied_through"] is None
    assert planner.HOLD_FOR_COPIES in planner.ROUND_ACTIONS and planner.HOLD_FOR_COPIES not in planner.CUTOVER_ACTIONS


def test_floor_margin_must_be_positive():
    with pytest.raises(ValueError, match="floor_margin"):
        ChainParams(downtime_target_s=300, max_rounds=10, copy_time_s=60, floor_margin=0)
