"""Progress of long work: a line in the task log at least every ``interval_s`` and a small JSON record in the
bucket that the dashboard shows while the run is going.

Record key: ``<prefix>/<server>/pgops/progress/<kind>.json`` (one per kind, overwritten each tick; the final tick
marks it ``done``). A record is only shown for the run that wrote it while that run is running.

The measuring is the caller's (a callable returning a dict); :func:`describe` turns a record into the log line.
Nothing here ever fails the task: a measurement or a write that fails is logged and the work goes on.
Tasks reach the bucket through PgopsS3Hook (progress_publisher, read_progress, uploaded_since); the functions
here take its boto3 client. Triggers write through :func:`publish_for_cluster`, whose :class:`ClusterPublisher`
keeps one hook per cluster and kind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pgops.core.restore import human_bytes
from pgops.inventory import Cluster

DEFAULT_INTERVAL_S = 30.0
PUBLISHER_REFRESH_S = 900.0  # a trigger's publisher reads the inventory and the connection again after this


def progress_key(cluster: Cluster, kind: str) -> str:
    return f"{cluster.storage.server_prefix}/pgops/progress/{kind}.json"


def _bytes(n: float | int | None) -> str:
    return "?" if n is None else human_bytes(float(n))


def describe(record: dict[str, Any]) -> str:
    """One line for a progress record (plain values in, text out)."""
    what = record.get("what", record.get("kind", "work"))
    parts = []
    done, total = record.get("done_bytes"), record.get("total_bytes")
    if done is not None:
        part = f"{_bytes(done)} {record.get('verb', 'done')}"
        if total:
            part += f" of ~{_bytes(total)}{record.get('total_note', '')} ({min(100.0, 100.0 * done / total):.0f}%)"
        parts.append(part)
    if record.get("rate_bytes_s"):
        parts.append(f"{_bytes(record['rate_bytes_s'])}/s")
    if record.get("lsn"):
        target = f" of target {record['target_lsn']}" if record.get("target_lsn") else ""
        parts.append(f"replayed to {record['lsn']}{target}")
    if record.get("percent") is not None:
        parts.append(f"{record['percent']:.0f}%")
    if record.get("round") is not None:
        total_rounds = f" of ~{record['rounds_predicted']}" if record.get("rounds_predicted") else ""
        parts.append(f"round {record['round']}{total_rounds}")
    for name, pct in sorted((record.get("volumes") or {}).items()):
        parts.append(f"{name} {pct}")
    if record.get("note"):
        parts.append(str(record["note"]))
    parts.append(f"{record.get('elapsed_s', 0):.0f} s elapsed")
    return f"{what}: " + ", ".join(parts)


class ProgressTicker:
    """``with ProgressTicker(...):`` around long work: every ``interval_s`` (and once at the end) measure, log,
    publish. ``measure`` runs in the ticker's thread and must not share non-thread-safe clients with the work.

    ``skip_end_if_short``: work that ended before the first interval gets no end record either (the dashboard shows
    only a running run's record, so a short run needs none, and the measure's client is never made for it)."""

    def __init__(self, *, kind: str, what: str, run_id: str, measure: Callable[[], dict[str, Any]], log,
                 publish: Callable[[dict[str, Any]], None] | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 skip_end_if_short: bool = False):
        self.skip_end_if_short = skip_end_if_short
        self.kind, self.what, self.run_id = kind, what, run_id
        self.measure, self.log, self.publish = measure, log, publish
        self.interval_s = max(0.2, float(interval_s))
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_done: tuple[float, float] | None = None

    def __enter__(self) -> ProgressTicker:
        self._thread = threading.Thread(target=self._loop, name=f"pgops-progress-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 30)
        if self.skip_end_if_short and not self.records:
            return
        self.tick(state="done" if exc_type is None else "failed")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick(state="running")

    def tick(self, *, state: str) -> dict[str, Any] | None:
        try:
            measured = dict(self.measure() or {})
        except Exception as exc:  # noqa: BLE001 - progress must never fail the work it watches
            self.log.info("%s: progress not measured (%s)", self.what, str(exc).splitlines()[0][:200] if str(exc) else exc)
            measured = {}
        now = time.monotonic()
        record = {"kind": self.kind, "what": self.what, "run_id": self.run_id, "state": state,
                  "started_at": self.started_at.isoformat(), "updated_at": datetime.now(UTC).isoformat(),
                  "elapsed_s": round(now - self.started, 1), **measured}
        done = measured.get("done_bytes")
        if done is not None and "rate_bytes_s" not in measured:
            record["rate_bytes_s"] = round(done / max(now - self.started, 1e-6))
        self.records.append(record)
        self.log.info("progress %s", describe(record))
        if self.publish is not None:
            try:
                self.publish(record)
            except Exception as exc:  # noqa: BLE001
                self.log.info("%s: progress not published (%s)", self.what, str(exc).splitlines()[0][:200])
        return record


def bucket_publisher(s3, cluster: Cluster, kind: str) -> Callable[[dict[str, Any]], None]:
    key = progress_key(cluster, kind)

    def publish(record: dict[str, Any]) -> None:
        s3.put_object(Bucket=cluster.storage.bucket, Key=key, Body=json.dumps(record, sort_keys=True).encode(),
                      ContentType="application/json")

    return publish


def read_progress(s3, cluster: Cluster, kind: str) -> dict[str, Any] | None:
    try:
        obj = s3.get_object(Bucket=cluster.storage.bucket, Key=progress_key(cluster, kind))
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(obj["Body"].read())


def uploaded_since(s3, bucket: str, prefix: str, since: datetime) -> int:
    """Bytes written under ``prefix`` since ``since``: finished objects plus the parts of multipart uploads still
    in progress (a base backup's tar is one multipart upload until it is complete)."""
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []) if o["LastModified"] >= since)
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for up in uploads:
        if up.get("Initiated") and up["Initiated"] < since:
            continue
        for page in s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]):
            total += sum(p["Size"] for p in page.get("Parts", []))
    return total


class ClusterPublisher:
    """Progress records of one inventory cluster and kind, written through one PgopsS3Hook: one boto3 client for
    every record (a trigger writes one every poll).

    The cluster (its bucket, its AWS connection) is read from the inventory with the first record, and again when
    the inventory file changes, after ``refresh_s``, and after a write that failed (a rotated key). Blocking: call
    it in a thread from a trigger; thread-safe (boto3 clients are). Never raises.
    """

    def __init__(self, cluster_name: str, kind: str, *, refresh_s: float = PUBLISHER_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic):
        self.cluster_name, self.kind = cluster_name, kind
        self.refresh_s, self.clock = refresh_s, clock
        self._lock = threading.Lock()
        self._publish: Callable[[dict[str, Any]], None] | None = None
        self._made: tuple[float, tuple[str, int | None]] = (0.0, ("", None))

    def _publisher(self) -> Callable[[dict[str, Any]], None]:
        from pgops.inventory import inventory_path

        path = inventory_path()
        try:
            stamp = (str(path), path.stat().st_mtime_ns)
        except OSError:
            stamp = (str(path), None)  # load_inventory says what is wrong
        with self._lock:
            made_at, made_from = self._made
            if self._publish is None or made_from != stamp or self.clock() - made_at >= self.refresh_s:
                from pgops.airflow.hooks import PgopsS3Hook
                from pgops.inventory import load_inventory

                cluster = load_inventory(path).get(self.cluster_name)
                self._publish = PgopsS3Hook(aws_conn_id=cluster.aws_conn_id).progress_publisher(cluster, self.kind)
                self._made = (self.clock(), stamp)
            return self._publish

    def __call__(self, record: dict[str, Any], log) -> None:
        try:
            self._publisher()(record)
        except Exception as exc:  # noqa: BLE001 - the dashboard's record must never stop the work
            with self._lock:
                self._publish = None  # the next record reads the inventory and the connection again
            log.info("progress not published (%s)", str(exc).splitlines()[0][:200] if str(exc) else exc)


_PUBLISHERS: dict[tuple[str, str], ClusterPublisher] = {}
_PUBLISHERS_LOCK = threading.Lock()


def cluster_publisher(cluster_name: str, kind: str) -> ClusterPublisher:
    """The process's publisher of a cluster's ``kind`` records (one per cluster and kind, so one client)."""
    with _PUBLISHERS_LOCK:
        publisher = _PUBLISHERS.get((cluster_name, kind))
        if publisher is None:
            publisher = _PUBLISHERS[(cluster_name, kind)] = ClusterPublisher(cluster_name, kind)
        return publisher


def publish_for_cluster(cluster_name: str | None, kind: str, record: dict[str, Any], log) -> None:
    """Log a progress record and, for an inventory cluster, write it to the bucket through the cluster's
    :class:`ClusterPublisher` (from a trigger: blocking, call it in a thread). Never raises."""
    log.info("progress %s", describe(record))
    if cluster_name:
        cluster_publisher(cluster_name, kind)(record, log)
