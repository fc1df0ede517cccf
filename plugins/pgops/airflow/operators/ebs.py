"""EBS migration operators: snapshots (idempotent, tagged), the round chain, cutover, copy, share, volume, report.

Every resource carries the migration id (dag id + run id), its round and its source, so a retried task
finds what an earlier try made and reuses it instead of making a second one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from pgops.airflow.operators.base import PgopsOperator
from pgops.core.ebs import planner
from pgops.core.ebs import rounds as chain_rounds
from pgops.core.ebs.backup_label import backup_label_key
from pgops.core.ebs.spec import (
    TAG_BACKUP_LABEL,
    TAG_MIGRATION,
    TAG_ROUND,
    TAG_SOURCE_SNAPSHOT,
    TAG_SOURCE_VOLUME,
    TAG_VALUE_MAX,
    MigrationParamsError,
    MigrationSpec,
    migration_id,
    migration_spec,
)

FINAL_ROUND = "final"
MIN_CREATE_INTERVAL_S = 15.0  # EC2: SnapshotCreationPerVolumeRateExceeded under 15 s on one volume
MAX_COPIES_IN_FLIGHT = 20  # EC2: concurrent snapshot copies per destination region
# Polls on the cutover path (writes paused until the final copy completes: every second of poll lag is downtime).
CUTOVER_POLL_S = 5
# A snapshot or copy wait gives up after this long, whatever its poll interval.
WAIT_BUDGET_S = 24 * 3600


if TYPE_CHECKING:
    from pgops.airflow.ebs_hooks import EbsDirectHook, EbsEc2Hook


def _hooks():
    """The EBS hooks import boto3 and the Amazon provider: load them when a task runs, not at DAG parse time."""
    from pgops.airflow import ebs_hooks as hooks

    return hooks


def _trigger(**kwargs: Any):
    from pgops.airflow.triggers.ebs import EbsSnapshotCompletedTrigger

    return EbsSnapshotCompletedTrigger(**kwargs)


def _at(moment: datetime):
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    return DateTimeTrigger(moment=moment)


def attempts_for(waiter_delay: float, budget_s: float = WAIT_BUDGET_S) -> int:
    """Polls at waiter_delay seconds that cover budget_s (a faster poll must not shorten the wait)."""
    return max(1, math.ceil(budget_s / max(waiter_delay, 1)))


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: Any) -> str | None:
    return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value


def json_safe(value: Any) -> Any:
    """XCom and reports are JSON: an infinite floor (a diverging chain) becomes None."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def tag_value(text: str) -> str:
    """A string as an EC2 tag value: one line, safe characters, at most 256 characters."""
    flat = re.sub(r"[^A-Za-z0-9 _.:/=+\-@]", " ", text.replace("\n", "; "))
    return re.sub(r" +", " ", flat).strip()[:TAG_VALUE_MAX]


def context_spec(context) -> MigrationSpec:
    try:
        return migration_spec(dict(context["params"]))
    except MigrationParamsError as exc:
        raise AirflowFailException(str(exc)) from None


def _volume_bytes(preflight: dict[str, Any]) -> int:
    return sum(v["size_gib"] for v in preflight["volumes"]) * 1024**3


class EbsMigrationBaseOperator(PgopsOperator):
    """
    Base of the EBS migration's AWS operators: the run's params (validated) and one hook per region.

    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source volumes' region; the connection's region when not given.
    """

    template_fields: Sequence[str] = ("aws_conn_id",)

    def __init__(self, *, aws_conn_id: str, source_region: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id
        self.source_region = source_region
        self._ec2_hooks: dict[str | None, EbsEc2Hook] = {}
        self._direct_hook: EbsDirectHook | None = None

    def ec2(self, region: str | None = None) -> EbsEc2Hook:
        """The EC2 hook of ``region`` (the source region when not given): one per region, one client each."""
        key = region or self.source_region
        if key not in self._ec2_hooks:
            self._ec2_hooks[key] = _hooks().EbsEc2Hook(aws_conn_id=self.aws_conn_id, region_name=key)
        return self._ec2_hooks[key]

    def src_region(self) -> str:
        return self.source_region or self.ec2().conn_region_name

    def _direct(self) -> EbsDirectHook:
        if self._direct_hook is None:
            self._direct_hook = _hooks().EbsDirectHook(aws_conn_id=self.aws_conn_id, region_name=self.source_region)
        return self._direct_hook

    @staticmethod
    def migration(context) -> str:
        return migration_id(context["dag"].dag_id if "dag" in context else context["ti"].dag_id, context["run_id"])

    def _measure_round(self, pending: dict[str, Any], previous: dict[str, str]) -> dict[str, Any]:
        """The record of a completed round: its times from DescribeSnapshots, its delta from ListChangedBlocks."""
        done_at = _now()
        described = self.ec2().describe_snapshots(pending["snapshots"].values())
        started = min(s["StartTime"] for s in described)
        completed = max(s.get("CompletionTime") or done_at for s in described)
        duration_s = max((completed - started).total_seconds(), 1.0)  # the lab completes snapshots at once
        deltas = [self._direct().changed_bytes(previous.get(v), s) for v, s in pending["snapshots"].items()]
        delta_bytes = None if any(d is None for d in deltas) else sum(deltas)
        return {**pending, "started_at": _iso(started), "completed_at": _iso(completed), "duration_s": duration_s,
                "delta_bytes": delta_bytes, "progress": {s["SnapshotId"]: s.get("Progress") for s in described}}

    def _snapshot_round(self, context, *, index: int, after: str | None, saved_key: str,
                        saved: Callable[[dict[str, str]], dict[str, Any]], method_name: str,
                        **trigger_kwargs: Any) -> None:
        """Snapshot round ``index`` and defer until its snapshots complete (the chain's rounds, the cutover's fresh one).

        A retry reuses the round's tagged snapshots (create_round_snapshots), never a second CreateSnapshot.
        ``after``: when the round before started; ``saved(snapshots)``: XCom ``saved_key`` for ``method_name``.
        Needs the operator's ``preflight``, ``min_create_interval_s`` and ``waiter_delay``.
        """
        import time

        if after:  # EC2 refuses a second CreateSnapshot on a volume within 15 s
            since_s = (_now() - datetime.fromisoformat(after)).total_seconds()
            if since_s < self.min_create_interval_s:
                time.sleep(self.min_create_interval_s - since_s)
        pre = self.preflight
        snaps = self.ec2().create_round_snapshots(migration=self.migration(context), round_name=str(index),
                                                  volume_ids=pre["volume_ids"], instance_id=pre["instance_id"])
        context["ti"].xcom_push(key=saved_key, value=saved(snaps))
        self.defer(trigger=_trigger(snapshot_ids=list(snaps.values()), aws_conn_id=self.aws_conn_id,
                                    region_name=self.source_region, waiter_delay=self.waiter_delay, **trigger_kwargs),
                   method_name=method_name, timeout=timedelta(days=2))


class EbsMigrationValidateOperator(PgopsOperator):
    """
    Check the run's params across fields and, with the expected sizes and rates, the plan before round 1.

    Makes no AWS call; the run's params are its only input. Returns the validated params (the report's ``params``).
    """

    def execute(self, context) -> dict[str, Any]:
        spec = context_spec(context)
        if spec.plan:
            self.log.info("plan before round 1: %s", spec.plan["message"])
        self.log.info("migration params: %s", spec.to_dict())
        return spec.to_dict()


class EbsMigrationPreflightOperator(EbsMigrationBaseOperator):
    """
    Resolve the source volumes, check the target AZ exists and the KMS key lets the target account in.

    Reads the run's params (volume_ids or instance_id, target_region, target_az, kms_key_id, target_account).
    Returns ``{"volume_ids", "volumes", "instance_id", "source_region", "kms"}`` for the tasks after it.

    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source volumes' region; the connection's region when not given.
    """

    def execute(self, context) -> dict[str, Any]:
        spec = context_spec(context)
        ec2 = self.ec2()
        if spec.instance_id:
            volume_ids, root = ec2.data_volume_ids(spec.instance_id)
            if not volume_ids:
                raise AirflowFailException(f"instance {spec.instance_id} has no data volume besides its root "
                                           f"device {root}. Fix: attach the data volumes or name them in volume_ids")
        else:
            volume_ids = list(spec.volume_ids)
        try:
            volumes = ec2.describe_volumes(volume_ids)
        except Exception as exc:
            if _hooks().error_code(exc).startswith("InvalidVolume"):
                raise AirflowFailException(f"volume(s) {volume_ids} not found in {self.src_region()}: "
                                           f"{exc}. Fix: check the ids and the connection's region") from None
            raise
        zones = self.ec2(spec.target_region).availability_zones()
        if spec.target_az not in zones:
            raise AirflowFailException(f"target_az {spec.target_az} is not offered in {spec.target_region} "
                                       f"(zones: {', '.join(zones)}). Fix: pick one of those")
        kms = self._kms_preflight(spec) if spec.kms_key_id else None
        resolved = [{"volume_id": v["VolumeId"], "size_gib": v["Size"], "az": v["AvailabilityZone"],
                     "type": v.get("VolumeType"), "encrypted": v.get("Encrypted", False)} for v in volumes]
        self.log.info("source volumes in %s: %s; target %s (%s)", self.src_region(), resolved, spec.target_region,
                      spec.target_az)
        return {"volume_ids": volume_ids, "volumes": resolved, "instance_id": spec.instance_id,
                "source_region": self.src_region(), "kms": kms}

    def _kms_preflight(self, spec: MigrationSpec) -> dict[str, Any]:
        kms = _hooks().EbsKmsHook(aws_conn_id=self.aws_conn_id, region_name=spec.target_region)
        try:
            meta = kms.describe_key(spec.kms_key_id)
        except Exception as exc:
            raise AirflowFailException(f"kms_key_id {spec.kms_key_id} is not usable in {spec.target_region}: "
                                       f"{exc}. Fix: create the key there or grant this role kms:DescribeKey") from None
        if meta.get("KeyState") != "Enabled":
            raise AirflowFailException(f"KMS key {meta['Arn']} is {meta.get('KeyState')}. Fix: enable it")
        result: dict[str, Any] = {"key_arn": meta["Arn"], "target_account_allowed": None}
        if spec.target_account:
            from pgops.core.ebs.kms import key_access

            access = key_access(kms.key_policy(meta["KeyId"]), kms.grants(meta["KeyId"]), account=spec.target_account,
                                key_arn=meta["Arn"])
            result["target_account_access"] = access.to_dict()
            if not access.ok:
                raise AirflowFailException(access.refusal(meta["Arn"]))
            result["target_account_allowed"] = True
        self.log.info("KMS preflight: %s", result)
        return result


class EbsSnapshotChainOperator(EbsMigrationBaseOperator):
    """
    The round loop: snapshot, defer until complete, measure, copy, ask the planner, repeat or stop.

    One task re-deferring per round (no cyclic DAG). Each round is logged, pushed to XCom as
    ``round_<n>`` and its planner decision as ``decision_<n>``; the return value lists them all.
    Copies run beside the next snapshot, one at a time: right after a round, the round
    `planner.next_copy` names (the newest, once no copy is in flight) is copied to the target region,
    and the planner decides with the copies' state (it holds the chain while they lag, and may pace
    the next round to the copy in flight with a wait). Copies are never deleted here.

    :param preflight: The preflight's result: the source volume ids, their sizes and the instance (templated).
    :param resume_chain: A chain's result (rounds, decisions) to decide again, after the approval gate: a late
        answer takes a fresh round (templated). Given (even as a template), the task resumes that chain and
        fails when it renders empty; not given, it starts a chain.
    :param waiter_delay: Seconds between polls of a round's snapshots.
    :param min_create_interval_s: Seconds between two rounds' CreateSnapshot on one volume at least.
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source volumes' region; the connection's region when not given.
    """

    template_fields: Sequence[str] = ("aws_conn_id", "preflight", "resume_chain")

    def __init__(self, *, preflight: dict[str, Any] | str, resume_chain: dict[str, Any] | str | None = None,
                 waiter_delay: int = 30, min_create_interval_s: float = MIN_CREATE_INTERVAL_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.preflight = preflight
        self.resume_chain = resume_chain
        self.resumes = resume_chain is not None
        self.waiter_delay = waiter_delay
        self.min_create_interval_s = min_create_interval_s

    def execute(self, context) -> dict[str, Any]:
        if not self.resumes:
            return self._next(context, {"rounds": [], "decisions": []})
        prior = self.resume_chain
        if not prior:
            raise AirflowFailException(f"{self.task_id}: no chain state to resume (resume_chain is empty: did the "
                                       "chain task return its rounds?)")
        # the decision after the last round is taken again, in its place (decisions[i] follows round i)
        return self._next(context, {"rounds": prior["rounds"], "decisions": prior["decisions"][:-1]})

    def _size_bytes(self) -> int:
        return _volume_bytes(self.preflight)

    def _next(self, context, state: dict[str, Any]) -> dict[str, Any]:
        spec = context_spec(context)
        params = spec.chain_params()
        copies = self._copy_state(spec, state["rounds"])
        obs = chain_rounds.observations(state["rounds"], self._size_bytes())
        decision = planner.decide(obs, params, _now(), copies=copies)
        index = len(state["rounds"]) + 1
        self.log.info("planner after %d round(s): %s — %s", index - 1, decision.action, decision.reason)
        state["decisions"].append(json_safe(decision.to_dict()))
        context["ti"].xcom_push(key=f"decision_{index - 1}", value=state["decisions"][-1])
        if decision.action == planner.DIVERGING:
            raise AirflowFailException(decision.reason)
        if decision.proceed_to_cutover:
            state["outcome"] = decision.action
            state["last_snapshots"] = state["rounds"][-1]["snapshots"] if state["rounds"] else {}
            return state
        if decision.wait_s > 0:
            # A paced round: it starts later so that it ends as the copy in flight does (the planner keeps it shorter
            # than the last round); the wait holds no worker slot.
            moment = _now() + timedelta(seconds=decision.wait_s)
            self.log.info("round %d starts at %s (in %.0f s), paced to the copy in flight", index, _iso(moment),
                          decision.wait_s)
            context["ti"].xcom_push(key="chain_state", value={"state": state, "pending": None,
                                                              "wait_until": _iso(moment)})
            self.defer(trigger=_at(moment), method_name="wait_complete",
                       timeout=timedelta(seconds=decision.wait_s + 3600))
        return self._take_round(context, state, decision.numbers.predicted_next_s)

    def wait_complete(self, context, event: Any = None) -> dict[str, Any]:
        """The paced wait is over: take the round the planner asked for (its prediction made for now)."""
        state = context["ti"].xcom_pull(task_ids=self.task_id, key="chain_state")["state"]
        params = context_spec(context).chain_params()
        obs = chain_rounds.observations(state["rounds"], self._size_bytes())
        predicted_s = planner.predict_next(obs, _now(), params.overhead_s) if obs else None
        return self._take_round(context, state, predicted_s)

    def _take_round(self, context, state: dict[str, Any], predicted_s: float | None) -> dict[str, Any]:
        index = len(state["rounds"]) + 1
        plan = context_spec(context).plan or {}
        progress = {"cluster": context["params"].get("cluster"), "run_id": context["run_id"],
                    "what": f"EBS chain round {index}", "round": index, "rounds_predicted": plan.get("rounds")}
        # The chain's state rides in XCom across deferrals (a resumed task is the same try).
        self._snapshot_round(
            context, index=index, after=state["rounds"][-1]["started_at"] if state["rounds"] else None,
            saved_key="chain_state",
            saved=lambda snaps: {"state": state, "pending": {"index": index, "snapshots": snaps,
                                                             "predicted_duration_s": predicted_s}},
            method_name="round_complete", progress=progress)
        return state  # not reached: defer raises

    def round_complete(self, context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        saved = context["ti"].xcom_pull(task_ids=self.task_id, key="chain_state")
        state, pending = saved["state"], saved["pending"]
        event = event or {}
        if event.get("status") != "success":
            raise AirflowFailException(f"round {pending['index']}: {event.get('message')}")
        spec = context_spec(context)
        previous = state["rounds"][-1]["snapshots"] if state["rounds"] else {}
        record = self._measure_round(pending, previous)
        state["rounds"].append(record)
        self._copy_next(context, spec, state["rounds"])
        context["ti"].xcom_push(key=f"round_{record['index']}", value=record)
        predicted = record["predicted_duration_s"]
        self.log.info("round %d done: started %s, %.0f s (predicted %s), delta %s bytes, snapshots %s, copies %s",
                      record["index"], record["started_at"], record["duration_s"],
                      "n/a" if predicted is None else f"{predicted:.0f} s",
                      "unknown" if record["delta_bytes"] is None else record["delta_bytes"], record["snapshots"],
                      record["copies"] or "none (not this round)")
        return self._next(context, state)

    def _copy_state(self, spec: MigrationSpec, recorded: list[dict[str, Any]], target: EbsEc2Hook | None = None,
                    ) -> planner.CopyState:
        """The rounds' copies as DescribeSnapshots shows them in the target region, for the planner."""
        ids = chain_rounds.copy_ids(recorded)
        described: list[dict[str, Any]] = []
        if ids:
            described = (target or self.ec2(spec.target_region)).describe_existing_snapshots(ids)
            missing = sorted(set(ids) - {s["SnapshotId"] for s in described})
            failed = sorted(s["SnapshotId"] for s in described if s.get("State") == "error")
            if missing or failed:
                self.log.warning("round copies in %s: %s; those rounds count as not copied (the next copy covers "
                                 "their blocks)", spec.target_region,
                                 "; ".join(x for x in (f"not found {missing}" if missing else "",
                                                       f"in state error {failed}" if failed else "") if x))
        return planner.copy_state(chain_rounds.copy_records(recorded, described, _now()))

    def _copy_next(self, context, spec: MigrationSpec, recorded: list[dict[str, Any]]) -> None:
        """Start the copy planner.next_copy names (nothing while one is in flight); a retry reuses the copies."""
        target = self.ec2(spec.target_region)
        mig = self.migration(context)
        tagged = target.find_snapshots({TAG_MIGRATION: mig})
        adopted = chain_rounds.adopt_copies(recorded, tagged)
        if adopted:
            self.log.info("copies made by an earlier try, now the rounds' own: %s", adopted)
        copies = self._copy_state(spec, recorded, target)
        index = planner.next_copy([r["index"] for r in recorded], copies)
        if index is None:
            self.log.info("round %d not copied now (one copy at a time): %s", recorded[-1]["index"], copies.describe())
            return
        stray = chain_rounds.stray_copies(recorded, tagged)
        if stray:
            self.log.info("round %d not copied now: copies %s of this migration from an earlier try are still in "
                          "flight", index, stray)
            return
        chosen = next(r for r in recorded if r["index"] == index)
        if len(chosen["snapshots"]) > MAX_COPIES_IN_FLIGHT:
            self.log.warning("round %d: %d snapshots exceed EC2's %d concurrent copies to %s: not copying rounds; "
                             "the final copy carries every block", index, len(chosen["snapshots"]),
                             MAX_COPIES_IN_FLIGHT, spec.target_region)
            return
        chosen["copies"] = target.copy_snapshots(migration=mig, round_name=str(index), snapshots=chosen["snapshots"],
                                                 source_region=self.src_region(), kms_key_id=spec.kms_key_id)


class EbsCutoverOperator(EbsMigrationBaseOperator):
    """Quiesce by the chosen mode, take the final snapshot(s), release at once (the point in time is fixed).

    The cutover follows a round: before quiescing, `planner.fresh_for_cutover` judges the chain's last round
    (from ``chain``); when time has passed since it (an approval that
    waited, a queue), a final snapshot now would carry those writes too, so one more round is taken first
    (deferred, polled every `waiter_delay` seconds, not copied: the final copy carries its blocks), then the
    cutover. A retry that finds final snapshots reuses them (their point in time is fixed) without a round.

    stop-writes: `pg_ctl stop -m fast` through the cluster's runner, snapshot(s) while the server is down, then
    `pg_ctl start` with the runner's environment, always, and a DB-host watchdog that starts it after
    `quiesce_timeout_s` if this task dies. A server managed by systemd is started outside systemd's unit here.

    :param preflight: The preflight's result: the source volume ids, their sizes and the instance (templated).
    :param chain: The chain's result (its rounds), the newest decision's: the re-decision after the approval
        gate when it ran, else the chain task's (templated). None: no round to follow.
    :param postgres_conn_id: The cluster's PostgreSQL connection (backup mode; stop-writes reads the data
        directory through it).
    :param cluster_name: The inventory cluster: its bucket keeps the backup_label, its runner stops and starts
        PostgreSQL (stop-writes).
    :param quiesce_timeout_s: Seconds the quiesce may last at most (backup session, server stopped).
    :param pg_log_file: The server log for ``pg_ctl start`` (stop-writes); beside the data directory when not given.
    :param waiter_delay: Seconds between polls of a fresh round's snapshots.
    :param min_create_interval_s: Seconds between two rounds' CreateSnapshot on one volume at least.
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source volumes' region; the connection's region when not given.
    """

    template_fields: Sequence[str] = ("aws_conn_id", "preflight", "chain")

    # Rounds taken here before the cutover at most: one normally; more only when a retry reuses an old one.
    MAX_FRESH_ROUNDS = 3

    def __init__(self, *, preflight: dict[str, Any] | str, chain: dict[str, Any] | str | None = None,
                 postgres_conn_id: str, cluster_name: str | None = None, quiesce_timeout_s: float = 600.0,
                 pg_log_file: str | None = None, waiter_delay: int = CUTOVER_POLL_S,
                 min_create_interval_s: float = MIN_CREATE_INTERVAL_S, **kwargs: Any):
        super().__init__(**kwargs)
        self.preflight = preflight
        self.chain = chain
        self.postgres_conn_id = postgres_conn_id
        self.cluster_name = cluster_name
        self.quiesce_timeout_s = quiesce_timeout_s
        self.pg_log_file = pg_log_file
        self.waiter_delay = waiter_delay
        self.min_create_interval_s = min_create_interval_s
        self._runner = None

    def on_kill(self) -> None:
        # A killed task leaves a stopped server to the watchdog on the DB host (stop-writes mode).
        if self._runner is not None:
            self._runner.kill()

    def execute(self, context) -> dict[str, Any]:
        mig = self.migration(context)
        if not self.ec2().find_snapshots({TAG_MIGRATION: mig, TAG_ROUND: FINAL_ROUND}):
            recorded = self._chain_rounds()
            if recorded and not self._fresh(context, recorded):
                return self._fresh_round(context, recorded, [])
        return self._cut_over(context, [])

    def _chain_rounds(self) -> list[dict[str, Any]]:
        return list((self.chain or {}).get("rounds") or [])

    def _fresh(self, context, recorded: list[dict[str, Any]]) -> bool:
        spec = context_spec(context)
        obs = chain_rounds.observations(recorded, _volume_bytes(self.preflight))
        now = _now()
        fresh = planner.fresh_for_cutover(obs, now, spec.chain_params().overhead_s)
        last = obs[-1]
        ended_s = (now - last.started_at).total_seconds() - last.duration_s
        self.log.info("cutover %s round %d (it took %.0f s and ended %.0f s ago)%s",
                      "follows" if fresh else "does not follow", last.index, last.duration_s, ended_s,
                      "" if fresh else ": a final snapshot now would carry the writes since; one more round first")
        return fresh

    def _fresh_round(self, context, recorded: list[dict[str, Any]], taken: list[dict[str, Any]]) -> dict[str, Any]:
        overhead_s = context_spec(context).chain_params().overhead_s
        done = recorded + taken
        index = max(r["index"] for r in done) + 1
        obs = chain_rounds.observations(done, _volume_bytes(self.preflight))
        self._snapshot_round(
            context, index=index, after=done[-1]["started_at"], saved_key="fresh_rounds",
            saved=lambda snaps: {"taken": taken, "pending": {
                "index": index, "snapshots": snaps, "taken_by": self.task_id,
                "predicted_duration_s": planner.predict_next(obs, _now(), overhead_s)}},
            method_name="fresh_round_complete", waiter_max_attempts=attempts_for(self.waiter_delay))
        return {}  # not reached: defer raises

    def fresh_round_complete(self, context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        saved = context["ti"].xcom_pull(task_ids=self.task_id, key="fresh_rounds")
        taken, pending = saved["taken"], saved["pending"]
        event = event or {}
        if event.get("status") != "success":
            raise AirflowFailException(f"round {pending['index']} before the cutover: {event.get('message')}")
        recorded = self._chain_rounds()
        record = self._measure_round(pending, (recorded + taken)[-1]["snapshots"]) | {"copies": {}}
        taken.append(record)
        context["ti"].xcom_push(key=f"round_{record['index']}", value=record)
        self.log.info("round %d before the cutover done: started %s, %.0f s, delta %s bytes, snapshots %s",
                      record["index"], record["started_at"], record["duration_s"],
                      "unknown" if record["delta_bytes"] is None else record["delta_bytes"], record["snapshots"])
        # A fresh round is fresh unless a retry reused an old one: then another, bounded.
        if len(taken) < self.MAX_FRESH_ROUNDS and not self._fresh(context, recorded + taken):
            return self._fresh_round(context, recorded, taken)
        return self._cut_over(context, taken)

    def _cut_over(self, context, taken: list[dict[str, Any]]) -> dict[str, Any]:
        spec = context_spec(context)
        pre = self.preflight
        mig = self.migration(context)
        ec2 = self.ec2()
        result: dict[str, Any] = {"mode": spec.cutover_mode, "quiesced_at": _iso(_now()), "backup": None}
        if taken:
            result["rounds"] = taken  # taken here because the chain's last round was stale; in the report's rounds

        def take(extra_tags: dict[str, str] | None = None) -> dict[str, str]:
            return ec2.create_round_snapshots(migration=mig, round_name=FINAL_ROUND, volume_ids=pre["volume_ids"],
                                              instance_id=pre["instance_id"], extra_tags=extra_tags)

        if spec.cutover_mode == "crash-consistent":
            result["snapshots"] = take()
        elif spec.cutover_mode == "backup":
            result["snapshots"], result["backup"], superseded = self._backup_cutover(ec2, mig, take)
            if superseded:
                result["superseded_snapshots"] = superseded
        else:  # stop-writes
            if ec2.find_snapshots({TAG_MIGRATION: mig, TAG_ROUND: FINAL_ROUND}):
                self.log.warning("final snapshot(s) exist from an earlier try: reusing them, no second stop")
                result["snapshots"] = take()
            else:
                result["snapshots"], result["stop"] = self._stop_writes(take)
        result["released_at"] = _iso(_now())
        self.log.info("final snapshot(s) %s; quiesce held %s .. %s", result["snapshots"], result["quiesced_at"],
                      result["released_at"])
        return result


    def _backup_cutover(self, ec2: EbsEc2Hook, mig: str, take) -> tuple[dict[str, str], dict[str, Any], list[str]]:
        """Final snapshot(s) in backup mode; the full backup_label stored in the bucket before the session ends.

        A retry that finds final snapshots reuses them only with their stored label (a snapshot taken in backup
        mode is not restorable without it). Final snapshots without one (an earlier try died between the snapshot
        and the label write) are retagged as superseded, kept, and a new final round is taken.
        """
        from pgops.airflow.hooks import pg_connect
        from pgops.dbhost.quiesce import backup_mode

        cluster = self._cluster()
        s3 = self.s3_hook(cluster.aws_conn_id)
        existing = ec2.find_snapshots({TAG_MIGRATION: mig, TAG_ROUND: FINAL_ROUND})
        superseded: list[str] = []
        if existing:
            stored = s3.read_backup_label(cluster, mig)
            ids = {s["SnapshotId"] for s in existing}
            if stored and set(stored.get("snapshots", {}).values()) == ids:
                self.log.warning("final snapshot(s) %s exist from an earlier try with their stored backup_label "
                                 "(s3://%s/%s): reusing them", sorted(ids), cluster.storage.bucket,
                                 backup_label_key(cluster, mig))
                return take(), stored["backup"], []
            superseded = sorted(ids)
            tag = f"{FINAL_ROUND}-superseded"
            ec2.tag_resources(superseded, {TAG_ROUND: tag})
            self.log.warning("final snapshot(s) %s exist from an earlier try but no backup_label was stored for them "
                             "(s3://%s/%s), so they cannot be restored consistently: tagged %s=%s and kept; taking "
                             "a new final round", superseded, cluster.storage.bucket, backup_label_key(cluster, mig),
                             TAG_ROUND, tag)
        taken: dict[str, str] = {}

        def store(held) -> None:  # after pg_backup_stop, before the backup session is released
            key = s3.write_backup_label(cluster, mig, snapshots=taken, backup=held.to_dict())
            self.log.info("backup_label of %s stored at s3://%s/%s", sorted(taken.values()), cluster.storage.bucket,
                          key)

        with backup_mode(lambda: pg_connect(self.postgres_conn_id), label=mig[:100], timeout_s=self.quiesce_timeout_s,
                         log=self.log.info, on_stop=store) as held:
            taken.update(take())
        label = held.backup_label or ""
        for snapshot_id in taken.values():  # for a human in the console; the stored copy is the one to use
            ec2.tag_resources([snapshot_id], {TAG_BACKUP_LABEL: tag_value(label)})
        self.log.info("backup_label (write it as PGDATA/backup_label on the new volume before starting):\n%s", label)
        return dict(taken), held.to_dict(), superseded

    def _cluster(self):
        from pgops.inventory import load_inventory

        if not self.cluster_name:
            raise AirflowFailException("cutover_mode backup stores the backup_label in the cluster's bucket and "
                                       "stop-writes restarts PostgreSQL through the cluster's runner: set the "
                                       "operator's cluster_name")
        return load_inventory().get(self.cluster_name)

    def _stop_writes(self, take) -> tuple[dict[str, str], dict[str, Any]]:
        """Clean stop through the cluster's runner, final snapshot(s) while down, restart (always, bounded)."""
        import posixpath

        from pgops.airflow.hooks import pg_query
        from pgops.dbhost.procs import PG_BIN
        from pgops.dbhost.quiesce import QuiesceError, server_stopped
        from pgops.dbhost.runners import get_runner
        from pgops.inventory import load_inventory

        if not self.cluster_name:
            raise AirflowFailException("cutover_mode stop-writes needs the operator's cluster_name (its runner "
                                       "stops and starts PostgreSQL on the DB host)")
        row = pg_query(self.postgres_conn_id, "SELECT current_setting('data_directory') AS data_dir, "
                                              "current_setting('config_file') AS config_file")[0]
        data_dir = row["data_dir"]
        log_file = self.pg_log_file or posixpath.join(posixpath.dirname(data_dir.rstrip("/")), "postgres.log")
        self._runner = get_runner(load_inventory().get(self.cluster_name))
        try:
            with server_stopped(self._runner, pg_ctl=str(PG_BIN / "pg_ctl"), data_dir=data_dir, log_file=log_file,
                                config_file=row["config_file"], restart_within_s=self.quiesce_timeout_s,
                                log=self.log.info) as stopped:
                if stopped.time_left_s() < 5:
                    raise QuiesceError(f"the stop took {self.quiesce_timeout_s - stopped.time_left_s():.0f} s: the "
                                       "watchdog restarts PostgreSQL now, too late for the final snapshot")
                snapshots = take()
        finally:
            self._runner = None
        self.log.info("PostgreSQL was down for %.1f s around the final snapshot(s) %s",
                      (stopped.started_at or 0) - (stopped.stopped_at or 0), snapshots)
        return snapshots, stopped.to_dict()


class EbsCopySnapshotOperator(EbsMigrationBaseOperator):
    """
    Copy snapshots to the target region with one KMS key, then defer until the copies complete.

    A retry reuses the copies an earlier try made (found by their tags). Returns ``{"copies", "region",
    "started_at", "completed_at"}``.

    :param snapshot_ids: ``{source volume: snapshot id}`` to copy (templated).
    :param target_region: The region to copy into (templated).
    :param kms_key_id: The destination KMS key; without one a copy keeps its source's encryption (templated).
    :param round_name: The round the copies belong to, as tagged (templated).
    :param completion_duration_minutes: A time-based copy's duration (CompletionDurationMinutes), if any.
    :param waiter_delay: Seconds between polls of the copies.
    :param waiter_max_attempts: Polls at most; 24 h of polls at ``waiter_delay`` when not given.
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source snapshots' region; the connection's region when not given.
    """

    template_fields: Sequence[str] = ("aws_conn_id", "snapshot_ids", "target_region", "kms_key_id", "round_name")

    def __init__(self, *, snapshot_ids: dict[str, str] | str, target_region: str, kms_key_id: str | None = None,
                 round_name: str = FINAL_ROUND, completion_duration_minutes: int | None = None,
                 waiter_delay: int = 30, waiter_max_attempts: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.snapshot_ids = snapshot_ids
        self.target_region = target_region
        self.kms_key_id = kms_key_id
        self.round_name = round_name
        self.completion_duration_minutes = completion_duration_minutes
        self.waiter_delay = waiter_delay
        # the same 24 h however often it polls
        self.waiter_max_attempts = waiter_max_attempts or attempts_for(waiter_delay)

    def execute(self, context) -> None:
        target = self.ec2(self.target_region)
        started_at = _iso(_now())
        copies = target.copy_snapshots(migration=self.migration(context), round_name=str(self.round_name),
                                       snapshots=dict(self.snapshot_ids), source_region=self.src_region(),
                                       kms_key_id=self.kms_key_id or None,
                                       completion_minutes=self.completion_duration_minutes)
        context["ti"].xcom_push(key="copy_state", value={"copies": copies, "started_at": started_at})
        self.defer(trigger=_trigger(snapshot_ids=list(copies.values()), aws_conn_id=self.aws_conn_id,
                                    region_name=self.target_region, waiter_delay=self.waiter_delay,
                                    waiter_max_attempts=self.waiter_max_attempts),
                   method_name="execute_complete",
                   timeout=timedelta(days=2))

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        saved = context["ti"].xcom_pull(task_ids=self.task_id, key="copy_state")
        copies, started_at = saved["copies"], saved["started_at"]
        if (event or {}).get("status") != "success":
            raise AirflowFailException(f"copy to {self.target_region}: {event.get('message')}")
        result = {"copies": copies, "region": self.target_region, "started_at": started_at,
                  "completed_at": _iso(_now())}
        self.log.info("copies completed in %s: %s", self.target_region, copies)
        return result


class EbsShareSnapshotOperator(EbsMigrationBaseOperator):
    """
    Share snapshots with the target account (createVolumePermission); a no-op without an account.

    :param snapshot_ids: ``{source volume: snapshot id}`` to share (templated).
    :param region: The snapshots' region (templated).
    :param account_id: The account to share with; None or empty: nothing is shared (templated).
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    """

    template_fields: Sequence[str] = ("aws_conn_id", "snapshot_ids", "region", "account_id")

    def __init__(self, *, snapshot_ids: dict[str, str] | str, region: str, account_id: str | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.snapshot_ids = snapshot_ids
        self.region = region
        self.account_id = account_id

    def execute(self, context) -> dict[str, Any]:
        # A DAG rendering templates as native objects turns "{{ params.target_account }}" into an int.
        account = "" if self.account_id is None else str(self.account_id).strip()
        if not account or account == "None":
            self.log.info("no target account: the copies stay in this account")
            return {"shared_with": None}
        ec2 = self.ec2(self.region)
        for snapshot_id in dict(self.snapshot_ids).values():
            ec2.share_snapshot(snapshot_id, account)
            self.log.info("snapshot %s shared with account %s", snapshot_id, account)
        return {"shared_with": account, "snapshots": dict(self.snapshot_ids)}


class EbsCreateVolumeOperator(EbsMigrationBaseOperator):
    """
    Create a volume per copied snapshot in the target AZ, wait until available, report initialization.

    A retry finds the volumes an earlier try made (tags), or EC2 answers the same volume (client token).
    In a migration run, the run's params volume_type, volume_initialization and its rate win over the arguments.

    :param snapshot_ids: ``{source volume: snapshot id}`` to make volumes of (templated).
    :param region: The snapshots' region (templated).
    :param availability_zone: The new volumes' availability zone (templated).
    :param volume_type: The EBS volume type (gp3, io2, ...).
    :param initialization: ``none``, ``fast-snapshot-restore`` or ``rate`` (Provisioned initialization rate).
    :param initialization_rate_mib_s: The initialization rate in MiB/s, with ``rate``.
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    """

    template_fields: Sequence[str] = ("aws_conn_id", "snapshot_ids", "region", "availability_zone")

    def __init__(self, *, snapshot_ids: dict[str, str] | str, region: str, availability_zone: str,
                 volume_type: str = "gp3", initialization: str = "none", initialization_rate_mib_s: int | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.snapshot_ids = snapshot_ids
        self.region = region
        self.availability_zone = availability_zone
        self.volume_type = volume_type
        self.initialization = initialization
        self.initialization_rate_mib_s = initialization_rate_mib_s

    def execute(self, context) -> dict[str, Any]:
        spec = context_spec(context) if "params" in context and "target_region" in context["params"] else None
        if spec is not None:
            self.volume_type, self.initialization = spec.volume_type, spec.volume_initialization
            self.initialization_rate_mib_s = spec.volume_initialization_rate_mib_s
        ec2 = self.ec2(self.region)
        mig = self.migration(context)
        volumes: dict[str, str] = {}
        for source_volume, snapshot_id in dict(self.snapshot_ids).items():
            existing = ec2.find_volumes({TAG_MIGRATION: mig, TAG_SOURCE_VOLUME: source_volume})
            if existing:
                volumes[source_volume] = existing[0]["VolumeId"]
                self.log.info("volume %s for %s exists from an earlier try: reusing it", volumes[source_volume],
                              source_volume)
                continue
            if self.initialization == "fast-snapshot-restore":
                ec2.enable_fast_snapshot_restore(snapshot_id, self.availability_zone)
            volumes[source_volume] = ec2.create_volume(
                snapshot_id=snapshot_id, availability_zone=self.availability_zone, volume_type=self.volume_type,
                tags={TAG_MIGRATION: mig, TAG_SOURCE_VOLUME: source_volume, TAG_SOURCE_SNAPSHOT: snapshot_id,
                      "Name": f"pgops-migrated-{source_volume}"},
                # a retry whose first CreateVolume succeeded unseen (lost response, tags not yet listed) gets the
                # same volume back instead of a second one
                token=_hooks().client_token(mig, source_volume, snapshot_id, self.availability_zone),
                initialization_rate_mib_s=self.initialization_rate_mib_s if self.initialization == "rate" else None)
            self.log.info("volume %s from %s in %s (%s, initialization %s)", volumes[source_volume], snapshot_id,
                          self.availability_zone, self.volume_type, self.initialization)
        ec2.wait_volumes_available(volumes.values())
        available_at = _iso(_now())
        init = {v: ec2.volume_initialization(v) for v in volumes.values()}
        self.log.info("volumes available at %s: %s; initialization %s", available_at, volumes, init)
        return {"volumes": volumes, "region": self.region, "availability_zone": self.availability_zone,
                "available_at": available_at, "initialization": init}


class EbsMigrationReportOperator(EbsMigrationBaseOperator):
    """
    Write the ebs-migration report (bucket + XCom); delete intermediate snapshots after a success if asked.

    Runs whatever happened before it: each step's result is None when the step did not run or failed, and the
    report's status says how far the migration got (ok, warning for a dry run or a declined cutover, failed).

    :param cluster_name: The inventory cluster whose bucket keeps the report.
    :param spec: The validated params (the validate task's result) (templated).
    :param preflight: The preflight's result (templated).
    :param chain: The chain's result, the newest decision's (templated).
    :param approval: The cutover gate's decision record (templated).
    :param cutover: The cutover's result (templated).
    :param final_copy: The final copy's result (templated).
    :param shared: The share task's result (templated).
    :param volumes: The create-volume task's result (templated).
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param source_region: The source volumes' region; the connection's region when not given.
    """

    template_fields: Sequence[str] = ("aws_conn_id", "spec", "preflight", "chain", "approval", "cutover",
                                      "final_copy", "shared", "volumes")

    def __init__(self, *, cluster_name: str, spec: dict[str, Any] | str | None = None,
                 preflight: dict[str, Any] | str | None = None, chain: dict[str, Any] | str | None = None,
                 approval: dict[str, Any] | str | None = None, cutover: dict[str, Any] | str | None = None,
                 final_copy: dict[str, Any] | str | None = None, shared: dict[str, Any] | str | None = None,
                 volumes: dict[str, Any] | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster_name = cluster_name
        self.spec = spec
        self.preflight = preflight
        self.chain = chain
        self.approval = approval
        self.cutover = cutover
        self.final_copy = final_copy
        self.shared = shared
        self.volumes = volumes

    def execute(self, context) -> dict[str, Any]:
        from pgops.airflow.operators.approval import NOT_APPROVED, describe
        from pgops.core.reports import envelope, utcnow
        from pgops.inventory import load_inventory

        spec, chain, cutover, approval = self.spec, self.chain, self.cutover, self.approval
        copy, share, volume = self.final_copy, self.shared, self.volumes
        declined = isinstance(approval, dict) and approval.get("decision") in NOT_APPROVED and not cutover
        dry_run = bool(spec and spec.get("dry_run"))
        status = "ok" if volume else ("warning" if dry_run or declined else "failed")
        # the chain's rounds, then any the cutover took because the chain's last round was stale
        rounds = (chain or {}).get("rounds", []) + (cutover or {}).get("rounds", [])
        downtime_s = None
        if cutover and copy:
            downtime_s = (datetime.fromisoformat(copy["completed_at"])
                          - datetime.fromisoformat(cutover["quiesced_at"])).total_seconds()
        to_volume_s = None
        if cutover and volume:
            to_volume_s = (datetime.fromisoformat(volume["available_at"])
                           - datetime.fromisoformat(cutover["quiesced_at"])).total_seconds()
        deleted: list[str] = []
        if status == "ok" and spec.get("delete_intermediate_snapshots"):
            deleted = self._delete_intermediates(context, spec, rounds, copy,
                                                 superseded=(cutover or {}).get("superseded_snapshots") or [])
        body = {
            "migration_id": self.migration(context), "dry_run": dry_run, "params": spec,
            "source": self.preflight, "plan": (spec or {}).get("plan"),
            "rounds": [{"index": r["index"], "started_at": r["started_at"], "duration_s": r["duration_s"],
                        "delta_bytes": r["delta_bytes"], "predicted_duration_s": r["predicted_duration_s"],
                        "snapshots": r["snapshots"], "copies": r.get("copies")} for r in rounds],
            "decisions": (chain or {}).get("decisions", []), "outcome": (chain or {}).get("outcome"),
            "cutover": cutover, "downtime_s": downtime_s, "cutover_to_volume_available_s": to_volume_s,
            "destination_snapshots": (copy or {}).get("copies"), "shared": share,
            "destination_volumes": (volume or {}).get("volumes"), "initialization": (volume or {}).get("initialization"),
            "deleted_intermediate_snapshots": deleted,
            "approval": approval, "approval_text": describe(approval),
            "not_cut_over": self._not_approved(context, spec, rounds) if declined else None,
        }
        started = context["dag_run"].start_date if context.get("dag_run") else None
        report = envelope(kind="ebs-migration", cluster=self.cluster_name, run_id=context["run_id"],
                          started_at=started or utcnow(), status=status, body=body)
        cluster = load_inventory().get(self.cluster_name)
        key = self.s3_hook(cluster.aws_conn_id).write_report(cluster, report)
        self.log.info("ebs-migration report %s (status %s): %d round(s), downtime %s s, volumes %s", key, status,
                      len(rounds), downtime_s, body["destination_volumes"])
        if status == "failed":
            raise AirflowFailException(f"migration {body['migration_id']} did not finish; report at {key}")
        return report | {"report_key": key}

    def _not_approved(self, context, spec: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """No cutover (rejected or timed out): keep the chain's snapshots and copies (resumable), or delete them."""
        choice = str(context["params"].get("if_not_approved") or "keep")
        owned = [(region, snapshot_id) for region, key in ((self.src_region(), "snapshots"),
                                                           (spec["target_region"], "copies"))
                 for r in rounds for snapshot_id in (r.get(key) or {}).values()]
        if choice != "delete":
            self.log.warning("no cutover: %d snapshot(s) and copies kept; clear approve_cutover (with downstream) "
                             "in this run to ask again", len(owned))
            return {"if_not_approved": choice, "kept": [s for _, s in owned],
                    "resume": "clear approve_cutover with its downstream tasks in this run: it asks again, then a "
                              "fresh round precedes the cutover"}
        deleted, not_deleted = [], {}
        for region, snapshot_id in owned:
            try:
                self.ec2(region).delete_snapshot(snapshot_id)
                deleted.append(snapshot_id)
            except Exception as exc:  # noqa: BLE001 - the report names what is left and why
                not_deleted[snapshot_id] = str(exc)[:300]
        self.log.warning("no cutover: deleted %s; not deleted %s", deleted, not_deleted)
        return {"if_not_approved": choice, "deleted": deleted, "not_deleted": not_deleted}

    def _delete_intermediates(self, context, spec: dict[str, Any], rounds: list[dict[str, Any]],
                              copy: dict[str, Any] | None, superseded: list[str] = ()) -> list[str]:
        # Only after the final copy completed: the newest copy is kept, so later copies stay incremental.
        keep = set((copy or {}).get("copies", {}).values())
        deleted = []
        for snapshot_id in superseded:  # final snapshots of an earlier try without their backup_label
            self.ec2().delete_snapshot(snapshot_id)
            deleted.append(snapshot_id)
        for region, key in ((self.src_region(), "snapshots"), (spec["target_region"], "copies")):
            ec2 = self.ec2(region)
            for r in rounds:
                for snapshot_id in (r.get(key) or {}).values():
                    if snapshot_id in keep:
                        continue
                    ec2.delete_snapshot(snapshot_id)
                    deleted.append(snapshot_id)
        self.log.info("deleted intermediate snapshots: %s", deleted)
        return deleted
