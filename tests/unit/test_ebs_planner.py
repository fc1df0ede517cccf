import math
from datetime import UTC, datetime, timedelta

import pytest

from pgops.ebs import planner
from pgops.ebs.planner import ChainParams, RoundObservation

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
    # d: 50460, 5106, 571, then the final round 117 s + 60 s copy <= 300 s
    assert plan.outcome == planner.CUT_OVER and plan.reaches_target
    assert plan.rounds == 3
    assert plan.final_round_s == pytest.approx(C_S + 0.1 * 571.1, rel=1e-3)
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
    assert plan.final_round_s < 1.1 * plan.floor_s


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
def test_decide_cuts_over_when_final_round_fits(with_delta):
    params = ChainParams(downtime_target_s=300, max_rounds=10, copy_time_s=60)
    obs = chain(0.1 * T_BPS, 3, with_delta=with_delta)
    assert planner.decide(obs[:1], params, done(obs[:1])).action == planner.ANOTHER_ROUND
    assert planner.decide(obs[:2], params, done(obs[:2])).action == planner.ANOTHER_ROUND
    decision = planner.decide(obs, params, done(obs))
    assert decision.action == planner.CUT_OVER and decision.proceed_to_cutover
    assert decision.numbers.predicted_next_s == pytest.approx(117.1, abs=0.5)
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
    assert obs[-1].duration_s == pytest.approx(floor_s, rel=0.1)
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
    reached = planner.decide(obs, params, cutover_at)
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
