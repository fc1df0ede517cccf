"""Deferrable waits on EBS snapshots, on the Amazon provider's waiter-trigger base.

The waiter is ours (snapshot_completed, 24 h budget, in plugins/pgops/airflow/waiters/ec2.json): botocore's
snapshot_completed gives up after 10 minutes and a first snapshot can take 14 hours. `run` polls one
waiter attempt at a time in a thread, so it needs no aiobotocore, logs each snapshot's Progress, and
backs off (doubling the delay) while EC2 answers a limit error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.triggers.base import TriggerEvent
from botocore.exceptions import WaiterError

from pgops.airflow.ebs_hooks import BACKOFF_ERRORS, EbsEc2Hook

MAX_BACKOFF_S = 300


class EbsSnapshotCompletedTrigger(AwsBaseWaiterTrigger):
    """
    Fires when every snapshot in ``snapshot_ids`` is completed (or one ends in state error).

    :param snapshot_ids: The snapshots to wait for.
    :param waiter_delay: Seconds between polls (doubled, up to 300 s, while EC2 answers a limit error).
    :param waiter_max_attempts: Polls at most.
    :param aws_conn_id: The Airflow connection used for AWS credentials.
    :param region_name: The snapshots' region; the connection's region when not given.
    :param progress: ``{"cluster", "run_id", "what", "round", "rounds_predicted"}``: each poll's percent per
        snapshot goes to the log and, for a cluster, to its progress record for the dashboard.
    """

    aws_hook_class = EbsEc2Hook

    def __init__(self, *, snapshot_ids: list[str], waiter_delay: int = 30, waiter_max_attempts: int = 2880,
                 aws_conn_id: str | None = "aws_default", region_name: str | None = None,
                 progress: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(
            serialized_fields={"snapshot_ids": list(snapshot_ids), "progress": progress},
            waiter_name="snapshot_completed",
            waiter_args={"SnapshotIds": list(snapshot_ids)},
            failure_message=f"EBS snapshot(s) {', '.join(snapshot_ids)} failed",
            status_message=f"EBS snapshot(s) {', '.join(snapshot_ids)} still pending",
            status_queries=["Snapshots[].[SnapshotId, State, Progress]"],
            return_key="snapshot_ids",
            return_value=list(snapshot_ids),
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            **kwargs,
        )
        self.snapshot_ids = list(snapshot_ids)
        self.progress = progress
        self._started = time.monotonic()

    def _attempt(self, waiter) -> tuple[str, dict[str, Any] | None]:
        try:
            waiter.wait(**self.waiter_args, WaiterConfig={"MaxAttempts": 1})
            return "success", None
        except WaiterError as exc:
            last = exc.last_response or {}
            code = (last.get("Error") or {}).get("Code", "")
            if "terminal failure" in str(exc) and not code:
                return "failure", last
            if code:
                return ("backoff" if code in BACKOFF_ERRORS else "error"), last
            return "pending", last

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        waiter = await asyncio.to_thread(hook.get_waiter, self.waiter_name)
        delay_s = self.waiter_delay
        for attempt in range(1, self.attempts + 1):
            outcome, last = await asyncio.to_thread(self._attempt, waiter)
            if outcome == "success":
                yield TriggerEvent({"status": "success", self.return_key: self.return_value})
                return
            snaps = (last or {}).get("Snapshots", [])
            progress = ", ".join(f"{s['SnapshotId']} {s.get('State')} {s.get('Progress', '?')}" for s in snaps)
            if outcome == "failure":
                failed = [s for s in snaps if s.get("State") == "error"]
                detail = "; ".join(f"{s['SnapshotId']}: {s.get('StateMessage', 'no message')}" for s in failed)
                yield TriggerEvent({"status": "error", self.return_key: self.return_value,
                                    "message": f"{self.failure_message}: {detail or progress}. Fix: take the "
                                               "snapshot again (the next one carries the failed one's blocks)"})
                return
            if outcome == "error":
                yield TriggerEvent({"status": "error", self.return_key: self.return_value,
                                    "message": f"{self.failure_message}: {last.get('Error')}"})
                return
            if outcome == "backoff":
                delay_s = min(delay_s * 2, MAX_BACKOFF_S)
                self.log.warning("EC2 answered %s; backing off to %d s between polls",
                                 (last.get("Error") or {}).get("Code"), delay_s)
            else:
                delay_s = self.waiter_delay
                self.log.info("attempt %d/%d: %s", attempt, self.attempts, progress or "no answer yet")
                if self.progress and snaps:
                    await asyncio.to_thread(self._report, snaps)
            await asyncio.sleep(delay_s)
        yield TriggerEvent({"status": "error", self.return_key: self.return_value,
                            "message": f"{self.status_message} after {self.attempts} polls "
                                       f"({self.attempts * self.waiter_delay / 3600:.1f} h). Fix: check the "
                                       "snapshot in the EC2 console; raise waiter_max_attempts for huge volumes"})

    def _report(self, snaps: list[dict[str, Any]]) -> None:
        """One progress record: round n of the predicted total, percent per snapshot (never fails the wait)."""
        from pgops.airflow import progress as P

        info = self.progress or {}
        record = {"kind": "migration", "what": info.get("what", "EBS snapshots"), "run_id": info.get("run_id"),
                  "state": "running", "round": info.get("round"), "rounds_predicted": info.get("rounds_predicted"),
                  "volumes": {s["SnapshotId"]: f"{s.get('State')} {s.get('Progress') or '?'}" for s in snaps},
                  "elapsed_s": round(time.monotonic() - self._started, 1)}
        P.publish_for_cluster(info.get("cluster"), "migration", record, self.log)
