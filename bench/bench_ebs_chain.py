"""Simulated incremental snapshot chains on a 2 TiB volume whose first snapshot takes 14 hours.

Prints, per workload, the rounds, total chain time, cutover downtime and its ratio to the floor d*,
and the rounds plan_before_start predicted; writes the same figures to bench/results/ebs_chain.json.
Run: PYTHONPATH=plugins python bench/bench_ebs_chain.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from pgops.ebs import planner, simulator  # noqa: E402

GIB = 1024**3
VOLUME_BYTES = 2 * 1024 * GIB
FIRST_SNAPSHOT_S = 14 * 3600
T_BPS = VOLUME_BYTES / FIRST_SNAPSHOT_S
OVERHEAD_S = 60.0
PARAMS = planner.ChainParams(downtime_target_s=600, max_rounds=20, copy_time_s=120)
SCENARIOS = [
    ("r=0.1", simulator.Workload(write_rate_bps=0.1 * T_BPS)),
    ("r=0.5", simulator.Workload(write_rate_bps=0.5 * T_BPS)),
    ("r=0.1 + 16 GiB hot set", simulator.Workload(write_rate_bps=0.1 * T_BPS, hot_set_bytes=16 * GIB,
                                                  hot_write_rate_bps=100 * 1024**2)),
]
RESULTS = Path(__file__).resolve().parent / "results" / "ebs_chain.json"


def run(name: str, workload: simulator.Workload) -> dict:
    sim = simulator.EbsSimulator(snapshot_throughput_bps=T_BPS, snapshot_overhead_s=OVERHEAD_S,
                                 copy_throughput_bps=4 * T_BPS, copy_overhead_s=60, seed=1)
    volume_id = sim.create_volume(VOLUME_BYTES, workload)
    plan = planner.plan_before_start(VOLUME_BYTES, T_BPS, workload.write_rate_bps, OVERHEAD_S,
                                     PARAMS.downtime_target_s, PARAMS.copy_time_s, PARAMS.max_rounds)
    started = time.perf_counter()
    chain = simulator.run_chain(sim, volume_id, PARAMS)
    wall_s = time.perf_counter() - started
    floor_s = planner.hot_set_floor_s(T_BPS, workload.write_rate_bps, OVERHEAD_S, workload.hot_set_bytes,
                                      workload.hot_write_rate_bps)
    return {
        "scenario": name,
        "outcome": chain.outcome,
        "rounds": len(chain.rounds),
        "predicted_rounds": plan.rounds,
        "predicted_outcome": plan.outcome,
        "round_durations_s": [round(r.duration_s, 1) for r in chain.rounds],
        "predicted_round_durations_s": [None if r.predicted_duration_s is None else round(r.predicted_duration_s, 1)
                                        for r in chain.rounds],
        "total_chain_h": chain.total_chain_s / 3600,
        "predicted_total_chain_h": plan.total_chain_s / 3600,
        "final_snapshot_s": chain.final_snapshot_s,
        "copy_s": chain.copy_s,
        "downtime_s": chain.downtime_s,
        "predicted_downtime_s": chain.decisions[-1].numbers.predicted_downtime_s,
        "floor_s": floor_s,
        "estimated_floor_s": chain.floor_s,
        "downtime_over_floor": chain.downtime_s / floor_s,
        "failures": chain.failures,
        "last_decision": chain.decisions[-1].reason,
        "simulation_wall_s": wall_s,
    }


def main() -> None:
    print(f"2 TiB volume, T={T_BPS / 2**20:.1f} MiB/s (first snapshot 14 h), c={OVERHEAD_S:.0f} s, "
          f"target {PARAMS.downtime_target_s:.0f} s, copy estimate {PARAMS.copy_time_s:.0f} s")
    results = [run(name, workload) for name, workload in SCENARIOS]
    for r in results:
        print(f"\n{r['scenario']}: {r['outcome']} after {r['rounds']} rounds (plan: {r['predicted_rounds']}, "
              f"{r['predicted_outcome']}); total {r['total_chain_h']:.2f} h (plan {r['predicted_total_chain_h']:.2f} h)")
        print(f"  downtime {r['downtime_s']:.0f} s = final snapshot {r['final_snapshot_s']:.0f} s + copy "
              f"{r['copy_s']:.0f} s (predicted {r['predicted_downtime_s']:.0f} s); floor d*={r['floor_s']:.0f} s, "
              f"downtime/d*={r['downtime_over_floor']:.2f}; simulated in {r['simulation_wall_s']:.2f} s")
        print(f"  rounds s: {r['round_durations_s']}")
        print(f"  predicted: {r['predicted_round_durations_s']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
