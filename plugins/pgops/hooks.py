"""Adapters to AWS and PostgreSQL, built from Airflow connections (the one place that makes clients)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """Something only a human can fix (retrying will not help)."""


def aws_hook(conn_id: str, client_type: str, region_name: str | None = None):
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=conn_id, client_type=client_type, region_name=region_name)


def s3_client(conn_id: str):
    """S3 client for the cluster's bucket (the connection's service_config.s3.endpoint_url wins for S3)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=conn_id).get_conn()


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
    return env


@dataclass(frozen=True)
class PgTarget:
    host: str
    port: int
    user: str
    dbname: str
    password: str | None

    def child_env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}


def pg_target(conn_id: str) -> PgTarget:
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    return PgTarget(host=conn.host or "127.0.0.1", port=int(conn.port or 5432), user=conn.login or "postgres",
                    dbname=conn.schema or "postgres", password=conn.password)


def pg_connect(conn_id: str, *, connect_timeout_s: int = 10, autocommit: bool = True):
    """A psycopg2 connection to the cluster (for checks and the canary)."""
    import psycopg2

    t = pg_target(conn_id)
    conn = psycopg2.connect(host=t.host, port=t.port, user=t.user, dbname=t.dbname, password=t.password,
                            connect_timeout=connect_timeout_s, application_name="pgops")
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
