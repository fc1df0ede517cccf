"""A primary that accepts only TLS (ssl = on, hostssl rules, the lab's own CA) and a connection that asks for
``sslmode=verify-full``: the backup preflight, the audit, the canary and barman-cloud-backup all reach it, because
every SQL call goes through the provider's PostgresHook with the connection's extras and the DB-host child
process gets libpq's PGSSL* variables. The same connection without TLS, or trusting another CA, is refused."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from pgops.core import findings as F
from pgops.inventory import load_inventory

pytestmark = [pytest.mark.lab, pytest.mark.airflow]

CONN_ENV = "AIRFLOW_CONN_PGOPS_MAIN_PG"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120)


def _ca(where: Path, name: str) -> tuple[Path, Path]:
    key, crt = where / f"{name}.key", where / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(crt))
    return key, crt


@pytest.fixture(scope="module")
def tls_only(lab):
    """The lab primary made TLS-only for this module (certificate for IP 127.0.0.1 from the lab's own CA);
    pg_hba.conf and the settings are put back afterwards."""
    st = lab.load()
    where = Path(st.state_dir) / "tls-pg"
    where.mkdir(exist_ok=True)
    ca_key, ca_crt = _ca(where, "pgops-lab-ca")
    _other_key, other_crt = _ca(where, "another-ca")
    key, csr, crt = where / "server.key", where / "server.csr", where / "server.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = where / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(crt))
    os.chmod(where, 0o755)
    for f in where.iterdir():
        os.chmod(f, 0o644)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(key, pw.pw_uid, pw.pw_gid)
    hba = Path(st.pg_data) / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("# TLS only (tests/lab/test_tls_primary.py)\nlocal all all trust\n"
                   "hostnossl all all 0.0.0.0/0 reject\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
                   "hostssl replication all 127.0.0.1/32 scram-sha-256\n")
    lab.psql(f"ALTER SYSTEM SET ssl_cert_file = '{crt}'; ALTER SYSTEM SET ssl_key_file = '{key}'; "
             "ALTER SYSTEM SET ssl = on")
    lab.psql("SELECT pg_reload_conf()")
    try:
        yield {"ca": str(ca_crt), "other_ca": str(other_crt)}
    finally:
        hba.write_text(original)
        lab.psql("ALTER SYSTEM RESET ssl; ALTER SYSTEM RESET ssl_cert_file; ALTER SYSTEM RESET ssl_key_file")
        lab.psql("SELECT pg_reload_conf()")


@pytest.fixture
def conn_with(monkeypatch):
    base = json.loads(os.environ[CONN_ENV])

    def use(**extra: str) -> None:
        monkeypatch.setenv(CONN_ENV, json.dumps({**base, "extra": extra}))

    return use


def test_verify_full_reaches_the_tls_only_primary_from_every_sql_path(lab, tls_only, conn_with, airflow_db):
    from pgops.airflow import audit, hooks
    from pgops.airflow.operators.backup import BackupPreflightOperator
    from pgops.airflow.operators.restore import RestoreCanaryOperator

    conn_with(sslmode="verify-full", sslrootcert=tls_only["ca"])
    row = hooks.pg_query("pgops_main_pg", "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0]
    assert row["ssl"] is True and row["version"].startswith("TLS")
    assert hooks.pg_query("pgops_main_pg", "SELECT application_name FROM pg_stat_activity "
                          "WHERE pid = pg_backend_pid()")[0]["application_name"] == "pgops"
    BackupPreflightOperator(task_id="preflight", cluster_name="main").execute({"run_id": "tls"})
    report = audit.audit_cluster(load_inventory().get("main"), run_id="tls")
    assert F.PRIMARY_UNREACHABLE not in {f["id"] for f in report["body"]["findings"]}, report["body"]["findings"]
    canary = RestoreCanaryOperator(task_id="canary", cluster_name="main").run_step({"run_id": "tls"})
    assert canary["archived_at"] and canary["segment"]


def test_barman_cloud_backup_connects_with_the_connections_tls_settings(lab, tls_only, conn_with, airflow_db):
    from pgops.airflow import hooks
    from pgops.airflow.operators.backup import BarmanCloudBackupOperator, backup_name_for_run, catalog_by_name

    conn_with(sslmode="verify-full", sslrootcert=tls_only["ca"])
    env = hooks.pg_target("pgops_main_pg").child_env()
    assert env["PGSSLMODE"] == "verify-full" and env["PGSSLROOTCERT"] == tls_only["ca"]
    backup_id = BarmanCloudBackupOperator(task_id="backup", cluster_name="main").execute({"run_id": "tls-backup"})
    cluster = load_inventory().get("main")
    made = dict(catalog_by_name(cluster, backup_name_for_run("tls-backup")))
    assert made[backup_id]["status"] == "DONE"


@pytest.mark.parametrize("extra, said", [
    ({"sslmode": "disable"}, "no encryption"),
    ({"sslmode": "verify-full", "sslrootcert": "OTHER"}, "certificate verify failed"),
])
def test_without_tls_or_with_another_ca_the_primary_is_refused(lab, tls_only, conn_with, airflow_db, extra, said):
    from pgops.airflow.operators.backup import BackupPreflightOperator

    conn_with(**{k: (tls_only["other_ca"] if v == "OTHER" else v) for k, v in extra.items()})
    with pytest.raises(RuntimeError, match="is not reachable") as err:
        BackupPreflightOperator(task_id="preflight", cluster_name="main").execute({"run_id": "tls"})
    assert said in str(err.value)
