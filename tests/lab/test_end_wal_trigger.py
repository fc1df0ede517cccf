"""The backup's end-WAL wait (WalSegmentArchivedTrigger) on the lab's S3: only the segment's own object (plain or
compressed) counts as archived; <segment>.partial and <segment>.<offset>.backup, whose keys start the same, do not."""

from __future__ import annotations

import asyncio
import os

import pytest

pytestmark = [pytest.mark.lab]


def _first_event(trigger) -> dict:
    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first())


def test_a_partial_with_the_end_segments_name_does_not_satisfy_the_wait(lab):
    from pgops.airflow.triggers.s3 import WalSegmentArchivedTrigger

    st = lab.load()
    s3 = lab.s3_client()
    segment = "0000000100000000000000A7"
    key = f"{st.prefix}/endwal-{os.getpid()}/wals/{segment[:16]}/{segment}"
    s3.put_object(Bucket=st.bucket, Key=f"{key}.partial", Body=b"partial")
    s3.put_object(Bucket=st.bucket, Key=f"{key}.00000028.backup", Body=b"backup label")

    def wait(timeout_s: float) -> dict:
        return _first_event(WalSegmentArchivedTrigger(aws_conn_id=lab.cluster.aws_conn_id, bucket=st.bucket,
                                                      key_prefix=key, poll_interval_s=0.2, timeout_s=timeout_s))

    event = wait(1.5)
    assert event["status"] == "error" and f"{key} (plain or compressed) was not archived" in event["message"]

    s3.put_object(Bucket=st.bucket, Key=f"{key}.lz4", Body=b"segment")
    assert wait(30) == {"status": "success", "key": f"{key}.lz4"}
