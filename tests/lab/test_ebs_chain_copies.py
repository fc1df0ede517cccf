"""The EBS chain's copies and cutover on the lab (moto's EC2, the real PostgreSQL 15): one round copy in flight at a
time, the copy state reaches the planner, a paced round waits on a DateTimeTrigger, a retry makes no second snapshot
or copy, and a stale chain takes one more round before the cutover.

moto's copies are born completed, so a copy "in flight" is what the planner is shown: the test reports a round's
copy as pending (Progress 50 %, no CompletionTime) until a later round has finished, the way a copy that takes longer
than a round looks in EC2. Snapshots, copies and tags are moto's own.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import load_dag, task_states

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

DAG_ID = "pgops_ebs_migration__main"
SOURCE_REGION, TARGET_REGION = "us-east-1", "us-west-2"
MIGRATION_TAG = "pgops:migration-id"


def _snapshots(lab, region: str, **tags) -> list[dict]:
    flt = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    return lab.aws_client("ec2", region=region).describe_snapshots(OwnerIds=["self"], Filters=flt)["Snapshots"]


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _conf(volume_id: str, **changes) -> dict:
    # cutover_at an hour away: moto's instant snapshots would otherwise fit the target after round 1
    return {"volume_ids": [volume_id], "target_region": TARGET_REGION, "target_az": f"{TARGET_REGION}b",
            "downtime_target_minutes": 10, "copy_time_minutes": 1, "max_rounds": 2, "cutover_mode": "backup",
            "skip_approval": True, "cutover_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(), **changes}


def _volume(lab, size_gib: int = 8) -> str:
    return lab.aws_client("ec2", region=SOURCE_REGION).create_volume(
        Size=size_gib, AvailabilityZone=f"{SOURCE_REGION}a")["VolumeId"]


def _slow_copies(monkeypatch, rounds_late: dict[int, int]):
    """Show round i's copy as in flight until round i + rounds_late.get(i, 0) + 1 has finished (moto's copies are
    complete at once). Returns the log of each copy started: (round, rounds whose copies were in flight then)."""
    from pgops.core.ebs import rounds

    original = rounds.copy_records
    started: list[tuple[int, list[int]]] = []
    newest = {"index": 0}

    def in_flight(index: int) -> bool:
        return newest["index"] <= index + rounds_late.get(index, 0)

    def shown(recorded, described, seen_at):
        newest["index"] = max((r["index"] for r in recorded), default=0)
        items = original(recorded, described, seen_at)
        for item in items:
            if in_flight(item["index"]):
                item.update(State="pending", Progress="50%")
                item.pop("CompletionTime", None)
        return items

    from pgops.airflow.ebs_hooks import EbsEc2Hook

    copy = EbsEc2Hook.copy_snapshots

    copied_rounds: set[int] = set()

    def copying(target, **kwargs):
        name = kwargs["round_name"]
        index = int(name) if name.isdigit() else name
        started.append((index, sorted(i for i in copied_rounds if in_flight(i))))
        if isinstance(index, int):
            copied_rounds.add(index)
        return copy(target, **kwargs)

    monkeypatch.setattr(rounds, "copy_records", shown)
    monkeypatch.setattr(EbsEc2Hook, "copy_snapshots", copying)
    return started


def _seen_by_planner(monkeypatch) -> list[Any]:
    from pgops.core.ebs import planner

    decide = planner.decide
    seen: list[Any] = []

    def recording(observations, params, now, *, copies=None):
        seen.append(copies)
        return decide(observations, params, now, copies=copies)

    monkeypatch.setattr(planner, "decide", recording)
    return seen


def test_one_copy_in_flight_and_the_copy_state_reaches_the_planner(moto, run_dag, monkeypatch):
    """Round 1's full copy outlasts round 2: round 2 is not copied, the planner holds the chain (hold_for_copies)
    until the copy before the last round is done, then the cutover; every copy started with none in flight."""
    lab = moto
    volume_id = _volume(lab)
    started = _slow_copies(monkeypatch, {1: 1})  # round 1's copy done after round 3, the others after the next round
    seen = _seen_by_planner(monkeypatch)
    dr = run_dag(load_dag(DAG_ID), conf=_conf(volume_id))
    states = task_states(dr)
    assert set(states.values()) == {"success"}, states
    migration = f"{DAG_ID}/{dr.run_id}"

    # One copy at a time: rounds 1, 3 and 4 copied, each when no other copy was in flight; round 2 never.
    assert started == [(1, []), (3, []), (4, []), ("final", [4])], started
    source = {_tags(s)["pgops:round"] for s in _snapshots(lab, SOURCE_REGION, **{MIGRATION_TAG: migration})}
    copies = _snapshots(lab, TARGET_REGION, **{MIGRATION_TAG: migration})
    assert source == {"1", "2", "3", "4", "final"}
    assert sorted(_tags(c)["pgops:round"] for c in copies) == ["1", "3", "4", "final"]  # one copy each

    # The planner saw the copies (chain: after rounds 0..4; fresh_round: once more), and held while they lagged.
    chain_seen = [(c.copied_through, c.pending_index) for c in seen[:5]]
    assert chain_seen == [(0, None), (0, 1), (0, 1), (1, 3), (3, 4)], chain_seen
    assert all(c is not None for c in seen)
    report = dr.get_task_instance("report").xcom_pull(task_ids="report")["body"]
    actions = [d["action"] for d in report["decisions"]]
    assert actions == ["another_round", "another_round", "hold_for_copies", "hold_for_copies", "max_rounds"], actions
    assert [d["numbers"]["copied_through"] for d in report["decisions"]] == [0, 0, 0, 1, 3]
    assert "the copy of round 1 is in flight" in report["decisions"][2]["reason"]
    assert [bool(r["copies"]) for r in report["rounds"]] == [True, False, True, True]
    # The chain's last round was fresh: the cutover took no round of its own.
    assert "rounds" not in report["cutover"]


class _TI:
    """A task instance's own XCom as Airflow keeps it (JSON); upstream values come as the operator's arguments."""

    dag_id = "pgops_test"

    def __init__(self, task_id: str):
        self.task_id, self.xcom = task_id, {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = json.loads(json.dumps(value))

    def xcom_pull(self, task_ids: str, key: str | None = None) -> Any:
        assert task_ids == self.task_id, f"pulled XCom of {task_ids!r} instead of taking it as an argument"
        return self.xcom.get(key or "return_value")


def drive(op, context, *, max_steps: int = 30) -> tuple[Any, list[str]]:
    """Run an operator the way Airflow does: execute, then each deferral's trigger (run for real) and the method it
    names with the trigger's event. Returns the result and the trigger classes deferred on, in order."""
    from airflow.sdk.exceptions import TaskDeferred

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload
        raise AssertionError(f"{trigger!r} yielded no event")

    deferred_on: list[str] = []
    step = lambda: op.execute(context)  # noqa: E731
    for _ in range(max_steps):
        try:
            result = step()
        except TaskDeferred as deferred:
            deferred_on.append(type(deferred.trigger).__name__)
            payload = asyncio.run(first_event(deferred.trigger))
            method = getattr(op, deferred.method_name)
            step = lambda m=method, p=payload: m(context, p)  # noqa: E731
            continue
        context["ti"].xcom_push("return_value", result)
        return result, deferred_on
    raise AssertionError(f"{op.task_id} still deferring after {max_steps} steps")


def _chain_op(lab, volume_id: str, **kwargs):
    from pgops.airflow.operators.ebs import EbsSnapshotChainOperator

    # moto does not refuse snapshots of one volume 15 s apart
    return EbsSnapshotChainOperator(task_id="chain", preflight=_preflight(volume_id),
                                    aws_conn_id=lab.cluster.aws_conn_id, min_create_interval_s=0, waiter_delay=1,
                                    **kwargs)


def _context(ti: _TI, conf: dict, run_id: str) -> dict:
    return {"params": conf, "run_id": run_id, "ti": ti}


def _preflight(volume_id: str, size_gib: int = 8) -> dict:
    return {"volume_ids": [volume_id], "instance_id": None, "volumes": [{"volume_id": volume_id, "size_gib": size_gib}]}


def test_a_paced_round_waits_on_a_datetime_trigger_before_its_snapshot(moto, monkeypatch):
    """A decision with wait_s > 0 defers on DateTimeTrigger; the next CreateSnapshot comes after the moment."""
    import dataclasses

    from pgops.core.ebs import planner

    lab = moto
    volume_id = _volume(lab)
    decide = planner.decide
    wait_s = 4.0
    decided_at: list[datetime] = []

    def paced(observations, params, now, *, copies=None):
        decision = decide(observations, params, now, copies=copies)
        if len(observations) != 1:
            return decision
        # the planner paces only against a copy in flight far from the floor (not on moto): here, after round 1
        decided_at.append(now)
        return dataclasses.replace(decision, wait_s=wait_s)

    monkeypatch.setattr(planner, "decide", paced)
    ti = _TI("chain")
    state, deferred_on = drive(_chain_op(lab, volume_id), _context(ti, _conf(volume_id), "paced"))
    assert deferred_on == ["EbsSnapshotCompletedTrigger", "DateTimeTrigger", "EbsSnapshotCompletedTrigger"]
    assert [d["wait_s"] for d in state["decisions"]] == [0.0, wait_s, 0.0]
    by_round = {_tags(s)["pgops:round"]: s for s in _snapshots(lab, SOURCE_REGION,
                                                               **{MIGRATION_TAG: "pgops_test/paced"})}
    assert set(by_round) == {"1", "2"}
    # CreateSnapshot of round 2 only after the wait (moto keeps StartTime to the second)
    assert by_round["2"]["StartTime"] >= decided_at[0] + timedelta(seconds=wait_s - 1)
    assert (by_round["2"]["StartTime"] - by_round["1"]["StartTime"]).total_seconds() >= wait_s - 1


def test_a_retried_chain_makes_no_second_snapshot_or_copy(moto, monkeypatch):
    """A try dies right after starting round 2's copy; the retry (XCom cleared) walks the rounds again, reusing
    each snapshot and copy, adopts round 2's copy and goes on; then a whole second retry: nothing new at all."""
    from pgops.airflow.ebs_hooks import EbsEc2Hook

    lab = moto
    volume_id = _volume(lab)
    conf = _conf(volume_id, max_rounds=3)
    migration = "pgops_test/retry-chain"
    copy = EbsEc2Hook.copy_snapshots
    calls: list[str] = []

    def dies_after_round_2_copy(target, **kwargs):
        copies = copy(target, **kwargs)
        calls.append(kwargs["round_name"])
        if kwargs["round_name"] == "2" and calls.count("2") == 1:
            raise RuntimeError("the worker died after CopySnapshot of round 2")
        return copies

    monkeypatch.setattr(EbsEc2Hook, "copy_snapshots", dies_after_round_2_copy)
    with pytest.raises(RuntimeError, match="worker died"):
        drive(_chain_op(lab, volume_id), _context(_TI("chain"), conf, "retry-chain"))
    first_copies = _snapshots(lab, TARGET_REGION, **{MIGRATION_TAG: migration})
    assert sorted(_tags(c)["pgops:round"] for c in first_copies) == ["1", "2"]

    retry, _ = drive(_chain_op(lab, volume_id), _context(_TI("chain"), conf, "retry-chain"))
    assert [r["index"] for r in retry["rounds"]] == [1, 2, 3] and retry["outcome"] == "max_rounds"
    by_id = {c["SnapshotId"]: _tags(c)["pgops:round"] for c in first_copies}
    assert {r["index"]: by_id.get(next(iter(r["copies"].values()))) for r in retry["rounds"][:2]} == {1: "1", 2: "2"}
    again, _ = drive(_chain_op(lab, volume_id), _context(_TI("chain"), conf, "retry-chain"))
    assert [r["snapshots"] for r in again["rounds"]] == [r["snapshots"] for r in retry["rounds"]]
    assert [r["copies"] for r in again["rounds"]] == [r["copies"] for r in retry["rounds"]]

    source = _snapshots(lab, SOURCE_REGION, **{MIGRATION_TAG: migration})
    copies = _snapshots(lab, TARGET_REGION, **{MIGRATION_TAG: migration})
    assert sorted(_tags(s)["pgops:round"] for s in source) == ["1", "2", "3"]  # one snapshot per round
    assert sorted(_tags(c)["pgops:round"] for c in copies) == ["1", "2", "3"]  # one copy per round
    assert len({_tags(c)["pgops:source-snapshot"] for c in copies}) == 3


def test_a_stale_chain_takes_one_more_round_before_the_cutover(moto):
    """The chain's last round ended 45 h ago (an approval that waited): the cutover takes round 3 first, measures it,
    and only then enters backup mode for the final snapshot; a fresh chain cuts over at once."""
    from pgops.airflow.operators.ebs import EbsCutoverOperator

    lab = moto
    volume_id = _volume(lab)
    migration = "pgops_test/stale"
    ec2 = EbsCutoverOperator(task_id="x", preflight=_preflight(volume_id), postgres_conn_id="-",
                             aws_conn_id=lab.cluster.aws_conn_id).ec2()
    now = datetime.now(UTC)
    recorded = []
    for index, started, duration_s in ((1, now - timedelta(hours=60), 14 * 3600), (2, now - timedelta(hours=46), 3600)):
        snaps = ec2.create_round_snapshots(migration=migration, round_name=str(index), volume_ids=[volume_id])
        recorded.append({"index": index, "snapshots": snaps, "copies": {}, "started_at": started.isoformat(),
                         "duration_s": duration_s, "delta_bytes": None, "predicted_duration_s": None})
    op = EbsCutoverOperator(task_id="cutover", preflight=_preflight(volume_id), chain={"rounds": recorded},
                            postgres_conn_id=lab.cluster.postgres_conn_id, cluster_name=lab.cluster.name,
                            aws_conn_id=lab.cluster.aws_conn_id, waiter_delay=1, min_create_interval_s=0)
    result, deferred_on = drive(op, _context(_TI("cutover"), _conf(volume_id), "stale"))

    assert deferred_on == ["EbsSnapshotCompletedTrigger"]  # one round, then the cutover
    assert [r["index"] for r in result["rounds"]] == [3] and result["rounds"][0]["taken_by"] == "cutover"
    by_round = {_tags(s)["pgops:round"]: s for s in _snapshots(lab, SOURCE_REGION, **{MIGRATION_TAG: migration})}
    assert set(by_round) == {"1", "2", "3", "final"}
    round_3_done = datetime.fromisoformat(result["rounds"][0]["completed_at"])
    quiesced = datetime.fromisoformat(result["quiesced_at"])
    assert by_round["3"]["StartTime"] <= round_3_done <= quiesced  # the round ended before the quiesce
    assert by_round["final"]["StartTime"] >= quiesced - timedelta(seconds=1)  # moto keeps StartTime to the second
    assert result["backup"]["backup_label"].startswith("START WAL LOCATION")
    assert _snapshots(lab, TARGET_REGION, **{MIGRATION_TAG: migration}) == []  # round 3 is not copied

    # the same chain, its last round just over: no round, the final snapshot at once
    fresh = [dict(recorded[0]), dict(recorded[1], started_at=(datetime.now(UTC) - timedelta(seconds=3650)).isoformat())]
    op.chain = {"rounds": fresh}
    fresh_result, deferred_on = drive(op, _context(_TI("cutover"), _conf(volume_id), "fresh"))
    assert deferred_on == [] and "rounds" not in fresh_result
    assert {_tags(s)["pgops:round"] for s in _snapshots(lab, SOURCE_REGION, **{MIGRATION_TAG: "pgops_test/fresh"})} \
        == {"final"}
    lab.psql("SELECT pg_backup_start('after-stale-test', true); SELECT lsn FROM pg_backup_stop(false);")
