from datetime import timedelta

import pytest

from pgops.core.ebs import planner
from pgops.core.ebs.planner import ChainParams
from pgops.lab import ebs_simulator as simulator
from pgops.lab.ebs_simulator import BLOCK_SIZE_BYTES, EbsSimulator, Workload

GIB = 1024**3
VOLUME_BYTES = 64 * GIB
T_BPS = VOLUME_BYTES / 3600  # first snapshot: one hour
C_S = 60.0


def make(write_rate_bps=0.0, hot_set_bytes=0, hot_write_rate_bps=0.0, copy_throughput_bps=100 * T_BPS, seed=7):
    sim = EbsSimulator(snapshot_throughput_bps=T_BPS, snapshot_overhead_s=C_S, copy_throughput_bps=copy_throughput_bps,
                       copy_overhead_s=10, seed=seed)
    volume_id = sim.create_volume(VOLUME_BYTES, Workload(write_rate_bps, hot_set_bytes, hot_write_rate_bps))
    return sim, volume_id


def test_first_snapshot_is_full_and_takes_overhead_plus_volume_over_throughput():
    sim, vol = make()
    sid = sim.create_snapshot(vol)
    sim.advance(1800)
    assert sim.describe_snapshot(sid)["Progress"] in ("48%", "49%", "50%")
    sim.advance(10 * 3600, until=sid)
    described = sim.describe_snapshot(sid)
    assert described["State"] == "completed" and described["Progress"] == "100%"
    assert (described["CompletionTime"] - described["StartTime"]).total_seconds() == pytest.approx(3600 + C_S)
    assert sim.list_changed_blocks(None, sid) == VOLUME_BYTES // BLOCK_SIZE_BYTES


def test_changed_blocks_follow_uniform_writes_and_union_over_the_lineage():
    sim, vol = make(write_rate_bps=0.01 * T_BPS)
    first = sim.create_snapshot(vol)
    sim.advance(3600)
    second = sim.create_snapshot(vol)
    sim.advance(3600)
    third = sim.create_snapshot(vol)
    sim.advance(6 * 3600)
    written = 0.01 * T_BPS * 3600 / BLOCK_SIZE_BYTES
    a, b = sim.list_changed_blocks(first, second), sim.list_changed_blocks(second, third)
    # Uniform writes hit a few blocks twice: slightly fewer distinct blocks than written.
    assert 0.98 * written < a <= written and 0.98 * written < b <= written
    assert a + b - 30 < sim.list_changed_blocks(first, third) <= a + b


def test_same_seed_same_chain():
    runs = []
    for _ in range(2):
        sim, vol = make(write_rate_bps=0.3 * T_BPS)
        runs.append(simulator.run_chain(sim, vol, ChainParams(downtime_target_s=200, max_rounds=10, copy_time_s=30)))
    assert [r.delta_bytes for r in runs[0].rounds] == [r.delta_bytes for r in runs[1].rounds]
    assert runs[0].downtime_s == runs[1].downtime_s


def test_five_pending_snapshots_limit():
    sim, vol = make(write_rate_bps=T_BPS)
    for _ in range(5):
        sim.create_snapshot(vol)
        sim.advance(15)
    with pytest.raises(simulator.ConcurrentSnapshotLimitExceeded, match="5 pending"):
        sim.create_snapshot(vol)


def test_fifteen_seconds_between_snapshots_of_a_volume():
    sim, vol = make()
    sim.create_snapshot(vol)
    sim.advance(10)
    with pytest.raises(simulator.SnapshotCreationPerVolumeRateExceeded, match="15 s"):
        sim.create_snapshot(vol)
    sim.advance(5)
    sim.create_snapshot(vol)


def test_pending_snapshots_share_the_throughput():
    sim, vol = make(write_rate_bps=0.5 * T_BPS)
    first = sim.create_snapshot(vol)
    sim.advance(600)
    second = sim.create_snapshot(vol)
    sim.advance(10 * 3600, until=first)
    duration_s = (sim.describe_snapshot(first)["CompletionTime"] - sim.describe_snapshot(first)["StartTime"])
    assert duration_s.total_seconds() > 3600 + C_S + 60
    sim.advance(3600, until=second)
    assert sim.describe_snapshot(second)["State"] == "completed"


def test_copy_is_incremental_after_the_parent_copy():
    sim, vol = make(write_rate_bps=0.01 * T_BPS, copy_throughput_bps=T_BPS)
    first = sim.create_snapshot(vol)
    sim.advance(10 * 3600, until=first)
    with pytest.raises(simulator.IncorrectState):
        sim.copy_snapshot(sim.create_snapshot(vol))
    full = sim.copy_snapshot(first)
    sim.advance(10 * 3600, until=full)
    second = sim.create_snapshot(vol)
    sim.advance(3600, until=second)
    incremental = sim.copy_snapshot(second)
    sim.advance(3600, until=incremental)
    full_s = (sim.describe_snapshot(full)["CompletionTime"] - sim.describe_snapshot(full)["StartTime"]).total_seconds()
    inc = sim.describe_snapshot(incremental)
    assert inc["SourceSnapshotId"] == second and inc["VolumeId"] == "vol-ffffffff"
    assert (inc["CompletionTime"] - inc["StartTime"]).total_seconds() < full_s / 10


def test_r_0_1_converges_in_the_predicted_rounds():
    sim, vol = make(write_rate_bps=0.1 * T_BPS)
    params = ChainParams(downtime_target_s=200, max_rounds=10, copy_time_s=60)
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, 0.1 * T_BPS, C_S, 200, 60, 10)
    run = simulator.run_chain(sim, vol, params)
    assert run.outcome == planner.CUT_OVER
    assert abs(len(run.rounds) - plan.rounds) <= 1
    for record in run.rounds[2:]:
        assert record.duration_s == pytest.approx(record.predicted_duration_s, rel=0.1)
    assert run.final_snapshot_s <= 1.2 * plan.final_round_s
    assert run.downtime_s == pytest.approx(run.final_snapshot_s + run.copy_s, abs=1)
    assert run.downtime_s < params.downtime_target_s
    assert run.floor_s == pytest.approx(C_S / 0.9, rel=0.1)


def test_r_at_least_1_is_diverging_and_never_cuts_over():
    # Mostly empty volume: uniform writes over 10x the used data barely overlap, so W really exceeds T.
    sim = EbsSimulator(snapshot_throughput_bps=T_BPS, snapshot_overhead_s=C_S, seed=3)
    vol = sim.create_volume(10 * VOLUME_BYTES, Workload(write_rate_bps=1.2 * T_BPS), used_bytes=VOLUME_BYTES)
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, 1.2 * T_BPS, C_S, 200, 60, 10)
    run = simulator.run_chain(sim, vol, ChainParams(downtime_target_s=200, max_rounds=10, copy_time_s=60))
    assert plan.outcome == run.outcome == planner.DIVERGING
    assert run.final_snapshot_id is None and run.downtime_s is None
    assert "throttle writes" in run.decisions[-1].reason


def test_hot_set_stalls_near_the_predicted_floor():
    hot, hot_bps = 1 * GIB, 50 * 1024**2
    sim, vol = make(write_rate_bps=0.1 * T_BPS, hot_set_bytes=hot, hot_write_rate_bps=hot_bps)
    floor_s = planner.hot_set_floor_s(T_BPS, 0.1 * T_BPS, C_S, hot, hot_bps)
    run = simulator.run_chain(sim, vol, ChainParams(downtime_target_s=150, max_rounds=15, copy_time_s=60))
    assert run.outcome == planner.STALLED_AT_FLOOR
    assert run.final_snapshot_id is not None
    # The final snapshot lands within the floor margin (10% of floor + copy) and follows the last round.
    assert run.final_snapshot_s - floor_s <= 0.1 * (floor_s + 60) + 5
    assert run.final_delta_bytes <= 1.05 * run.rounds[-1].delta_bytes
    assert "hot working set" in run.decisions[-1].reason


def test_failed_snapshot_is_reported_and_retaken():
    sim, vol = make(write_rate_bps=0.1 * T_BPS)
    sid = sim.create_snapshot(vol)
    sim.fail_next_snapshot(vol)
    sim.advance(10 * 3600, until=sid)
    failing = sim.create_snapshot(vol)
    sim.advance(3600, until=failing)
    assert sim.describe_snapshot(failing)["State"] == "error"
    # The failed snapshot's blocks are still to copy: the next snapshot carries them.
    retry = sim.create_snapshot(vol)
    sim.advance(3600, until=retry)
    assert sim.list_changed_blocks(sid, retry) > 0.9 * 0.1 * T_BPS * (3600 + C_S) / BLOCK_SIZE_BYTES

    sim, vol = make(write_rate_bps=0.1 * T_BPS)
    sim.fail_next_snapshot(vol, at_progress=0.3)
    run = simulator.run_chain(sim, vol, ChainParams(downtime_target_s=200, max_rounds=10, copy_time_s=60))
    assert len(run.failures) == 1 and "state error" in run.failures[0] and "round 1" in run.failures[0]
    assert run.outcome == planner.CUT_OVER and run.rounds[0].index == 1


def test_too_many_failed_snapshots_raise():
    sim, vol = make()
    sim.fail_next_snapshot(vol)
    with pytest.raises(simulator.SnapshotFailed, match="state error"):
        simulator.run_chain(sim, vol, ChainParams(downtime_target_s=200, max_rounds=10, copy_time_s=60),
                            max_failed_snapshots=0)


def test_cutover_at_delays_the_cutover():
    sim, vol = make(write_rate_bps=0.1 * T_BPS)
    cutover_at = sim.now + timedelta(hours=3)
    run = simulator.run_chain(sim, vol, ChainParams(downtime_target_s=200, max_rounds=200, copy_time_s=60,
                                                    cutover_at=cutover_at))
    assert run.outcome == planner.CUTOVER_AT_REACHED
    final_start = sim.describe_snapshot(run.final_snapshot_id)["StartTime"]
    assert final_start >= cutover_at
    assert len(run.rounds) > 3
    assert run.downtime_s < 200
