"""A deferrable sensor on EBS snapshot completion (no worker slot held while a snapshot runs for hours)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

WAIT_BUDGET_S = 24 * 3600  # the trigger's default: 2880 polls of 30 s

if TYPE_CHECKING:
    from pgops.airflow.ebs_hooks import EbsEc2Hook


def _trigger(**kwargs: Any):
    from pgops.airflow.triggers.ebs import EbsSnapshotCompletedTrigger

    return EbsSnapshotCompletedTrigger(**kwargs)


class EbsSnapshotCompletedSensor(BaseSensorOperator):
    """
    Wait until every snapshot in ``snapshot_ids`` is completed; fail when one ends in state error.

    :param snapshot_ids: The snapshots: a list, one id, or ``{source volume: snapshot id}`` (templated).
    :param aws_conn_id: The Airflow connection used for AWS credentials (templated).
    :param region_name: The snapshots' region; the connection's region when not given (templated).
    :param deferrable: Wait in the triggerer (no worker slot) instead of poking.
    :param waiter_delay: Seconds between polls.
    :param waiter_max_attempts: Polls at most; 24 h of polls at ``waiter_delay`` when not given.
    """

    template_fields: Sequence[str] = ("snapshot_ids", "aws_conn_id", "region_name")

    def __init__(self, *, snapshot_ids: list[str] | str, aws_conn_id: str, region_name: str | None = None,
                 deferrable: bool = True, waiter_delay: int = 30, waiter_max_attempts: int | None = None,
                 **kwargs: Any):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.snapshot_ids = snapshot_ids
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.deferrable = deferrable
        self.waiter_delay = waiter_delay
        # 24 h of polls whatever the interval (a 5 s poll on the cutover path must not shorten the wait)
        self.waiter_max_attempts = waiter_max_attempts or max(1, math.ceil(WAIT_BUDGET_S / max(waiter_delay, 1)))

    @cached_property
    def hook(self) -> EbsEc2Hook:
        from pgops.airflow.ebs_hooks import (
            EbsEc2Hook,  # boto3 + provider: load at run time, not at DAG parse time
        )

        return EbsEc2Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    def _ids(self) -> list[str]:
        ids = self.snapshot_ids
        if isinstance(ids, dict):
            ids = list(ids.values())
        if isinstance(ids, str):
            ids = [ids]
        return list(ids)

    def poke(self, context) -> bool:
        snaps = self.hook.describe_snapshots(self._ids())
        for s in snaps:
            self.log.info("snapshot %s: %s %s", s["SnapshotId"], s["State"], s.get("Progress"))
            if s["State"] == "error":
                raise AirflowFailException(f"snapshot {s['SnapshotId']} ended in state error: "
                                           f"{s.get('StateMessage', 'no message')}. Fix: take it again")
        return all(s["State"] == "completed" for s in snaps)

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):
            return self._ids()
        self.defer(trigger=_trigger(
            snapshot_ids=self._ids(), aws_conn_id=self.aws_conn_id, region_name=self.region_name,
            waiter_delay=self.waiter_delay, waiter_max_attempts=self.waiter_max_attempts),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.waiter_delay * self.waiter_max_attempts * 2))
        return None

    def execute_complete(self, context, event: dict[str, Any]) -> list[str]:
        if event.get("status") != "success":
            raise AirflowFailException(event.get("message", "snapshot wait failed"))
        self.log.info("snapshot(s) completed: %s", event["snapshot_ids"])
        return event["snapshot_ids"]
