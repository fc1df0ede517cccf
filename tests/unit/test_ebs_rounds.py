"""The chain's XCom round records turned into the planner's inputs (pgops.core.ebs.rounds): observations, the copy
state as DescribeSnapshots shows the copies, and a retry's copies adopted instead of made again."""

import json
from datetime import UTC, datetime, timedelta

from pgops.core.ebs import planner, rounds

T0 = datetime(2025, 1, 6, tzinfo=UTC)
GIB = 1024**3


def record(index, started_s, duration_s, *, copies=None, delta_bytes=None, volumes=("vol-a",)):
    return {"index": index, "started_at": (T0 + timedelta(seconds=started_s)).isoformat(), "duration_s": duration_s,
            "delta_bytes": delta_bytes, "predicted_duration_s": None,
            "snapshots": {v: f"snap-{v[-1]}{index}" for v in volumes}, "copies": dict(copies or {})}


def described(snapshot_id, state, started_s, *, completed_s=None, progress=None, source=None):
    snap = {"SnapshotId": snapshot_id, "State": state, "StartTime": T0 + timedelta(seconds=started_s),
            "Progress": progress or ("100%" if state == "completed" else "0%")}
    if completed_s is not None:
        snap["CompletionTime"] = T0 + timedelta(seconds=completed_s)
    if source:
        snap["Tags"] = [{"Key": "pgops:source-snapshot", "Value": source}, {"Key": "pgops:round", "Value": "x"}]
    return snap


def test_observations_follow_the_index_and_carry_the_measurements():
    recs = [record(2, 50_000, 600, delta_bytes=5 * GIB), record(1, 0, 50_000, delta_bytes=100 * GIB)]
    obs = rounds.observations(recs, 100 * GIB)
    assert [o.index for o in obs] == [1, 2]
    assert obs[1].started_at == T0 + timedelta(seconds=50_000) and obs[1].duration_s == 600
    assert obs[1].delta_bytes == 5 * GIB and obs[0].volume_size_bytes == 100 * GIB


def test_copy_records_name_each_copys_round_and_the_planner_reads_them():
    recs = [record(1, 0, 50_000, copies={"vol-a": "snap-c1"}), record(2, 50_000, 900),
            record(3, 50_900, 600, copies={"vol-a": "snap-c3"})]
    seen = [described("snap-c1", "completed", 50_000, completed_s=60_000),
            described("snap-c3", "pending", 51_500, progress="40%"),
            described("snap-other", "pending", 51_500)]  # not one of the rounds' copies
    items = rounds.copy_records(recs, seen, T0 + timedelta(seconds=52_000))
    assert [(i["index"], i["SnapshotId"]) for i in items] == [(1, "snap-c1"), (3, "snap-c3")]
    state = planner.copy_state(items)
    assert state.copied_through == 1 and state.pending_index == 3 and state.pending_progress == 0.4
    assert state.completed_s == ((1, 10_000.0),)
    assert planner.next_copy([1, 2, 3], state) is None  # one copy at a time: round 3's is in flight


def test_a_completed_copy_without_completion_time_counts_as_done_from_when_it_was_first_seen():
    recs = [record(1, 0, 50_000, copies={"vol-a": "snap-c1"}), record(2, 50_000, 900)]
    first = T0 + timedelta(seconds=60_000)
    items = rounds.copy_records(recs, [described("snap-c1", "completed", 50_000)], first)
    assert items[0]["CompletionTime"] == first
    state = planner.copy_state(items)
    assert state.copied_through == 1 and state.completed_s == ((1, 10_000.0),)
    assert recs[0]["copies_completed_at"] == {"snap-c1": first.isoformat()}
    # seen again an hour later, after the records went through XCom (JSON): the first sighting stays
    recs = json.loads(json.dumps(recs))
    again = rounds.copy_records(recs, [described("snap-c1", "completed", 50_000)], first + timedelta(hours=1))
    assert again[0]["CompletionTime"] == first
    assert planner.next_copy([1, 2], planner.copy_state(again)) == 2


def test_a_round_of_several_volumes_is_copied_when_all_its_copies_are():
    recs = [record(1, 0, 50_000, volumes=("vol-a", "vol-b"), copies={"vol-a": "snap-ca", "vol-b": "snap-cb"})]
    items = rounds.copy_records(recs, [described("snap-ca", "completed", 50_000, completed_s=55_000),
                                       described("snap-cb", "pending", 50_000, progress="90%")], T0)
    state = planner.copy_state(items)
    assert state.copied_through == 0 and state.pending_index == 1


def test_a_retry_adopts_the_copies_an_earlier_try_made_and_sees_strays_in_flight():
    recs = [record(1, 0, 50_000), record(2, 50_000, 900, copies={"vol-a": "snap-mine"})]
    tagged = [described("snap-old1", "completed", 50_000, source="snap-a1"),
              described("snap-dup2", "pending", 50_900, source="snap-a2"),  # round 2 already has its own
              described("snap-err", "error", 50_900, source="snap-a1"),
              described("snap-old3", "pending", 51_800, source="snap-a3"),  # a round not walked again yet
              described("snap-mine", "pending", 50_900, source="snap-a2")]
    adopted = rounds.adopt_copies(recs, tagged)
    assert adopted == {"snap-old1": "snap-a1"}
    assert recs[0]["copies"] == {"vol-a": "snap-old1"} and recs[1]["copies"] == {"vol-a": "snap-mine"}
    assert rounds.copy_ids(recs) == {"snap-old1": 1, "snap-mine": 2}
    assert rounds.stray_copies(recs, tagged) == ["snap-dup2", "snap-old3"]
    assert rounds.adopt_copies(recs, tagged) == {}  # idempotent
