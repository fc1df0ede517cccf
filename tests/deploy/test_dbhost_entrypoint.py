"""docker/dbhost-entrypoint.sh run for real (no Docker engine needed): as root, it initialises and starts
PostgreSQL 15 as the postgres OS user, runs the command, and stops the server.

The container's environment carries Airflow's secrets (the worker needs them); PostgreSQL must not: a superuser
reads its own environment with pg_read_file('/proc/self/environ'). It listens only where it is told and takes
password logins only from the dbnet subnet.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "dbhost-entrypoint.sh"
PG_BIN = Path(os.environ.get("PGOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))
SECRETS = {"AIRFLOW__CORE__FERNET_KEY": "fernet-secret-value-0001",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:metadb-secret-0002@postgres/airflow",
           "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-value-0003",
           "AIRFLOW__CELERY__BROKER_URL": "redis://:broker-secret-0004@redis:6379/0",
           "AIRFLOW_CONN_PGOPS_MAIN_PG": '{"conn_type": "postgres", "password": "conn-secret-0005"}',
           "PGOPS_MAIN_PG_PASSWORD": "pg-password-0006"}
# What PostgreSQL reports about itself, read as an attacker with a superuser login would (the postmaster's
# environment: a backend's own /proc/self/environ is overwritten by its process title on Linux).
PROBE = """set -eo pipefail
q() { "$PGOPS_PG_BIN/psql" -h /var/run/postgresql -p "$PGOPS_PG_PORT" -U postgres -d postgres -Atc "$1"; }
pid=$(head -1 "$PGDATA/postmaster.pid")
q "SELECT encode(pg_read_binary_file('/proc/$pid/environ'), 'hex')" > "$OUT/environ"
q "SHOW listen_addresses" > "$OUT/listen"
q "SELECT count(*) FROM pg_hba_file_rules WHERE address = '0.0.0.0'" > "$OUT/open_rules"
echo "$pid" > "$OUT/pid"
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not (PG_BIN / "initdb").exists(),
                                reason="runs the entrypoint as root with Debian's PostgreSQL 15 (as in the image)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def host(tmp_path_factory):
    """A root the postgres OS user can reach (pytest's basetemp is 0700), an inventory, an output directory."""
    root = Path(tempfile.mkdtemp(prefix="pgops-entrypoint-"))
    os.chmod(root, 0o755)
    pg = root / "pg"
    out = root / "out"
    for d in (pg, out):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    base = yaml.safe_load((REPO / "include" / "clusters.example.yaml").read_text())["clusters"][0]
    base["storage"] = {**base["storage"], "server_name": f"entrypoint-{os.getpid()}"}
    base["engine"] = {**base.get("engine", {}), "wal_archive_parallel": 1}
    inventory = root / "clusters.yaml"
    inventory.write_text(yaml.safe_dump({"clusters": [base]}))
    try:
        yield root, pg / "main", out, inventory
    finally:
        pid_file = pg / "main" / "postmaster.pid"
        if pid_file.exists():  # the entrypoint's EXIT trap failed: stop our server, by its data directory
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pg / "main"),
                            "-m", "immediate", "-w", "stop"], check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, pgdata: Path, out: Path, inventory: Path, port: int, **overrides: str):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PGDATA": str(pgdata), "PGOPS_PG_BIN": str(PG_BIN), "PGOPS_INVENTORY": str(inventory),
           "PGOPS_DBHOST_VENV": os.environ.get("PGOPS_DBHOST_VENV", "/opt/pgops/dbhost-venv"),
           "PGOPS_RESTORE_SCRATCH_ROOT": str(root / "scratch"), "PGOPS_ARCHIVE_ENDPOINT": "http://127.0.0.1:9",
           "PGOPS_PG_PORT": str(port), "PGOPS_PG_LISTEN": "localhost", "PGOPS_PG_CLIENT_CIDR": "10.99.0.0/24",
           "AWS_ACCESS_KEY_ID": "dbhost-access-key", "AWS_SECRET_ACCESS_KEY": "dbhost-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1", "OUT": str(out), **SECRETS, **overrides}
    return subprocess.run([str(ENTRYPOINT), "bash", "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)


def test_postgres_runs_without_airflow_secrets_and_listens_only_where_told(host):
    root, pgdata, out, inventory = host
    port = _free_port()
    res = _run(root, pgdata, out, inventory, port)
    assert res.returncode == 0, res.stderr[-3000:]
    environ = bytes.fromhex((out / "environ").read_text().strip()).decode().replace("\0", "\n")
    names = {line.split("=", 1)[0] for line in environ.splitlines() if "=" in line}
    for name, value in SECRETS.items():
        assert name not in names and value not in environ, name
    assert not [n for n in names if n.startswith(("AIRFLOW", "PGOPS_"))], names
    # exactly what archive_command needs: its path, locale, PGDATA and the DB host's own S3 identity
    assert names <= {"PATH", "LANG", "HOME", "PGDATA", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                     "AWS_SECRET_ACCESS_KEY", "PWD", "PG_GRANDPARENT_PID", "PGLOCALEDIR", "PGSYSCONFDIR"}, names
    assert "AWS_ACCESS_KEY_ID=dbhost-access-key" in environ
    assert (out / "listen").read_text().strip() == "localhost"
    assert (out / "open_rules").read_text().strip() == "0"
    hba = (pgdata / "pg_hba.conf").read_text()
    assert "0.0.0.0/0" not in hba and hba.count("host all postgres 10.99.0.0/24 scram-sha-256 # pgops-dbhost") == 1
    # the server ran for the command only: the entrypoint stopped it
    assert not (pgdata / "postmaster.pid").exists()
    pid = int((out / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()


def test_an_old_volume_loses_its_open_rule_and_a_wildcard_listen_is_refused(host):
    root, pgdata, out, inventory = host
    port = _free_port()
    assert _run(root, pgdata, out, inventory, port).returncode == 0
    with (pgdata / "pg_hba.conf").open("a") as fh:  # what the image wrote before
        fh.write("host all postgres 0.0.0.0/0 scram-sha-256\n")
    res = _run(root, pgdata, out, inventory, port, PGOPS_PG_CLIENT_CIDR="10.98.0.0/24")
    assert res.returncode == 0, res.stderr[-3000:]
    hba = (pgdata / "pg_hba.conf").read_text()
    assert "0.0.0.0/0" not in hba and "10.99.0.0/24" not in hba and hba.count("10.98.0.0/24") == 1
    assert (out / "open_rules").read_text().strip() == "0"
    for name, value in (("PGOPS_PG_LISTEN", "*"), ("PGOPS_PG_LISTEN", "0.0.0.0"), ("PGOPS_PG_CLIENT_CIDR", "0.0.0.0/0"),
                        ("PGOPS_PG_LISTEN", "localhost' ssl = 'on")):
        (out / "listen").unlink(missing_ok=True)
        res = _run(root, pgdata, out, inventory, port, **{name: value})
        assert res.returncode == 1 and f"{name}=" in res.stderr, (name, value, res.stderr[-500:])
        assert not (out / "listen").exists() and not (pgdata / "postmaster.pid").exists()
    assert json.loads(json.dumps(SECRETS))  # the secrets above never reached a file of the data directory
    for path in pgdata.rglob("*.conf"):
        text = path.read_text(errors="replace")
        assert not [v for v in SECRETS.values() if v in text], path
