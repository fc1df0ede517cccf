"""A time-stepped EBS simulator for snapshot chains, shaped like the EC2 API, and a chain driver.

The lab's moto has no pending snapshots and no limits, so the planner is tested against this:
block-level dirty tracking (512 KiB blocks), snapshots whose point in time is fixed at creation,
a per-volume snapshot throughput shared by its pending snapshots, a fixed per-snapshot overhead,
EBS's 5-pending and 15-second limits, injectable failures and incremental copies. Deterministic
for a seed; 14 simulated hours of a 2 TiB volume take well under a second.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgops.core.ebs import planner
from pgops.core.ebs.planner import ChainParams, Decision, RoundObservation

BLOCK_SIZE_BYTES = 512 * 1024
MAX_PENDING_SNAPSHOTS_PER_VOLUME = 5
MIN_CREATE_INTERVAL_S = 15.0
PENDING, COMPLETED, ERROR = "pending", "completed", "error"
_COPY_POOL = "copy"


class ConcurrentSnapshotLimitExceeded(Exception):
    """EC2 refuses a sixth pending snapshot of one volume."""


class SnapshotCreationPerVolumeRateExceeded(Exception):
    """EC2 refuses CreateSnapshot within 15 seconds of the previous one on the same volume."""


class IncorrectState(Exception):
    """The snapshot is not in a state that allows the call (e.g. copying a pending snapshot)."""


class SnapshotFailed(Exception):
    """A chain driver gave up after too many snapshots ended in state "error"."""


@dataclass(frozen=True)
class Workload:
    """Uniform random writes at write_rate_bps plus a hot set of hot_set_bytes rewritten cyclically."""

    write_rate_bps: float = 0.0
    hot_set_bytes: int = 0
    hot_write_rate_bps: float = 0.0


@dataclass
class _Volume:
    volume_id: str
    blocks: int
    workload: Workload
    dirty: bytearray
    last_create_s: float | None = None
    last_snapshot_id: str | None = None
    quiesced: bool = False
    fail_next_at_progress: float | None = None
    write_carry_bytes: float = 0.0
    hot_carry_bytes: float = 0.0
    hot_cursor: int = 0


@dataclass
class _Job:
    snapshot_id: str
    volume_id: str
    pool: str
    start_s: float
    total_bytes: int
    overhead_left_s: float
    changed: bytes = b""  # one byte per block, 1 = stored in this snapshot (snapshots only)
    parent_id: str | None = None
    source_id: str | None = None
    fail_at_bytes: float | None = None
    done_bytes: float = 0.0
    state: str = PENDING
    completed_s: float | None = None
    message: str = ""


def _target_bytes(job: _Job) -> float:
    return job.total_bytes if job.fail_at_bytes is None else job.fail_at_bytes


def _union(*bitmaps: bytes) -> int:
    """Blocks set in any of the 0/1 byte maps, as an int with one bit per block (bit_count = blocks)."""
    merged = 0
    for bitmap in bitmaps:
        merged |= int.from_bytes(bitmap, "little")
    return merged


class EbsSimulator:
    def __init__(self, *, snapshot_throughput_bps: float, snapshot_overhead_s: float = 60.0,
                 copy_throughput_bps: float | None = None, copy_overhead_s: float = 60.0, step_s: float = 60.0,
                 seed: int = 0, start: datetime = datetime(2025, 1, 6, tzinfo=UTC)):
        self.snapshot_throughput_bps = snapshot_throughput_bps
        self.snapshot_overhead_s = snapshot_overhead_s
        self.copy_throughput_bps = copy_throughput_bps or snapshot_throughput_bps
        self.copy_overhead_s = copy_overhead_s
        self.step_s = step_s
        self.start = start
        self._t = 0.0
        self._rng = random.Random(seed)
        self._volumes: dict[str, _Volume] = {}
        self._jobs: dict[str, _Job] = {}
        self._copy_of: dict[str, str] = {}
        self._ids = 0

    @property
    def now(self) -> datetime:
        return self.start + timedelta(seconds=self._t)

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:017x}"

    def create_volume(self, size_bytes: int, workload: Workload = Workload(), used_bytes: int | None = None) -> str:
        """A volume whose first used_bytes (default: all) hold data: its first snapshot copies those."""
        blocks = -(-size_bytes // BLOCK_SIZE_BYTES)
        used_blocks = blocks if used_bytes is None else min(blocks, -(-used_bytes // BLOCK_SIZE_BYTES))
        volume_id = self._new_id("vol")
        dirty = bytearray(b"\x01" * used_blocks + bytes(blocks - used_blocks))
        self._volumes[volume_id] = _Volume(volume_id, blocks, workload, dirty)
        return volume_id

    def volume_size_bytes(self, volume_id: str) -> int:
        return self._volumes[volume_id].blocks * BLOCK_SIZE_BYTES

    def fail_next_snapshot(self, volume_id: str, at_progress: float = 0.5) -> None:
        self._volumes[volume_id].fail_next_at_progress = at_progress

    def quiesce(self, volume_id: str) -> None:
        """Stop the volume's writes (the database is paused for the final snapshot)."""
        self._volumes[volume_id].quiesced = True

    def create_snapshot(self, volume_id: str, now: datetime | None = None) -> str:
        if now is not None:
            if now < self.now:
                raise ValueError(f"now {now.isoformat()} is before the simulator clock {self.now.isoformat()}")
            self.advance((now - self.now).total_seconds())
        volume = self._volumes[volume_id]
        if volume.last_create_s is not None and self._t - volume.last_create_s < MIN_CREATE_INTERVAL_S:
            raise SnapshotCreationPerVolumeRateExceeded(
                f"volume {volume_id}: last CreateSnapshot {self._t - volume.last_create_s:.0f} s ago; wait "
                f"{MIN_CREATE_INTERVAL_S:.0f} s between snapshots of one volume")
        pending = sum(1 for j in self._jobs.values()
                      if j.volume_id == volume_id and j.pool != _COPY_POOL and j.state == PENDING)
        if pending >= MAX_PENDING_SNAPSHOTS_PER_VOLUME:
            raise ConcurrentSnapshotLimitExceeded(
                f"volume {volume_id} has {pending} pending snapshots (limit {MAX_PENDING_SNAPSHOTS_PER_VOLUME}); "
                "wait for one to complete")
        changed = bytes(volume.dirty)
        volume.dirty = bytearray(volume.blocks)
        total_bytes = (volume.blocks - changed.count(0)) * BLOCK_SIZE_BYTES
        job = _Job(self._new_id("snap"), volume_id, volume_id, self._t, total_bytes, self.snapshot_overhead_s,
                   changed=changed, parent_id=volume.last_snapshot_id)
        if volume.fail_next_at_progress is not None:
            job.fail_at_bytes = volume.fail_next_at_progress * total_bytes
            volume.fail_next_at_progress = None
        volume.last_create_s = self._t
        volume.last_snapshot_id = job.snapshot_id
        self._jobs[job.snapshot_id] = job
        return job.snapshot_id

    def describe_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        job = self._jobs[snapshot_id]
        progress = 100 if job.state == COMPLETED else int(100 * job.done_bytes / job.total_bytes) if job.total_bytes else 0
        described = {
            "SnapshotId": job.snapshot_id,
            "VolumeId": "vol-ffffffff" if job.source_id else job.volume_id,
            "State": job.state,
            "Progress": f"{progress}%",
            "StartTime": self.start + timedelta(seconds=job.start_s),
            "VolumeSize": -(-self._volumes[job.volume_id].blocks * BLOCK_SIZE_BYTES // 1024**3),
        }
        if job.completed_s is not None:
            described["CompletionTime"] = self.start + timedelta(seconds=job.completed_s)
        if job.source_id:
            described["SourceSnapshotId"] = job.source_id
        if job.message:
            described["StateMessage"] = job.message
        return described

    def list_changed_blocks(self, first_snapshot_id: str | None, second_snapshot_id: str) -> int:
        """Number of blocks that differ between the two snapshots (all blocks when first is None)."""
        for sid in (first_snapshot_id, second_snapshot_id):
            if sid is not None and self._jobs[sid].state != COMPLETED:
                raise IncorrectState(f"snapshot {sid} is {self._jobs[sid].state}; ListChangedBlocks needs "
                                     "completed snapshots")
        return _union(*self._lineage(first_snapshot_id, second_snapshot_id)).bit_count()

    def _lineage(self, ancestor_id: str | None, snapshot_id: str) -> list[bytes]:
        bitmaps, sid = [], snapshot_id
        while sid != ancestor_id:
            if sid is None:
                raise ValueError(f"snapshot {ancestor_id} is not an ancestor of {snapshot_id}")
            bitmaps.append(self._jobs[sid].changed)
            sid = self._jobs[sid].parent_id
        return bitmaps

    def copy_snapshot(self, source_snapshot_id: str) -> str:
        """Copy a completed snapshot; incremental from the newest ancestor already copied, else full."""
        source = self._jobs[source_snapshot_id]
        if source.state != COMPLETED:
            raise IncorrectState(f"snapshot {source_snapshot_id} is {source.state}; only completed snapshots copy")
        ancestor = source.parent_id
        while ancestor is not None and not self._copied(ancestor):
            ancestor = self._jobs[ancestor].parent_id
        blocks = self.list_changed_blocks(ancestor, source_snapshot_id)
        job = _Job(self._new_id("snap"), source.volume_id, _COPY_POOL, self._t, blocks * BLOCK_SIZE_BYTES,
                   self.copy_overhead_s, source_id=source_snapshot_id)
        self._jobs[job.snapshot_id] = job
        self._copy_of[source_snapshot_id] = job.snapshot_id
        return job.snapshot_id

    def _copied(self, snapshot_id: str) -> bool:
        copy_id = self._copy_of.get(snapshot_id)
        return copy_id is not None and self._jobs[copy_id].state == COMPLETED

    def advance(self, seconds: float, until: str | None = None) -> float:
        """Run the clock; with `until`, stop as soon as that snapshot leaves "pending". Returns seconds run."""
        end_s = self._t + seconds
        begin_s = self._t
        while self._t < end_s:
            step_s = self._run_jobs(min(self.step_s, end_s - self._t), until)
            self._write(step_s)
            self._t += step_s
            if until is not None and self._jobs[until].state != PENDING:
                break
        return self._t - begin_s

    def _rate_bps(self, job: _Job, transferring: dict[str, int]) -> float:
        pool_bps = self.copy_throughput_bps if job.pool == _COPY_POOL else self.snapshot_throughput_bps
        return pool_bps / transferring[job.pool]

    def _run_jobs(self, dt_s: float, until: str | None) -> float:
        elapsed_s = 0.0
        while elapsed_s < dt_s:
            jobs = [j for j in self._jobs.values() if j.state == PENDING]
            for job in jobs:
                if job.overhead_left_s <= 0 and job.done_bytes >= _target_bytes(job) - 0.5:
                    self._finish(job, self._t + elapsed_s)
            if until is not None and self._jobs[until].state != PENDING:
                return elapsed_s
            jobs = [j for j in jobs if j.state == PENDING]
            transferring: dict[str, int] = {}
            for job in jobs:
                if job.overhead_left_s <= 0:
                    transferring[job.pool] = transferring.get(job.pool, 0) + 1
            # Jump to the next event (an overhead ending or a transfer finishing) so completion times are exact.
            event_s = dt_s - elapsed_s
            for job in jobs:
                if job.overhead_left_s > 0:
                    event_s = min(event_s, job.overhead_left_s)
                else:
                    left = _target_bytes(job) - job.done_bytes
                    event_s = min(event_s, left / self._rate_bps(job, transferring))
            for job in jobs:
                if job.overhead_left_s > 0:
                    job.overhead_left_s -= event_s
                else:
                    job.done_bytes += event_s * self._rate_bps(job, transferring)
            elapsed_s += event_s
            if not jobs:
                break
        for job in [j for j in self._jobs.values() if j.state == PENDING]:
            if job.overhead_left_s <= 0 and job.done_bytes >= _target_bytes(job) - 0.5:
                self._finish(job, self._t + dt_s)
        return dt_s

    def _finish(self, job: _Job, at_s: float) -> None:
        job.completed_s = at_s
        if job.fail_at_bytes is None:
            job.state = COMPLETED
            job.done_bytes = job.total_bytes
            return
        job.state = ERROR
        job.message = "Snapshot failed (injected)"
        volume = self._volumes[job.volume_id]
        # A failed snapshot stores nothing: its blocks count as changed again for the next snapshot.
        merged = _union(volume.dirty, job.changed)
        volume.dirty = bytearray(merged.to_bytes(volume.blocks, "little"))
        if volume.last_snapshot_id == job.snapshot_id:
            volume.last_snapshot_id = job.parent_id
        for child in self._jobs.values():
            if child.parent_id == job.snapshot_id and child.state == PENDING:
                child.changed = _union(child.changed, job.changed).to_bytes(volume.blocks, "little")
                child.parent_id = job.parent_id
                child.total_bytes = (volume.blocks - child.changed.count(0)) * BLOCK_SIZE_BYTES

    def _write(self, dt_s: float) -> None:
        for volume in self._volumes.values():
            if volume.quiesced:
                continue
            load = volume.workload
            volume.write_carry_bytes += load.write_rate_bps * dt_s
            count = int(volume.write_carry_bytes // BLOCK_SIZE_BYTES)
            volume.write_carry_bytes -= count * BLOCK_SIZE_BYTES
            if count:
                dirty, blocks = volume.dirty, volume.blocks
                # 32-bit random words scaled to the block range: uniform and fast without numpy.
                for word in memoryview(self._rng.randbytes(4 * count)).cast("I"):
                    dirty[(word * blocks) >> 32] = 1
            hot_blocks = min(volume.blocks, load.hot_set_bytes // BLOCK_SIZE_BYTES)
            if not hot_blocks:
                continue
            volume.hot_carry_bytes += load.hot_write_rate_bps * dt_s
            count = int(volume.hot_carry_bytes // BLOCK_SIZE_BYTES)
            volume.hot_carry_bytes -= count * BLOCK_SIZE_BYTES
            first = volume.blocks - hot_blocks  # the hot set is the volume's last blocks
            start = volume.hot_cursor
            end = start + min(count, hot_blocks)
            volume.dirty[first + start:first + min(end, hot_blocks)] = b"\x01" * (min(end, hot_blocks) - start)
            if end > hot_blocks:
                volume.dirty[first:first + end - hot_blocks] = b"\x01" * (end - hot_blocks)
            volume.hot_cursor = (start + count) % hot_blocks


@dataclass(frozen=True)
class RoundRecord:
    index: int
    snapshot_id: str
    started_at: datetime
    duration_s: float
    delta_bytes: int
    predicted_duration_s: float | None
    decision: str = planner.ANOTHER_ROUND  # the action that asked for this round
    waited_s: float = 0.0  # paced wait between the decision and CreateSnapshot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"started_at": self.started_at.isoformat()}


@dataclass
class ChainRun:
    volume_id: str
    outcome: str
    rounds: list[RoundRecord] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    round_copies: dict[int, str] = field(default_factory=dict)
    final_snapshot_id: str | None = None
    final_snapshot_s: float | None = None
    final_delta_bytes: int | None = None
    final_copy_id: str | None = None
    copy_s: float | None = None
    downtime_s: float | None = None
    total_chain_s: float | None = None
    floor_s: float | None = None

    @property
    def hold_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.decision == planner.HOLD_FOR_COPIES)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("rounds", "decisions")} | {
            "rounds": [r.to_dict() for r in self.rounds],
            "decisions": [d.to_dict() for d in self.decisions],
            "hold_rounds": self.hold_rounds,
        }


_WAIT_LIMIT_S = 7 * 24 * 3600.0


def _wait(sim: EbsSimulator, snapshot_id: str) -> dict[str, Any]:
    sim.advance(_WAIT_LIMIT_S, until=snapshot_id)
    described = sim.describe_snapshot(snapshot_id)
    if described["State"] == PENDING:
        raise TimeoutError(f"snapshot {snapshot_id} still pending after {_WAIT_LIMIT_S:.0f} s")
    return described


def _create(sim: EbsSimulator, volume_id: str) -> str:
    try:
        return sim.create_snapshot(volume_id)
    except SnapshotCreationPerVolumeRateExceeded:
        sim.advance(MIN_CREATE_INTERVAL_S)
        return sim.create_snapshot(volume_id)


def copy_state(sim: EbsSimulator, round_copies: dict[int, str]) -> planner.CopyState:
    """The planner's view of the round copies, from DescribeSnapshots as the DAG would read it."""
    return planner.copy_state({"index": index, **sim.describe_snapshot(copy_id)}
                              for index, copy_id in round_copies.items())


def run_chain(sim: EbsSimulator, volume_id: str, params: ChainParams, *, copy_rounds: bool = True,
              pace: bool = True, poll_s: float = 0.0, max_failed_snapshots: int = 2) -> ChainRun:
    """Chain snapshots as `decide` says, the way the migration DAG runs them, then cut over and copy.

    Right after each round: start the copy `planner.next_copy` names (one in flight, the newest round,
    running beside the next snapshot), then decide at once with the copies' state. Another round
    starts after the decision's wait_s (at once without `pace`); a cutover quiesces right away, so the
    final snapshot follows the round. The final snapshot is copied as soon as it completes. With
    poll_s, each completion is noticed at the next poll from its start (the DAG's waiter_delay).
    """
    run = ChainRun(volume_id, planner.ANOTHER_ROUND)
    observations: list[RoundObservation] = []
    volume_size_bytes = sim.volume_size_bytes(volume_id)
    started_s = sim.now

    def noticed(snapshot_id: str) -> dict[str, Any]:
        described = _wait(sim, snapshot_id)
        if poll_s > 0:
            elapsed_s = (sim.now - described["StartTime"]).total_seconds()
            sim.advance(-(-elapsed_s // poll_s) * poll_s - elapsed_s)
        return described

    def take(index: int) -> dict[str, Any] | None:
        snapshot_id = _create(sim, volume_id)
        described = noticed(snapshot_id)
        if described["State"] == ERROR:
            run.failures.append(f"round {index}: snapshot {snapshot_id} of {volume_id} ended in state error "
                                f"({described.get('StateMessage', '')}) after {described['Progress']}; retaking it")
            if len(run.failures) > max_failed_snapshots:
                raise SnapshotFailed("; ".join(run.failures))
            return None
        return described

    while True:
        copies = None
        if copy_rounds:
            copies = copy_state(sim, run.round_copies)
            index = planner.next_copy((r.index for r in run.rounds), copies)
            if index is not None:
                run.round_copies[index] = sim.copy_snapshot(run.rounds[index - 1].snapshot_id)
                copies = copy_state(sim, run.round_copies)
        decision = planner.decide(observations, params, sim.now, copies=copies)
        run.decisions.append(decision)
        run.outcome = decision.action
        run.floor_s = decision.numbers.floor_s
        if decision.take_round:
            waited_s = sim.advance(decision.wait_s) if pace and decision.wait_s > 0 else 0.0
            index = len(observations) + 1
            predicted_s = planner.predict_next(observations, sim.now) if observations else None
            described = take(index)
            if described is None:
                continue
            previous = run.rounds[-1].snapshot_id if run.rounds else None
            delta_bytes = sim.list_changed_blocks(previous, described["SnapshotId"]) * BLOCK_SIZE_BYTES
            observation = RoundObservation(index=index, started_at=described["StartTime"],
                                           completed_at=described["CompletionTime"], delta_bytes=delta_bytes,
                                           volume_size_bytes=volume_size_bytes, predicted_duration_s=predicted_s)
            observations.append(observation)
            run.rounds.append(RoundRecord(index, described["SnapshotId"], observation.started_at,
                                          observation.duration_s, delta_bytes, predicted_s, decision.action,
                                          waited_s))
            continue
        if not decision.proceed_to_cutover:
            return run
        break

    quiesced_at = sim.now
    sim.quiesce(volume_id)
    final = None
    while final is None:
        final = take(len(observations) + 1)
    run.final_snapshot_id = final["SnapshotId"]
    run.final_snapshot_s = (final["CompletionTime"] - final["StartTime"]).total_seconds()
    changed_blocks = sim.list_changed_blocks(run.rounds[-1].snapshot_id, run.final_snapshot_id)
    run.final_delta_bytes = changed_blocks * BLOCK_SIZE_BYTES
    run.final_copy_id = sim.copy_snapshot(run.final_snapshot_id)
    final_copy = noticed(run.final_copy_id)
    run.copy_s = (final_copy["CompletionTime"] - final_copy["StartTime"]).total_seconds()
    run.downtime_s = (sim.now - quiesced_at).total_seconds()
    run.total_chain_s = (sim.now - started_s).total_seconds()
    return run
