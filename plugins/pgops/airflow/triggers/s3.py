"""Deferrable waits on the bucket. Triggers live in plugins/ so the triggerer can import them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from pgops.core.wal import COMPRESSION_SUFFIXES


def is_segment_key(key: str, segment_key: str) -> bool:
    """The segment's own object: its key, plain or with a compression suffix. Never ``<segment>.partial`` or
    ``<segment>.<offset>.backup``: those are other files, and do not make the segment archived."""
    if key == segment_key:
        return True
    rest = key[len(segment_key):]
    return key.startswith(segment_key) and rest[:1] == "." and rest[1:] in COMPRESSION_SUFFIXES


class WalSegmentArchivedTrigger(BaseTrigger):
    """Fires when the WAL segment whose key (without compression suffix) is ``key_prefix`` is archived: that key,
    plain or compressed, exists (``is_segment_key``). Lists through one PgopsS3Hook (one client) per run.

    :param aws_conn_id: the Airflow AWS connection of the bucket
    :param bucket: the bucket
    :param key_prefix: the segment's key without compression suffix
    :param poll_interval_s: seconds between two listings
    :param timeout_s: fail when the segment is not archived after this long
    """

    def __init__(self, *, aws_conn_id: str, bucket: str, key_prefix: str, poll_interval_s: float = 5.0,
                 timeout_s: float = 900.0):
        super().__init__()
        self.aws_conn_id = aws_conn_id
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"aws_conn_id": self.aws_conn_id, "bucket": self.bucket, "key_prefix": self.key_prefix,
                 "poll_interval_s": self.poll_interval_s, "timeout_s": self.timeout_s})

    def _is_segment(self, key: str) -> bool:
        return is_segment_key(key, self.key_prefix)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from pgops.airflow.hooks import PgopsS3Hook

        hook = PgopsS3Hook(aws_conn_id=self.aws_conn_id)  # one client for every poll of this run
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                key = await asyncio.to_thread(hook.find_key, self.bucket, self.key_prefix, self._is_segment)
            except Exception as exc:  # transient S3 errors: keep polling until the deadline
                self.log.warning("listing s3://%s/%s failed: %s", self.bucket, self.key_prefix, exc)
                key = None
            if key:
                yield TriggerEvent({"status": "success", "key": key})
                return
            if time.monotonic() >= deadline:
                yield TriggerEvent({"status": "error", "message": (
                    f"WAL segment s3://{self.bucket}/{self.key_prefix} (plain or compressed) was not archived "
                    f"within {self.timeout_s:.0f} s: the backup cannot be restored until it is. Fix: check "
                    "archive_command and pg_stat_archiver on the primary")})
                return
            self.log.info("waiting for s3://%s/%s (plain or compressed) to be archived", self.bucket, self.key_prefix)
            await asyncio.sleep(self.poll_interval_s)
