"""Adapters to AWS and PostgreSQL, built from Airflow connections (the one place that makes clients)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def aws_hook(conn_id: str, client_type: str, region_name: str | None = None):
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=conn_id, client_type=client_type, region_name=region_name)


def s3_client(conn_id: str):
    """S3 client for the cluster's bucket (the connection's service_config.s3.endpoint_url wins for S3)."""
    return _s3_hook_class()(aws_conn_id=conn_id).conn


def __getattr__(name: str) -> Any:
    # The Amazon provider's S3Hook imports boto3 (~0.6 s): its subclass is made on first use, never at DAG parse time.
    if name == "PgopsS3Hook":
        return _s3_hook_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _s3_hook_class() -> type:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    class PgopsS3Hook(S3Hook):
        """The cluster's bucket: reports, progress records, barman-cloud's catalog and listings.

        One boto3 client per hook (``conn`` is cached); the calls are the plain S3 API calls pgops's IAM policy
        grants. The bucket layouts live in :mod:`pgops.core.reports`, :mod:`pgops.airflow.progress` and :mod:`pgops.airflow.audit`,
        whose functions take a client; this hook gives them its own.

        :param aws_conn_id: the Airflow AWS connection (its ``service_config.s3.endpoint_url`` wins for S3)
        """

        # --- reports (pgops.core.reports) ---

        def write_report(self, cluster, report: dict[str, Any]) -> str:
            """Write a report envelope under its timestamp and as latest.json; the timestamped key."""
            from pgops.core import reports

            return reports.write_report(self.conn, cluster, report)

        def read_latest_report(self, cluster, kind: str) -> dict[str, Any] | None:
            from pgops.core import reports

            return reports.read_latest(self.conn, cluster, kind)

        def list_reports(self, cluster, kind: str, *, limit: int = 200) -> list[dict[str, Any]]:
            """The newest ``limit`` reports of a kind, oldest first."""
            from pgops.core import reports

            return reports.list_reports(self.conn, cluster, kind, limit=limit)

        # --- an EBS migration's backup_label (pgops.core.ebs.backup_label) ---

        def write_backup_label(self, cluster, migration: str, *, snapshots: dict[str, str],
                               backup: dict[str, Any]) -> str:
            """Store a backup-mode cutover's label beside the ebs-migration reports; its key."""
            from pgops.core.ebs import backup_label

            return backup_label.write_backup_label(self.conn, cluster, migration, snapshots=snapshots, backup=backup)

        def read_backup_label(self, cluster, migration: str) -> dict[str, Any] | None:
            """A migration's stored final-round label, or None when there is none (or it is not that migration's)."""
            from pgops.core.ebs import backup_label

            return backup_label.read_backup_label(self.conn, cluster, migration)

        # --- progress records (pgops.airflow.progress) ---

        def progress_publisher(self, cluster, kind: str):
            """A callable writing a progress record of ``kind`` (for ProgressTicker's ``publish``)."""
            from pgops.airflow import progress

            return progress.bucket_publisher(self.conn, cluster, kind)

        def read_progress(self, cluster, kind: str) -> dict[str, Any] | None:
            from pgops.airflow import progress

            return progress.read_progress(self.conn, cluster, kind)

        def uploaded_since(self, bucket: str, prefix: str, since) -> int:
            """Bytes written under ``prefix`` since ``since``, multipart uploads in progress included."""
            from pgops.airflow import progress

            return progress.uploaded_since(self.conn, bucket, prefix, since)

        # --- listings and objects ---

        def iter_objects(self, bucket: str, prefix: str, *, skip_prefixes: tuple[str, ...] = ()):
            """(key, size_bytes, last_modified) of every object under ``prefix``, page by page."""
            from pgops.airflow import audit

            return audit.iter_listing(self.conn, bucket, prefix, skip_prefixes=skip_prefixes)

        def find_key(self, bucket: str, prefix: str, match) -> str | None:
            """The first key under ``prefix`` for which ``match(key)`` is true, or None."""
            for key, _, _ in self.iter_objects(bucket, prefix):
                if match(key):
                    return key
            return None

        def stored_bytes(self, bucket: str, prefix: str) -> int:
            """Bytes of every object under ``prefix``."""
            return sum(size for _, size, _ in self.iter_objects(bucket, prefix))

        def fetch_objects(self, bucket: str, keys: list[str]):
            """({key: decompressed bytes}, {key: last modified}) of the named objects; a missing one is left out."""
            from pgops.airflow import audit

            return audit.fetch(self.conn, bucket, keys)

        # --- buckets (deployment set-up) ---

        def ensure_bucket(self, bucket: str) -> bool:
            """Create ``bucket`` unless the account's bucket list names it (the bundled S3 at set-up); True when
            it was created."""
            if bucket in {b["Name"] for b in self.conn.list_buckets().get("Buckets", [])}:
                return False
            self.conn.create_bucket(Bucket=bucket)
            return True

        # --- barman-cloud's catalog ---

        def backup_ids(self, cluster) -> list[str]:
            """The backup ids under ``<server prefix>/base/`` (one delimited listing), sorted."""
            base = f"{cluster.storage.server_prefix}/base/"
            ids: list[str] = []
            pages = self.conn.get_paginator("list_objects_v2").paginate(Bucket=cluster.storage.bucket, Prefix=base,
                                                                        Delimiter="/")
            for page in pages:
                ids += [cp["Prefix"][len(base):].rstrip("/") for cp in page.get("CommonPrefixes", [])]
            return sorted(ids)

        def backup_infos(self, cluster, backup_ids: list[str]) -> dict[str, dict[str, str]]:
            """{backup id: its parsed backup.info}; a backup still uploading has none and is left out."""
            from pgops.core.layouts import parse_barman_backup_info

            base = f"{cluster.storage.server_prefix}/base/"
            found, _ = self.fetch_objects(cluster.storage.bucket, [f"{base}{i}/backup.info" for i in backup_ids])
            return {i: parse_barman_backup_info(found[f"{base}{i}/backup.info"]) for i in backup_ids
                    if f"{base}{i}/backup.info" in found}

    PgopsS3Hook.__qualname__ = "PgopsS3Hook"
    return PgopsS3Hook


def s3_endpoint_url(conn_id: str) -> str | None:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=conn_id, client_type="s3").conn_config.get_service_endpoint_url("s3")


def aws_child_env(conn_id: str) -> dict[str, str]:
    """AWS credentials for a DB-host child process, passed through its environment (never argv)."""
    hook = aws_hook(conn_id, "s3")
    creds = hook.get_credentials()
    env: dict[str, str] = {}
    if creds and creds.access_key:
        env.update({"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key})
        if creds.token:
            env["AWS_SESSION_TOKEN"] = creds.token
    # from the connection or the session, without building a client (~0.3 s) for it
    region = hook.region_name or hook.conn_config.region_name or hook.get_session().region_name
    if region:
        env["AWS_DEFAULT_REGION"] = region
    verify = hook.conn_config.verify
    if isinstance(verify, str) and verify:
        # the connection's CA bundle (extra "verify": a path), for an S3 endpoint with a private CA: boto3 in
        # barman-cloud reads it from the environment
        env["AWS_CA_BUNDLE"] = verify
    return env


# libpq's TLS settings: connection extras (what PostgresHook passes to psycopg2) and the environment variables a
# child process's libpq reads (barman-cloud-backup connects from the DB host with them).
SSL_EXTRAS = {"sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
              "sslcrl": "PGSSLCRL", "sslpassword": "PGSSLPASSWORD"}
PG_DEFAULT_EXTRAS = {"application_name": "pgops"}


@dataclass(frozen=True)
class PgTarget:
    host: str
    port: int
    user: str
    dbname: str
    password: str | None
    ssl: tuple[tuple[str, str], ...] = ()  # (extra name, value) of the connection's TLS settings

    def child_env(self) -> dict[str, str]:
        env = {"PGPASSWORD": self.password} if self.password else {}
        env.update({SSL_EXTRAS[k]: v for k, v in self.ssl})
        return env


def pg_target(conn_id: str) -> PgTarget:
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extras = conn.extra_dejson or {}
    return PgTarget(host=conn.host or "127.0.0.1", port=int(conn.port or 5432), user=conn.login or "postgres",
                    dbname=conn.schema or "postgres", password=conn.password,
                    ssl=tuple((k, str(extras[k])) for k in SSL_EXTRAS if extras.get(k) not in (None, "")))


def pg_hook(conn_id: str, *, connect_timeout_s: int = 10):
    """The provider's PostgresHook for a cluster connection: every extra of the connection (sslmode, sslrootcert,
    sslcert, sslkey, options, keepalives ...) reaches psycopg2; pgops only adds connect_timeout and
    application_name where the connection sets none."""
    import copy
    import json

    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extras = conn.extra_dejson or {}
    defaults = {"connect_timeout": connect_timeout_s, **PG_DEFAULT_EXTRAS}
    missing = {k: v for k, v in defaults.items() if k not in extras}
    if missing:
        conn = copy.deepcopy(conn)
        conn.extra = json.dumps({**missing, **extras})
    return PostgresHook(postgres_conn_id=conn_id, connection=conn)


def pg_connect(conn_id: str, *, connect_timeout_s: int = 10, autocommit: bool = True):
    """A psycopg2 connection to the cluster (checks, the canary), through the provider's PostgresHook."""
    conn = pg_hook(conn_id, connect_timeout_s=connect_timeout_s).get_conn()
    conn.autocommit = autocommit
    return conn


def pg_query(conn_id: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    conn = pg_connect(conn_id)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            if cur.description is None:
                return []
            cols = [d.name for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def pg_connect_local(*, host: str, port: int, user: str, dbname: str = "postgres", connect_timeout_s: int = 5,
                     autocommit: bool = True):
    """A psycopg2 connection to a PostgreSQL with no Airflow connection (a scratch restore on the restore host).

    ``host`` is a unix socket directory or a loopback address; no password (the scratch instance trusts its socket).
    """
    import psycopg2

    conn = psycopg2.connect(host=host, port=port, user=user, dbname=dbname, connect_timeout=connect_timeout_s,
                            application_name="pgops")
    conn.autocommit = autocommit
    return conn
