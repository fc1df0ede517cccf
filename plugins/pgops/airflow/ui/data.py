"""Where the dashboard's numbers come from: the reports in the bucket (through a TTL cache) and Airflow's DB.

Per page view the bucket sees no listing at all: `latest.json` of each kind per cluster, and a bounded
`list_reports` for the history charts, each cached for `ttl_s` in a cache of at most `max_entries` values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgops.inventory import Cluster, Inventory, load_inventory

log = logging.getLogger(__name__)

DAG_KINDS = {"backup": "pgops_base_backup__", "audit": "pgops_wal_audit__", "restore": "pgops_restore_verify__",
             "migration": "pgops_ebs_migration__"}
RESTORE_HISTORY = 60  # restore-verify reports behind the RTO chart
MIGRATION_HISTORY = 20  # ebs-migration reports searched for a run


def dag_ids(cluster: Cluster) -> dict[str, str]:
    return {kind: prefix + cluster.name for kind, prefix in DAG_KINDS.items()}


class TtlCache:
    """A small thread-safe LRU cache whose values expire after ttl_s (errors are not cached)."""

    def __init__(self, *, ttl_s: float = 60.0, max_entries: int = 256, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] > now:
                self._data.move_to_end(key)
                return hit[1]
        value = load()
        with self._lock:
            self.misses += 1
            self._data[key] = (now + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _pgops_s3_hook(conn_id: str):
    from pgops.airflow.hooks import PgopsS3Hook

    hook = PgopsS3Hook(aws_conn_id=conn_id)
    hook.conn  # noqa: B018 - its client is made here, under ReportSource's lock (boto3 makes clients thread-unsafely)
    return hook


class ReportSource:
    """Reads reports for the dashboard: latest.json per kind and bounded histories, cached."""

    def __init__(self, *, ttl_s: float = 60.0, max_entries: int = 256,
                 hook_factory: Callable[[str], Any] | None = None):
        """``hook_factory``: a PgopsS3Hook for an AWS connection id (default: ``PgopsS3Hook(aws_conn_id=...)``);
        one hook, and so one boto3 client, per connection is kept for the source's life."""
        self.cache = TtlCache(ttl_s=ttl_s, max_entries=max_entries)
        self._hook_factory = hook_factory or _pgops_s3_hook
        self._hooks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._inventory: tuple[Path, float, Inventory] | None = None

    def inventory(self) -> Inventory:
        from pgops.inventory import inventory_path

        path = inventory_path()
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if self._inventory is None or self._inventory[0] != path or self._inventory[1] != mtime:
            self._inventory = (path, mtime, load_inventory(path))
        return self._inventory[2]

    def hook(self, conn_id: str):
        """The PgopsS3Hook of an AWS connection (made once, then reused)."""
        with self._lock:
            if conn_id not in self._hooks:
                self._hooks[conn_id] = self._hook_factory(conn_id)
            return self._hooks[conn_id]

    def latest(self, cluster: Cluster, kind: str) -> dict[str, Any] | None:
        key = ("latest", cluster.storage.bucket, cluster.storage.server_prefix, kind)
        return self.cache.get(key, lambda: self._safe(
            lambda: self.hook(cluster.aws_conn_id).read_latest_report(cluster, kind)))

    def history(self, cluster: Cluster, kind: str, limit: int) -> list[dict[str, Any]]:
        key = ("history", cluster.storage.bucket, cluster.storage.server_prefix, kind, limit)
        return self.cache.get(key, lambda: self._safe(
            lambda: self.hook(cluster.aws_conn_id).list_reports(cluster, kind, limit=limit)) or [])

    def progress(self, cluster: Cluster, kind: str) -> dict[str, Any] | None:
        """The progress record of a DAG kind (pgops.airflow.progress), read fresh: it is only asked for a running run."""
        return self._safe(lambda: self.hook(cluster.aws_conn_id).read_progress(cluster, kind))

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            # a missing bucket or a denied read shows as "no report", and is logged once per TTL
            log.warning("reading reports failed: %s", exc)
            return None


# --- Airflow's own records: backup asset events and the newest run of each DAG --------------------------


def backup_events(cluster_name: str, limit: int = 50) -> list[dict[str, Any]]:
    """Extras of the newest backup asset events of a cluster, newest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.extra, AssetEvent.timestamp).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == f"pgops_backup__{cluster_name}")
            .order_by(AssetEvent.timestamp.desc()).limit(limit)).all()
    return [dict(extra or {}, event_time=ts.isoformat() if ts else None) for extra, ts in rows]


def latest_runs(ids: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    """The newest run of each DAG: state, run id, when."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    out: dict[str, dict[str, Any] | None] = {}
    with create_session() as session:
        for kind, dag_id in ids.items():
            run = session.execute(select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date)
                                  .where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)).first()
            out[kind] = None if run is None else {
                "dag_id": dag_id, "run_id": run.run_id, "state": str(run.state.value if hasattr(run.state, "value") else run.state),
                "start_date": run.start_date.isoformat() if run.start_date else None,
                "end_date": run.end_date.isoformat() if run.end_date else None}
    return out
