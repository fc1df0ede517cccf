"""The chain's rounds as the migration DAG records them (XCom dicts), turned into the planner's inputs.

A round record is {"index", "started_at" (ISO), "duration_s", "delta_bytes", "predicted_duration_s",
"snapshots": {volume: snapshot}, "copies": {volume: copy in the target region}}. Pure: no AWS, no Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pgops.core.ebs.planner import RoundObservation
from pgops.core.ebs.spec import TAG_SOURCE_SNAPSHOT

COMPLETED = "completed"
PENDING = "pending"


def observations(rounds: Sequence[Mapping[str, Any]], volume_size_bytes: int) -> list[RoundObservation]:
    """The planner's RoundObservations of the recorded rounds, in index order."""
    return [RoundObservation(index=r["index"], started_at=datetime.fromisoformat(r["started_at"]),
                             duration_s=r["duration_s"], delta_bytes=r["delta_bytes"],
                             volume_size_bytes=volume_size_bytes, predicted_duration_s=r.get("predicted_duration_s"))
            for r in sorted(rounds, key=lambda r: r["index"])]


def copy_ids(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """{copy snapshot id: round index} of every copy the rounds record."""
    return {copy_id: r["index"] for r in rounds for copy_id in (r.get("copies") or {}).values()}


def copy_records(rounds: Sequence[dict[str, Any]], described: Iterable[Mapping[str, Any]],
                 seen_at: datetime) -> list[dict[str, Any]]:
    """planner.copy_state's input: each recorded copy as DescribeSnapshots shows it, {"index": round, **snapshot}.

    A completed copy without CompletionTime (an endpoint that leaves it out) gets the time it was first seen
    completed, kept in its round's record ("copies_completed_at") so that its duration stays put; without a
    completion time the planner would count the copy as not done and hold the chain for it.
    """
    by_id = {copy_id: r for r in rounds for copy_id in (r.get("copies") or {}).values()}
    out = []
    for snap in described:
        record = by_id.get(snap.get("SnapshotId"))
        if record is None:
            continue
        item = {"index": record["index"], **snap}
        if snap.get("State") == COMPLETED and not snap.get("CompletionTime"):
            first_seen = record.setdefault("copies_completed_at", {})
            at = first_seen.setdefault(snap["SnapshotId"], seen_at.astimezone(UTC).isoformat())
            item["CompletionTime"] = datetime.fromisoformat(at)
        out.append(item)
    return out


def adopt_copies(rounds: Sequence[dict[str, Any]], tagged: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Record copies an earlier try made of these rounds' snapshots (found by their source-snapshot tag).

    A retried chain walks its rounds again, reusing their snapshots; the copies those had stay in the target
    region and count as the rounds' own, so the retry neither copies a round twice nor starts a second copy
    beside one still in flight. Returns {copy id: source snapshot id} of the copies adopted now.
    """
    by_source: dict[str, str] = {}
    for snap in tagged:
        tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
        source = tags.get(TAG_SOURCE_SNAPSHOT)
        if source and snap.get("State") in (COMPLETED, PENDING):
            by_source.setdefault(source, snap["SnapshotId"])
    adopted = {}
    for r in rounds:
        copies = r.setdefault("copies", {})
        for volume_id, snapshot_id in r["snapshots"].items():
            if volume_id not in copies and snapshot_id in by_source:
                copies[volume_id] = by_source[snapshot_id]
                adopted[by_source[snapshot_id]] = snapshot_id
    return adopted


def stray_copies(rounds: Sequence[Mapping[str, Any]], tagged: Iterable[Mapping[str, Any]]) -> list[str]:
    """Copies of this migration in flight that no recorded round owns (an earlier try's, of a later round)."""
    known = copy_ids(rounds)
    return sorted(s["SnapshotId"] for s in tagged if s.get("State") == PENDING and s["SnapshotId"] not in known)
